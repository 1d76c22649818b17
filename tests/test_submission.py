"""Record folder + submission.json + audit, on real tiny-preset runs (two seeds, run once per module)."""
import copy
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lcq import record as R
from lcq.tools import submission as S

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo_data):
    """Two tiny runs of one configuration, seeds 1 and 2, run side by side (one thread each). Returns the run dir."""
    tmp = tmp_path_factory.mktemp("sub_runs")
    data_path, tokenizer_path = demo_data
    procs = []
    for seed in (1, 2):
        env = dict(os.environ, PRESET="tiny", DATA_PATH=str(data_path), TOKENIZER_PATH=str(tokenizer_path),
                   LOG_DIR="logs", RUN_ID=f"seed{seed}", SEED=str(seed), OMP_NUM_THREADS="1",
                   SUBMISSION_JSON=str(tmp / f"root_seed{seed}.json"), AUTHOR="Ada Tester", GITHUB_ID="ada",
                   SUBMISSION_NAME="LCQ tiny test", SUBMISSION_BLURB="tiny preset, two seeds")
        procs.append(subprocess.Popen([sys.executable, str(REPO / "train_gpt.py")], env=env, cwd=tmp,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]
    return tmp


def final_exact(log_text: str) -> tuple[float, float]:
    m = re.search(r"^final_exact val_loss:([0-9.]+) val_bpb:([0-9.]+)$", log_text, re.M)
    return float(m[1]), float(m[2])


def logged_total(log_text: str) -> tuple[int, int, int, int]:
    m = re.search(r"^Total submission size: (\d+) bytes \(code (\d+), model (\d+), lora (\d+)", log_text, re.M)
    return tuple(int(x) for x in m.groups())


@pytest.fixture(scope="module")
def one_seed(runs):
    return S.build(["seed1"], log_dir=runs / "logs", out=runs / "out1")


@pytest.fixture(scope="module")
def two_seeds(runs):
    return S.build(["seed1", str(runs / "logs" / "seed2.txt")], log_dir=runs / "logs", out=runs / "out2")


def failed(checks):
    return {c.name for c in checks if not c.ok}


# ---------------------------------------------------------------------------------------------- run_record


def test_run_record_from_a_real_summary(runs):
    summary = json.loads((runs / "logs" / "seed1.json").read_text())
    log = (runs / "logs" / "seed1.txt").read_text()
    rec = R.run_record(summary, date="2026-04-30T12:00:00Z")
    loss, bpb = final_exact(log)
    total, code, model, lora = logged_total(log)
    assert (rec["val_loss"], rec["val_bpb"]) == (loss, bpb)  # exactly the log's 8-decimal final_exact line
    assert (rec["bytes_total"], rec["bytes_code"], rec["bytes_model"], rec["bytes_lora"]) == (total, code, model, lora)
    assert total == code + model + lora
    assert (rec["author"], rec["github_id"], rec["name"]) == ("Ada Tester", "ada", "LCQ tiny test")
    assert rec["date"] == "2026-04-30T12:00:00Z" and rec["seeds"] == [1]
    # the tiny run keeps its own 60 s clock, the 600 s eval budget and the cap, and passes the gate, but a CPU run is
    # never a record
    assert rec["track"] == "non_record_16mb" and not rec["compliance"]["hardware_8xh100"]
    assert all(v for k, v in rec["compliance"].items() if k != "hardware_8xh100")
    e = rec["seed_results"]["1"]
    assert e["steps"] == summary["train"]["steps"] == 12 and e["artifact_bytes"] == total
    assert e["train_time_s"] == summary["train_clock_s"] and e["eval_time_s"] == summary["final"]["eval_time_s"]
    assert rec["lcq"]["rank"] == "8" and rec["lcq"]["init"] == "act_svd" and rec["lcq"]["merge"] == "side"
    assert rec["lcq"]["steps"] == 10
    pre, q = summary["scores"]["pre_quant"]["val_bpb"], summary["scores"]["quantized"]["val_bpb"]
    assert e["lcq"]["quant_gap_bpb"] == pytest.approx(q - pre, abs=2e-8)
    assert rec["pytorch_version"] == summary["versions"]["torch"] and rec["hardware"] == summary["device"]
    json.dumps(rec, allow_nan=False)  # strict JSON: no NaN/inf anywhere


def test_track_follows_the_budgets(runs):
    base = json.loads((runs / "logs" / "seed1.json").read_text())
    base.update(device="8x NVIDIA H100 80GB HBM3", world_size=8)  # as if the same run had been on the record box

    def track(**edit):
        s = copy.deepcopy(base)
        for path, value in edit.items():
            node = s
            *parents, leaf = path.split("__")
            for p in parents:
                node = node[p]
            node[leaf] = value
        return R.run_record(s, date="2026-04-30T00:00:00Z")["track"]

    assert track() == "10min_16mb"
    assert track(train_clock_s=60.5) == "non_record_16mb"  # over the run's own 60 s clock
    assert track(config__max_wallclock_seconds=3600.0, train_clock_s=700.0) == "non_record_16mb"  # over 600 s
    assert track(config__max_wallclock_seconds=3600.0, train_clock_s=599.0) == "10min_16mb"
    assert track(final__eval_time_s=600.5) == "non_record_16mb"
    assert track(bytes__total=16_000_001) == "non_record_16mb"
    assert track(status=3) == "non_record_16mb"
    assert track(world_size=1, device="1x NVIDIA H100 80GB HBM3") == "non_record_16mb"
    assert track(device="8x NVIDIA A100-SXM4-80GB") == "non_record_16mb"


def test_audit_rejects_a_record_claim_off_8xh100(one_seed, tmp_path):
    folder = tmp_path / one_seed.name
    shutil.copytree(one_seed, folder)
    rec = json.loads((folder / "submission.json").read_text())
    rec["track"] = "10min_16mb"  # the tiny run was on a CPU
    (folder / "submission.json").write_text(json.dumps(rec))
    assert "json_totals" in failed(S.audit(folder))


def test_gated_run_has_no_score_and_is_non_record(runs):
    s = json.loads((runs / "logs" / "seed1.json").read_text())
    del s["final"], s["scores"], s["lcq"]
    s["status"] = 3
    rec = R.run_record(s, date="2026-04-30T00:00:00Z")
    assert rec["val_bpb"] is None and rec["track"] == "non_record_16mb" and rec["lcq"] is None


def test_run_record_needs_a_date_and_a_config():
    with pytest.raises(S.SubmissionError, match="started_utc"):
        R.run_record({"config": {"seed": 1, "run_id": "x"}})
    with pytest.raises(S.SubmissionError, match="config"):
        R.run_record({"run_id": "x"}, date="2026-04-30")


def test_mean_and_std_known_answers():
    assert R.mean8([1.0, 2.0, 4.0]) == pytest.approx(7 / 3, abs=1e-8)
    assert R.std8([1.0, 2.0, 4.0]) == pytest.approx(math.sqrt(7 / 3), abs=1e-8)  # sample std: sum sq dev 14/3 / 2
    assert R.std8([1.0]) is None and R.mean8([1.0, None]) is None


# ---------------------------------------------------------------------------------------------- atomic write


def test_submission_json_survives_a_failure_mid_write(tmp_path, monkeypatch):
    path = tmp_path / "submission.json"
    old = {"val_bpb": 1.5, "name": "old"}
    R.write_submission_json(path, old)
    new = {"val_bpb": 1.2, "name": "new", "padding": "x" * 100_000}
    # the process dies after the new bytes are written but before they are in place: fsync, then rename, fail
    for target in ("fsync", "replace"):
        with monkeypatch.context() as m:
            m.setattr(f"lcq.runlog.os.{target}", lambda *a: (_ for _ in ()).throw(OSError(f"{target} failed")))
            with pytest.raises(OSError, match=target):
                R.write_submission_json(path, new)
        assert json.loads(path.read_text()) == old
        assert sorted(p.name for p in tmp_path.iterdir()) == ["submission.json"]  # the temp file is gone
    with pytest.raises(TypeError):
        R.write_submission_json(path, {"broken": object()})
    with pytest.raises(ValueError):
        R.write_submission_json(path, {"val_bpb": float("nan")})  # NaN is not JSON
    assert json.loads(path.read_text()) == old
    R.write_submission_json(path, new)
    assert json.loads(path.read_text()) == new


# ---------------------------------------------------------------------------------------------- logs and helpers


def test_parse_log_known_answers():
    text = "\n".join([
        "lcq run r7 started 2026-04-30 01:02:03 UTC",
        'config: {"seed": 7, "run_id": "r7"}',
        "stage:train time:590.10s budget_left:9.90s steps:4550 stopped_by:wallclock step_avg_ms:129.69 train_budget:520.0s",
        "Total submission size: 15992919 bytes (code 16594, model 15900000, lora 76325, cap 16000000)",
        "training clock (MAX_WALLCLOCK_SECONDS=600):",
        "  stage        seconds    budget    margin",
        "  total         598.75    600.00      1.25",
        "quantized_exact val_loss:2.10000000 val_bpb:1.09000000",
        "stage:eval_quantized_lcq time:412.34s budget_left:187.66s within_eval_budget:yes",
        "lcq_summary: rank 8 init act_svd merge side steps 300 time 50.00s final_kl 0.001000 lora_bytes 76325 "
        "recovered 0.4000 of the quantization gap 0.010000 bpb",
        "final quantized_lcq val_loss:2.0900 val_bpb:1.0800 train_clock:598.8s eval_time:412.3s",
        "final_exact val_loss:2.09000000 val_bpb:1.08000000",
        "Total submission size: 15992919 bytes (code 16594, model 15900000, lora 76325, cap 16000000)",
    ])
    p = S.parse_log(text)
    assert (p["run_id"], p["date"], p["config"]["seed"]) == ("r7", "2026-04-30T01:02:03Z", 7)
    assert (p["total"], p["code"], p["model"], p["lora"], p["cap"]) == (15992919, 16594, 15900000, 76325, 16_000_000)
    assert p["totals_agree"] and not p["gate_failed"]
    assert (p["train_clock_s"], p["final_train_clock_s"], p["final_eval_s"]) == (598.75, 598.8, 412.3)
    assert (p["val_loss"], p["val_bpb"], p["final_stage"]) == (2.09, 1.08, "quantized_lcq")
    assert p["exact"] == {"quantized": (2.1, 1.09)} and p["eval_s"] == {"quantized_lcq": 412.34}
    assert (p["steps"], p["step_avg_ms"]) == (4550, 129.69)
    assert p["lcq"] == dict(rank="8", init="act_svd", merge="side", steps=300, recovered_fraction=0.4)
    empty = S.parse_log("nothing here")
    assert empty["total"] is None and empty["val_bpb"] is None and empty["config"] is None


def test_parse_log_agrees_with_the_json_summary(runs):
    summary = json.loads((runs / "logs" / "seed2.json").read_text())
    p = S.parse_log((runs / "logs" / "seed2.txt").read_text())
    assert p["config"] == summary["config"] and p["run_id"] == "seed2"
    assert p["total"] == summary["bytes"]["total"] and p["steps"] == summary["train"]["steps"]
    assert p["val_bpb"] == pytest.approx(summary["final"]["val_bpb"], abs=5e-9)
    assert p["train_clock_s"] == pytest.approx(summary["train_clock_s"], abs=0.0051)


def test_reproduce_env_known_answer():
    defaults = {"preset": "tiny", "seed": 1337, "run_id": "20260430_tiny", "data_path": "./data", "lcq_lr": 0.005,
                "compile": False, "submission_json": "submission.json", "iterations": 12, "print_config": True}
    config = dict(defaults, seed=42, run_id="r42", data_path="/d/x y", lcq_lr=0.001, compile=True,
                  submission_json="", print_config=False)
    r = S.reproduce(config, defaults, world_size=8)
    assert r["env"] == {"PRESET": "tiny", "SEED": "42", "RUN_ID": "r42", "COMPILE": "1", "DATA_PATH": "/d/x y",
                        "LCQ_LR": "0.001"}
    assert r["argv"] == ["--submission_json="]
    assert r["command"] == ("PRESET=tiny SEED=42 RUN_ID=r42 COMPILE=1 DATA_PATH='/d/x y' LCQ_LR=0.001 "
                            "torchrun --standalone --nproc_per_node=8 train_gpt.py --submission_json=")


def test_requirements_known_answer():
    txt = S.requirements_txt({"python": "3.12.3", "torch": "2.9.1+cu128", "numpy": "2.1.0", "sentencepiece": "0.2.0",
                              "brotli": "1.1.0", "flash_attn": None, "flash_attn_interface": "installed"})
    lines = txt.splitlines()
    assert lines[1:5] == ["torch==2.9.1  # the run used the 2.9.1+cu128 build", "numpy==2.1.0",
                          "sentencepiece==0.2.0", "brotli==1.1.0"]
    assert not any(line.startswith("flash_attn==") for line in lines) and "flash_attn_interface" in lines[-1]


# ---------------------------------------------------------------------------------------------- build + audit


def test_build_one_seed_then_audit_passes(runs, one_seed):
    assert one_seed.name == f"{S.parse_log((runs / 'logs' / 'seed1.txt').read_text())['date'][:10]}_LCQ_tiny_test"
    assert sorted(p.name for p in one_seed.iterdir()) == ["README.md", "requirements.txt", "submission.json",
                                                          "train_gpt.py", "train_seed1.log"]
    assert (one_seed / "train_gpt.py").read_bytes() == (runs / "logs" / "seed1.train_gpt.py").read_bytes()
    assert (one_seed / "train_seed1.log").read_bytes() == (runs / "logs" / "seed1.txt").read_bytes()
    rec = json.loads((one_seed / "submission.json").read_text())
    loss, bpb = final_exact((runs / "logs" / "seed1.txt").read_text())
    assert (rec["val_loss"], rec["val_bpb"]) == (loss, bpb)
    readme = (one_seed / "README.md").read_text()
    assert f"**val_bpb = {bpb:.8f}**" in readme and "## LCQ" in readme and "## Stage timings" in readme
    assert "- Ran on 8xH100 (the record track's hardware): **NO** (1x cpu" in readme
    assert rec["reproduce"]["1"]["command"] in readme and "SEED=1 RUN_ID=seed1" in readme
    assert "AUTHOR='Ada Tester'" in readme  # the env the logged command did not show
    proc = subprocess.run([sys.executable, "-m", "lcq.tools.submission", "audit", str(one_seed)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("files", "code_bytes[seed 1]", "code_sha256[seed 1]", "bytes_recomputed[seed 1]", "artifact_cap[seed 1]",
                 "train_time[seed 1]", "eval_time[seed 1]", "json_matches_log[seed 1]", "json_totals", "print_config"):
        assert re.search(rf"^PASS  {re.escape(name)} ", proc.stdout, re.M), proc.stdout
    assert "0 failed" in proc.stdout


def test_compliance_fields_mean_one_thing_each(one_seed):
    """Issue 28: gate_passed is the byte gate (the log's `gate: ok`), exit_status_0 the exit status, and the run's own
    caps are their own fields; the README says each on its own line."""
    rec = json.loads((one_seed / "submission.json").read_text())
    entry = rec["seed_results"]["1"]
    assert entry["compliance"]["gate_passed"] == (entry["artifact_bytes"] <= entry["budgets"]["artifact_cap_bytes"])
    assert entry["compliance"]["exit_status_0"] is True and entry["compliance"]["train_within_run_cap"] is True
    readme = (one_seed / "README.md").read_text()
    assert "- Byte gate passed (bytes within the run's ARTIFACT_CAP_BYTES, the log's `gate: ok`): yes" in readme
    assert "- Exit status 0: yes" in readme



def test_an_exit_4_run_keeps_its_gate_but_not_its_clock(runs):
    """The shape of issue 28's run: bytes under the cap, training clock over the run's cap, exit 4."""
    summary = json.loads((runs / "logs" / "seed1.json").read_text())
    summary.update(status=4, train_clock_s=summary["config"]["max_wallclock_seconds"] + 1.0)
    c = R.seed_result(summary)["compliance"]
    assert c["gate_passed"] and not c["exit_status_0"] and not c["train_within_run_cap"]


def test_build_refuses_to_overwrite_unless_forced(runs, one_seed, capsys):
    before = (one_seed / "submission.json").read_text()
    assert S.main(["build", "--run", "seed1", "--log-dir", str(runs / "logs"), "--out", str(runs / "out1")]) == 2
    assert "already exists" in capsys.readouterr().err
    (one_seed / "submission.json").write_text("{}")
    assert S.main(["build", "--run", "seed1", "--log-dir", str(runs / "logs"), "--out", str(runs / "out1"),
                   "--force"]) == 0
    assert (one_seed / "submission.json").read_text() == before
    assert sorted(p.name for p in (runs / "out1").iterdir()) == [one_seed.name]  # no temp folders left behind


def tamper_json_bpb(folder):
    rec = json.loads((folder / "submission.json").read_text())
    rec["seed_results"]["1"]["val_bpb"] = round(rec["seed_results"]["1"]["val_bpb"] - 0.001, 8)
    (folder / "submission.json").write_text(json.dumps(rec))


def tamper_total_over_cap(folder):
    log = folder / "train_seed1.log"
    log.write_text(re.sub(r"^Total submission size: \d+ bytes", "Total submission size: 16000123 bytes",
                          log.read_text(), flags=re.M))


def tamper_missing_file(folder):
    (folder / "requirements.txt").unlink()


def tamper_train_time(folder):
    log = folder / "train_seed1.log"
    log.write_text(re.sub(r"^  total(\s+)[0-9.]+", r"  total\g<1>612.00", log.read_text(), flags=re.M))


def tamper_train_over_run_cap(folder):
    """Issue 28: under 600 s but over the run's own MAX_WALLCLOCK_SECONDS (tiny: 60 s), as an exit-4 run."""
    log = folder / "train_seed1.log"
    log.write_text(re.sub(r"^  total(\s+)[0-9.]+", r"  total\g<1>61.00", log.read_text(), flags=re.M))


def tamper_exit_status(folder):
    log = folder / "train_seed1.log"
    log.write_text(re.sub(r"^exit_status: 0$", "exit_status: 4", log.read_text(), flags=re.M))


def tamper_script_larger(folder):
    with open(folder / "train_gpt.py", "a") as f:
        f.write("# one more line of code\n")


@pytest.mark.parametrize("tamper, check, words", [
    (tamper_json_bpb, "json_matches_log[seed 1]", "val_bpb json"),
    (tamper_total_over_cap, "artifact_cap[seed 1]", "16,000,123 B > 16,000,000"),
    (tamper_missing_file, "files", "missing: requirements.txt"),
    (tamper_train_time, "train_time[seed 1]", "612.00 s vs 600 s"),
    (tamper_train_over_run_cap, "train_time[seed 1]", "61.00 s vs 600 s and the run cap 60 s"),
    (tamper_exit_status, "exit_status[seed 1]", "exit_status: 4"),
    (tamper_script_larger, "code_bytes[seed 1]", "logged code"),
])
def test_audit_names_each_kind_of_tampering(one_seed, tmp_path, tamper, check, words, capsys):
    folder = tmp_path / one_seed.name
    shutil.copytree(one_seed, folder)
    tamper(folder)
    assert S.main(["audit", str(folder)]) == 1
    out = capsys.readouterr().out
    assert re.search(rf"^FAIL  {re.escape(check)} +.*{re.escape(words)}", out, re.M), out


def test_tampering_side_effects_are_the_expected_ones(one_seed, tmp_path):
    """A larger script also breaks the recomputed total, but still imports and prints its config."""
    folder = tmp_path / one_seed.name
    shutil.copytree(one_seed, folder)
    tamper_script_larger(folder)
    assert failed(S.audit(folder)) == {"code_bytes[seed 1]", "code_sha256[seed 1]", "bytes_recomputed[seed 1]"}


def test_same_length_different_script_fails_only_the_hash(one_seed, tmp_path):
    folder = tmp_path / one_seed.name
    shutil.copytree(one_seed, folder)
    script = folder / "train_gpt.py"
    data = script.read_bytes()
    swapped = data.replace(b"do not edit", b"DO NOT EDIT", 1)
    assert swapped != data and len(swapped) == len(data)
    script.write_bytes(swapped)
    assert failed(S.audit(folder)) == {"code_sha256[seed 1]"}


def test_two_seeds_give_mean_and_std(runs, two_seeds):
    rec = json.loads((two_seeds / "submission.json").read_text())
    (l1, b1), (l2, b2) = (final_exact((runs / "logs" / f"seed{s}.txt").read_text()) for s in (1, 2))
    assert rec["seeds"] == [1, 2] and sorted(rec["seed_results"]) == ["1", "2"]
    assert rec["val_bpb"] == pytest.approx((b1 + b2) / 2, abs=1e-8)
    assert rec["val_loss"] == pytest.approx((l1 + l2) / 2, abs=1e-8)
    assert rec["val_bpb_std"] == pytest.approx(abs(b1 - b2) / math.sqrt(2), abs=1e-8)
    totals = [logged_total((runs / "logs" / f"seed{s}.txt").read_text())[0] for s in (1, 2)]
    assert rec["bytes_total"] == max(totals)
    assert {p.name for p in two_seeds.glob("train_seed*.log")} == {"train_seed1.log", "train_seed2.log"}
    readme = (two_seeds / "README.md").read_text()
    assert f"| **Mean** | **{rec['val_bpb']:.8f}** |" in readme and "SEED=2 RUN_ID=seed2" in readme
    checks = S.audit(two_seeds)
    assert not failed(checks), [c for c in checks if not c.ok]
    assert {"json_matches_log[seed 1]", "json_matches_log[seed 2]"} <= {c.name for c in checks}


def test_combined_runs_must_share_script_and_configuration(runs, tmp_path):
    logs = tmp_path / "logs"
    shutil.copytree(runs / "logs", logs)
    out = tmp_path / "out"
    with open(logs / "seed2.train_gpt.py", "ab") as f:
        f.write(b"\n")
    with pytest.raises(S.SubmissionError, match="byte-identical"):
        S.build(["seed1", "seed2"], log_dir=logs, out=out)
    shutil.copyfile(runs / "logs" / "seed2.train_gpt.py", logs / "seed2.train_gpt.py")
    summary = json.loads((logs / "seed2.json").read_text())
    summary["config"]["lcq_rank"] = "16"
    (logs / "seed2.json").write_text(json.dumps(summary))
    with pytest.raises(S.SubmissionError, match="lcq_rank"):
        S.build(["seed1", "seed2"], log_dir=logs, out=out)
    with pytest.raises(S.SubmissionError, match="seeds"):
        S.build(["seed1", "seed1"], log_dir=logs, out=out)
    with pytest.raises(S.SubmissionError, match="not found"):
        S.build(["no_such_run"], log_dir=logs, out=out)
    assert not out.exists() or not any(out.iterdir())
