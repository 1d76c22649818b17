"""`python -m lcq.preflight` on the tiny preset: the go/no-go table, its JSON line, and a no-go that exits non-zero."""
import json
import os
import subprocess
import sys

ROWS = ("setup", "attention", "compile", "collective", "train", "memory", "gptq", "serialize", "eval", "artifact", "ledger")


def preflight(tmp_path, demo_data, *args, nproc=1, extra_env=None):
    data_path, tokenizer_path = demo_data
    env = dict(os.environ, PRESET="tiny", DATA_PATH=str(data_path), TOKENIZER_PATH=str(tokenizer_path),
               LOG_DIR=str(tmp_path / "logs"), OMP_NUM_THREADS="1", **(extra_env or {}))
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [sys.executable, *launcher, "-m", "lcq.preflight", "--steps", "2", *args]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    lines = proc.stdout.strip().splitlines()
    report = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
    return proc, lines, report


def table(lines):
    """{row: status} from the printed table (rows start at column 0, statuses follow the name)."""
    return {line.split()[0]: line.split()[1] for line in lines if line.split() and line.split()[0] in ROWS}


def test_tiny_preflight_prints_every_row_and_goes(tmp_path, demo_data):
    proc, lines, report = preflight(tmp_path, demo_data, extra_env={"RUN_ID": "pf"})
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    assert table(lines).keys() == set(ROWS) and "NO-GO" not in table(lines).values()
    assert any(line.startswith("verdict: GO") for line in lines)
    assert report["preflight"] == "go" and report["failed"] == [] and set(report["rows"]) == set(ROWS)
    rows = report["rows"]
    assert rows["setup"]["kernels"] == "torch reference" and rows["setup"]["missing"] == {}  # a CPU run needs no GPU piece
    assert rows["attention"]["backend"] == "sdpa" and rows["attention"]["max_abs_diff"] <= rows["attention"]["tol"]
    assert rows["train"]["timed_steps"] == 2 and rows["train"]["ms_per_step"] > 0
    assert 1 <= rows["train"]["projected_steps"] <= 12  # the tiny preset's ITERATIONS caps the projection
    # the bytes projection adds up and uses the real pieces: the shipped script, a model no smaller than the current
    # weights' artifact, rank-8 LoRA factors
    art = rows["artifact"]
    assert art["total"] == art["code"] + max(art["model_current"], art["model_gaussian"]) + art["lora"]
    assert art["code"] > 0 and art["lora_rank"] == 8 and art["lora"] > 0
    ev = rows["eval"]
    # tiny reads the first VAL_MAX_TOKENS=4096 tokens; the headers count the whole val shard
    assert ev["val_tokens_scored"] == 4096 <= ev["val_tokens_in_shards"]
    # every target except the stream's first is scored once, and windows overlap, so forward tokens >= targets
    assert ev["forward_tokens"] >= 4095 and ev["projected_s"] > 0
    ledger = rows["ledger"]
    assert ledger["train"]["seconds"] == 50.0 and ledger["total"] <= 60.0  # tiny: 60 s cap, 10 s reserve
    # the run writes its own log and summary, never ones a real run would use
    assert (tmp_path / "logs" / "preflight_pf.txt").exists()
    summary = json.loads((tmp_path / "logs" / "preflight_pf.json").read_text())
    assert summary["preflight"]["rows"].keys() == report["rows"].keys() and summary["status"] == 0


def test_no_go_under_torchrun_names_the_failing_rows(tmp_path, demo_data):
    # A 60 KB cap cannot hold the tiny model's int6/int8 codes alone (~80 KB for 156 K parameters, before the ~45 KB
    # shipped script), and a 1 ms eval budget is far below any eval pass (thousands of forward tokens): both rows fail and
    # the process exits non-zero. TTT on: its pass is timed through lcq.ttt on both ranks and projected too.
    proc, lines, report = preflight(tmp_path, demo_data, "--eval_budget_seconds=0.001", "--ttt_enabled=1", nproc=2,
                                    extra_env={"ARTIFACT_CAP_BYTES": "60000", "RUN_ID": "pf2"})
    assert proc.returncode != 0
    statuses = table(lines)
    assert statuses["artifact"] == statuses["eval"] == "NO-GO"
    assert statuses["collective"] == "GO" and statuses["train"] == "GO"
    assert report["preflight"] == "no-go" and {"artifact", "eval"} <= set(report["failed"])
    assert report["world_size"] == 2 and report["rows"]["collective"]["ok"]
    assert report["rows"]["eval"]["ttt_projected_s"] > 0
    assert any(line.startswith("verdict: NO-GO") and "artifact" in line for line in lines)
