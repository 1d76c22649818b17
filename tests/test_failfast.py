"""Issue 10, fault injection as a new user would try it (tiny preset): every detectable fault stops the run before
training with a message naming the file or knob and the fix; nothing that existed before a failing run changes (the
tests compare those files byte for byte); a failed run's own log and JSON summary say why; the exit status says which
kind of failure it was (README, "Failing early, and exit statuses")."""
import dataclasses
import errno
import importlib.util
import io
import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lcq import artifact, pipeline
from lcq import record as R
from lcq.tools import submission as S
from lcq.checks import StartupError, check_train_ids
from lcq.config import Config, make_config
from lcq.data import HEADER_BYTES, MAGIC
from lcq.dist import DistInfo
from lcq.evaluate import EvalResult
from lcq.pipeline import (CLOCK_EXIT_CODE, CONFIG_EXIT_CODE, NONFINITE_EXIT_CODE, Interrupted, finish,
                          install_signal_handlers, open_run)
from lcq.files import atomic_write
from lcq.shipping import check_artifact_fits
from lcq.tools import artifact_tools

REPO = Path(__file__).resolve().parents[1]
GOOD_ROOT_JSON = b'{"val_bpb": 1.2345, "note": "a good earlier result"}\n'


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_unchanged(root: Path, before: dict[str, bytes]) -> None:
    after = snapshot(root)
    for name, blob in before.items():
        assert name in after, f"{name} was removed"
        assert after[name] == blob, f"{name} changed"


def temp_files(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*.tmp")]


def copy_data(demo_data, tmp_path: Path) -> tuple[Path, Path]:
    data, tok = (Path(p) for p in demo_data)
    shutil.copytree(data, tmp_path / "data")
    return tmp_path / "data", tok


def _entry():
    spec = importlib.util.spec_from_file_location("train_gpt_entry", REPO / "train_gpt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ENTRY = _entry()
KNOB_VARS = [f.name.upper() for f in dataclasses.fields(Config)] + ["PRESET"]


def settings(tmp_path, data_path, tok, run_id, env) -> dict[str, str]:
    root_json = tmp_path / "submission.json"
    if not root_json.exists():
        root_json.write_bytes(GOOD_ROOT_JSON)
    return {**dict(PRESET="tiny", DATA_PATH=str(data_path), TOKENIZER_PATH=str(tok), LOG_DIR=str(tmp_path / "logs"),
                   RUN_ID=run_id, SUBMISSION_JSON=str(root_json)), **{k: str(v) for k, v in env.items()}}


def run(tmp_path, data_path, tok, run_id, *args, **env):
    """train_gpt.py's main on the tiny preset, in this process (no interpreter + torch start-up per test), with tmp_path
    as the working directory and a good root submission.json already there. Returns (returncode, stderr)."""
    err = io.StringIO()
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        for name in KNOB_VARS:
            mp.delenv(name, raising=False)
        for k, v in settings(tmp_path, data_path, tok, run_id, env).items():
            mp.setenv(k, v)
        mp.chdir(tmp_path)
        mp.setattr(sys, "stderr", err)
        torch.set_num_threads(1)
        try:
            code = ENTRY.main(list(args))
        finally:
            torch.set_num_threads(threads)
            for s, h in saved.items():
                signal.signal(s, h)
    return SimpleNamespace(returncode=code, stderr=err.getvalue())


def outputs(tmp_path, run_id) -> tuple[str, dict]:
    log = (tmp_path / "logs" / f"{run_id}.txt").read_text()
    return log, json.loads((tmp_path / "logs" / f"{run_id}.json").read_text())


def assert_failed_before_training(proc, tmp_path, run_id, *needles):
    assert proc.returncode == CONFIG_EXIT_CODE, proc.stderr[-3000:]
    log, summary = outputs(tmp_path, run_id)
    for needle in needles:
        assert needle in proc.stderr and needle in log, (needle, proc.stderr[-2000:])
    assert "step:" not in log and "stage:warmup" not in log  # before warm-up and the first step
    assert [ln for ln in log.splitlines() if ln.startswith("error: ")], log[-2000:]
    assert summary["status"] == CONFIG_EXIT_CODE and all(n in summary["error"] for n in needles)
    assert not (tmp_path / "logs" / f"{run_id}.lcq").exists()


# ---------------------------------------------------------------------------------------------- start-up checks

def test_bad_magic_in_the_third_train_shard(tmp_path, demo_data):
    data, tok = copy_data(demo_data, tmp_path)
    bad = data / "fineweb_train_000002.bin"
    blob = bytearray(bad.read_bytes())
    blob[:4] = np.array([MAGIC + 1], dtype="<i4").tobytes()
    bad.write_bytes(bytes(blob))
    before = snapshot(tmp_path)
    proc = run(tmp_path, data, tok, "magic")
    assert_failed_before_training(proc, tmp_path, "magic", "fineweb_train_000002.bin", "bad magic", "re-download")
    assert_unchanged(tmp_path, before)


def test_truncated_train_shard(tmp_path, demo_data):
    data, tok = copy_data(demo_data, tmp_path)
    last = sorted(data.glob("fineweb_train_*.bin"))[-1]
    with open(last, "r+b") as f:
        f.truncate(last.stat().st_size - 1000)
    before = snapshot(tmp_path)
    proc = run(tmp_path, data, tok, "trunc")
    assert_failed_before_training(proc, tmp_path, "trunc", last.name, "re-download")
    assert_unchanged(tmp_path, before)


def test_val_token_id_past_the_vocab(tmp_path, demo_data):
    data, tok = copy_data(demo_data, tmp_path)
    val = data / "fineweb_val_000000.bin"
    blob = bytearray(val.read_bytes())
    blob[HEADER_BYTES + 2 * 100:HEADER_BYTES + 2 * 101] = np.array([1024], dtype="<u2").tobytes()  # VOCAB_SIZE is 1024
    val.write_bytes(bytes(blob))
    before = snapshot(tmp_path)
    proc = run(tmp_path, data, tok, "valid")
    assert_failed_before_training(proc, tmp_path, "valid", "fineweb_val_000000.bin", "token id 1024",
                                  "VOCAB_SIZE=1024")
    assert_unchanged(tmp_path, before)


def test_train_ids_are_range_checked_on_a_bounded_sample(tmp_path, demo_data):
    data, _ = copy_data(demo_data, tmp_path)
    files = sorted(str(p) for p in data.glob("fineweb_train_*.bin"))
    assert check_train_ids(files, 1024, sample_tokens=4096) <= 4096  # bounded, whatever the shard sizes
    bad = Path(files[1])
    blob = bytearray(bad.read_bytes())
    blob[HEADER_BYTES:HEADER_BYTES + 2] = np.array([4000], dtype="<u2").tobytes()  # every shard's first chunk is read
    bad.write_bytes(bytes(blob))
    with pytest.raises(StartupError, match="fineweb_train_000001.bin: token id 4000"):
        check_train_ids(files, 1024, sample_tokens=4096)


def test_missing_tokenizer_under_the_tiny_preset_names_the_file(tmp_path, demo_data):
    data, _ = demo_data
    proc = run(tmp_path, data, tmp_path / "nope.model", "notok")
    assert_failed_before_training(proc, tmp_path, "notok", "TOKENIZER_PATH", "nope.model", "no such file")
    assert "cannot build the demo data" not in proc.stderr


def test_reserve_split_must_add_up(tmp_path, demo_data):
    before = snapshot(tmp_path)
    proc = run(tmp_path, *demo_data, "reserve", MAX_WALLCLOCK_SECONDS=0.3, TRAIN_RESERVE_SECONDS=0.2)
    assert_failed_before_training(proc, tmp_path, "reserve", "TRAIN_RESERVE_SECONDS=0.2", "SERIALIZE_RESERVE_SECONDS",
                                  "GPTQ_MIN_SECONDS")
    assert_unchanged(tmp_path, before)


def test_not_enough_disk_for_the_artifact_stops_at_start(tmp_path, demo_data):
    # a cap no disk has free: the check compares free space with cap + margin before anything is trained
    proc = run(tmp_path, *demo_data, "disk", ARTIFACT_CAP_BYTES=10**18)
    assert_failed_before_training(proc, tmp_path, "disk", "LOG_DIR", "bytes free")


def test_artifact_path_of_another_run_is_never_overwritten(tmp_path, demo_data):
    other = tmp_path / "other_run.lcq"
    other.write_bytes(b"another run's artifact")
    before = snapshot(tmp_path)
    proc = run(tmp_path, *demo_data, "clash", ARTIFACT_PATH=other)
    assert_failed_before_training(proc, tmp_path, "clash", "ARTIFACT_PATH", "already exists")
    assert_unchanged(tmp_path, before)


# ---------------------------------------------------------------------------------------------- during the run

def test_nan_loss_stops_training_and_ships_nothing(tmp_path, demo_data):
    before = snapshot(tmp_path)
    proc = run(tmp_path, *demo_data, "nan", MATRIX_LR=1e6, EMBED_LR=1e6, SCALAR_LR=1e6, QUANT_METHOD="rtn",
               LCQ_RANK=0)
    assert proc.returncode == NONFINITE_EXIT_CODE, proc.stderr[-3000:]
    log, summary = outputs(tmp_path, "nan")
    assert "non-finite" in proc.stderr and "MATRIX_LR" in proc.stderr
    error = [ln for ln in log.splitlines() if ln.startswith("error: ")]
    assert len(error) == 1 and "at step" in error[0] and "MATRIX_LR" in error[0]
    assert summary["status"] == NONFINITE_EXIT_CODE and "non-finite" in summary["error"]
    assert "stage:gptq" not in log and "gate:" not in log and "val_bpb" not in log  # never quantized or scored
    assert not (tmp_path / "logs" / "nan.lcq").exists()
    assert_unchanged(tmp_path, before)  # the good root submission.json included


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_data):
    """One tiny run (LCQ off, to keep it short) whose artifact the eval-only tests score."""
    tmp = tmp_path_factory.mktemp("failfast_src")
    proc = run(tmp, *demo_data, "src", LCQ_RANK=0)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp


def test_eval_only_refuses_another_tokenizer(trained, tmp_path, demo_data):
    data, tok = demo_data
    # the same pieces plus one unknown protobuf field (1000, varint 1): sentencepiece loads it, but it is another file
    other = tmp_path / "other.model"
    other.write_bytes(Path(tok).read_bytes() + bytes([0xC0, 0x3E, 0x01]))
    art = trained / "logs" / "src.lcq"
    before = snapshot(trained)
    proc = run(tmp_path, data, other, "evaltok", "--eval_only", "--artifact", str(art))
    assert proc.returncode == CONFIG_EXIT_CODE, proc.stderr[-3000:]
    log, summary = outputs(tmp_path, "evaltok")
    assert "trained with a tokenizer of sha256" in proc.stderr and "TOKENIZER_PATH" in proc.stderr
    assert "val_bpb" not in log and summary["status"] == CONFIG_EXIT_CODE
    assert_unchanged(trained, before)
    # the vocabulary size is part of the identity too
    tensors, meta = artifact.load(art)
    cfg = make_config("tiny", data_path=str(data), tokenizer_path=str(tok), vocab_size=2048)
    with pytest.raises(artifact.ArtifactError, match="vocab 1024.*vocab 2048"):
        check_artifact_fits(str(art), meta, cfg, int(meta["bos_id"]))


def test_eval_only_logs_the_model_knobs_it_ignores(trained, tmp_path, demo_data):
    art = trained / "logs" / "src.lcq"
    proc = run(tmp_path, *demo_data, "evalknobs", "--eval_only", "--artifact", str(art), NUM_LAYERS=5, MODEL_DIM=96)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log, summary = outputs(tmp_path, "evalknobs")
    line = next(ln for ln in log.splitlines() if ln.startswith("eval_only: "))
    assert "IGNORED" in line and "NUM_LAYERS=5->2" in line and "MODEL_DIM=96->64" in line
    assert summary["config"]["num_layers"] == 2 and summary["config_ignored"] == {"num_layers": 5, "model_dim": 96}
    src_log = (trained / "logs" / "src.txt").read_text()
    score = [ln for ln in src_log.splitlines() if ln.startswith("quantized_exact")]
    assert score and score[0] in log  # the artifact's own shape ran: the same score as the run that wrote it


def test_training_clock_exceeded_is_loud_and_not_submitted(tmp_path, demo_data):
    # A 1 ms clock: one training step of the tiny model (~1 GFLOP forward + backward) alone takes far longer on any
    # CPU, so the clock is exceeded whatever the machine.
    before = snapshot(tmp_path)
    proc = run(tmp_path, *demo_data, "clock", MAX_WALLCLOCK_SECONDS=0.001, TRAIN_RESERVE_SECONDS=0.0005,
               SERIALIZE_RESERVE_SECONDS=0, LCQ_SAFETY_SECONDS=0, GPTQ_MIN_SECONDS=0, LCQ_RANK=0)
    assert proc.returncode == CLOCK_EXIT_CODE, proc.stderr[-3000:]
    log, summary = outputs(tmp_path, "clock")
    line = next(ln for ln in log.splitlines() if ln.startswith("CLOCK EXCEEDED: training clock"))
    # the first charged stage is the post-training probe (lcq/clock.py, issue 28), which alone passes 1 ms
    assert "MAX_WALLCLOCK_SECONDS=0.001" in line and "out during stage probe" in line
    assert summary["status"] == CLOCK_EXIT_CODE and "CLOCK EXCEEDED" in summary["error"]
    assert "not written" in log
    assert_unchanged(tmp_path, before)


def test_eval_budget_exceeded_is_loud(tmp_path, demo_data):
    # 1 microsecond: scoring 4096 val tokens through any model takes longer
    proc = run(tmp_path, *demo_data, "evalclock", EVAL_BUDGET_SECONDS=1e-6, LCQ_RANK=0, ITERATIONS=2)
    assert proc.returncode == CLOCK_EXIT_CODE, proc.stderr[-3000:]
    log, _ = outputs(tmp_path, "evalclock")
    assert any(ln.startswith("CLOCK EXCEEDED: eval of quantized") for ln in log.splitlines())
    assert (tmp_path / "submission.json").read_bytes() == GOOD_ROOT_JSON


def test_error_after_start_up_is_in_the_log_and_the_summary(tmp_path, demo_data, monkeypatch):
    # an unexpected fault in the LCQ stage, after training and GPTQ (a bad LCQ_TARGETS is found before step 1 now)
    def fault(*args):
        raise RuntimeError("injected LCQ fault")
    monkeypatch.setattr(pipeline, "lcq_stage", fault)
    before = snapshot(tmp_path)
    proc = run(tmp_path, *demo_data, "late", ITERATIONS=2)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "injected LCQ fault" in proc.stderr  # the traceback stays on stderr
    log, summary = outputs(tmp_path, "late")
    error = [ln for ln in log.splitlines() if ln.startswith("error: ")]
    assert len(error) == 1 and "injected LCQ fault" in error[0] and "stage:gptq" in log
    assert summary["status"] == 1 and "injected LCQ fault" in summary["error"]
    assert_unchanged(tmp_path, before)


def test_disk_full_while_writing_names_the_file(tmp_path, monkeypatch):
    path = tmp_path / "run.train_gpt.py"
    path.write_bytes(b"the previous script")

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="run.train_gpt.py") as e:
        atomic_write(path, b"new bytes")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.train_gpt.py"]  # no temp file left
    assert path.read_bytes() == b"the previous script"


def test_a_non_finite_score_fails_the_run_and_writes_no_submission_json(tmp_path, demo_data):
    root_json = tmp_path / "submission.json"
    root_json.write_bytes(GOOD_ROOT_JSON)
    cfg = make_config("tiny", data_path=demo_data[0], tokenizer_path=demo_data[1], log_dir=str(tmp_path / "logs"),
                      run_id="nanscore", submission_json=str(root_json))
    run = open_run(cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    run.scores["quantized"] = EvalResult(val_loss=float("nan"), val_bpb=float("nan"), tokens=10, bytes=20, seconds=0.1)
    assert finish(run, time.perf_counter()) == NONFINITE_EXIT_CODE
    log, summary = outputs(tmp_path, "nanscore")
    assert "SCORE NOT FINITE: quantized val_loss nan" in log and "not written" in log
    assert summary["status"] == NONFINITE_EXIT_CODE and "SCORE NOT FINITE" in summary["error"]
    assert root_json.read_bytes() == GOOD_ROOT_JSON


# ---------------------------------------------------------------------------------------------- signals

def test_sigterm_while_writing_the_artifact_leaves_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "run.lcq"
    path.write_bytes(b"the previous artifact")
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    install_signal_handlers()
    try:
        # deliver SIGTERM at the worst moment: the bytes are in the temp file, not yet renamed
        monkeypatch.setattr(os, "fsync", lambda fd: os.kill(os.getpid(), signal.SIGTERM))
        with pytest.raises(Interrupted):
            artifact_tools.save(path, {"w": torch.ones(4)}, {"format": "x"}, "lzma")
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.lcq"]
    assert path.read_bytes() == b"the previous artifact"


def test_sigterm_mid_run_is_logged_and_cleans_up(tmp_path, demo_data):
    before = snapshot(tmp_path)
    log_path = tmp_path / "logs" / "term.txt"
    done = threading.Event()

    def sigterm_at_step_2():  # as torchrun or a scheduler would send it, to this process, mid-training
        while not done.is_set():
            if log_path.exists() and "step:2/" in log_path.read_text():
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.02)
    killer = threading.Thread(target=sigterm_at_step_2)
    killer.start()
    try:
        # a 50 s training budget and no step limit: the signal lands while training runs
        proc = run(tmp_path, *demo_data, "term", ITERATIONS=1_000_000, TRAIN_LOG_EVERY=1)
    finally:
        done.set()
        killer.join()
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    assert "interrupted by SIGTERM" in proc.stderr
    log, summary = outputs(tmp_path, "term")
    assert [ln for ln in log.splitlines() if ln.startswith("interrupted: interrupted by SIGTERM")]
    assert summary["status"] == 128 + signal.SIGTERM and "SIGTERM" in summary["error"]
    assert not temp_files(tmp_path)
    assert_unchanged(tmp_path, before)


# ---------------------------------------------------------------------------------------------- submission tools

def test_a_nan_score_is_refused_by_name(trained):
    summary = json.loads((trained / "logs" / "src.json").read_text())
    summary["final"]["val_bpb"] = float("nan")
    with pytest.raises(S.SubmissionError, match="val_bpb is nan, not a finite score"):
        R.run_record(summary)
    text = (trained / "logs" / "src.txt").read_text()
    nan_log = "\n".join("final_exact val_loss:nan val_bpb:nan" if ln.startswith("final_exact") else ln
                        for ln in text.splitlines())
    folder = trained / "audit_nan"
    folder.mkdir()
    (folder / "train_seed1337.log").write_text(nan_log)
    (folder / "submission.json").write_text(json.dumps({"val_bpb": None, "val_loss": None}))
    failed = {c.name for c in S.audit(folder) if not c.ok}
    assert {"score_finite[seed 1337]", "json_score_finite"} <= failed


# ---------------------------------------------------------------------------------------------- issue 17: names, folders, claims

def assert_stopped_unlogged(proc, *needles):
    """A failure found before the log can open (its folder or its name is the fault): exit 2, the message on stderr
    naming the knob, no traceback."""
    assert proc.returncode == CONFIG_EXIT_CODE, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr[-2000:])


@pytest.mark.parametrize("run_id", ["../escape", "/tmp/abs", "a/b", "x" * 240, ".hidden"])
def test_a_run_id_that_is_not_a_plain_name_stops_before_anything_is_written(tmp_path, demo_data, run_id):
    (tmp_path / "inner").mkdir()
    before = snapshot(tmp_path)
    proc = run(tmp_path / "inner", *demo_data, run_id)
    assert_stopped_unlogged(proc, "RUN_ID=")
    assert snapshot(tmp_path).keys() - before.keys() <= {"inner/submission.json"}  # the good root file run() puts there
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "inner" / "logs").exists()


def test_log_dir_on_a_regular_file_names_the_knob(tmp_path, demo_data):
    (tmp_path / "afile").write_bytes(b"not a folder")
    before = snapshot(tmp_path)
    proc = run(tmp_path, *demo_data, "logfile", LOG_DIR=tmp_path / "afile" / "logs")
    assert_stopped_unlogged(proc, "LOG_DIR", "afile")
    assert_unchanged(tmp_path, before)


@pytest.mark.parametrize("knob", ["ARTIFACT_PATH", "EVAL_DUMP", "SUBMISSION_JSON"])
def test_an_output_folder_that_takes_no_file_stops_before_training(tmp_path, demo_data, knob):
    (tmp_path / "afile").write_bytes(b"not a folder")
    before = snapshot(tmp_path)
    proc = run(tmp_path, *demo_data, "folder", **{knob: tmp_path / "afile" / "out.x"})
    assert_failed_before_training(proc, tmp_path, "folder", knob, "afile")
    assert_unchanged(tmp_path, before)
    assert not [p for p in (tmp_path / "logs").iterdir() if p.suffix not in (".txt", ".json")]  # claims released


def test_a_file_size_limit_below_the_cap_stops_before_training(tmp_path, demo_data):
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (8 << 20, hard))  # a log and a JSON fit; a 16 MB artifact would not
    try:
        proc = run(tmp_path, *demo_data, "fsize")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert_failed_before_training(proc, tmp_path, "fsize", "ulimit -f", "ARTIFACT_CAP_BYTES")


def test_submission_json_may_not_be_another_runs_summary(trained, tmp_path, demo_data):
    other = trained / "logs" / "src.json"
    before = snapshot(trained)
    proc = run(tmp_path, *demo_data, "subjson", SUBMISSION_JSON=other)
    assert_failed_before_training(proc, tmp_path, "subjson", "SUBMISSION_JSON", "src.json", "a run's output")
    assert_unchanged(trained, before)


def test_two_runs_racing_for_one_output_exactly_one_claims_it(tmp_path):
    from lcq.checks import claim
    path, wins, losses = str(tmp_path / "shared.lcq"), [], []
    barrier = threading.Barrier(8)

    def contender():
        barrier.wait()
        try:
            wins.append(claim("ARTIFACT_PATH", path))
        except StartupError as e:
            losses.append(str(e))
    threads = [threading.Thread(target=contender) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and len(losses) == 7 and all("ARTIFACT_PATH" in m for m in losses)


def test_a_second_run_on_a_live_runs_artifact_path_stops_and_the_first_keeps_its_files(tmp_path, demo_data):
    art = tmp_path / "shared.lcq"
    cfg = make_config("tiny", data_path=demo_data[0], tokenizer_path=demo_data[1], log_dir=str(tmp_path / "logs"),
                      run_id="first", artifact_path=str(art), submission_json="")
    first = open_run(cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    try:
        assert art.exists()  # claimed at start-up, before training
        before = snapshot(tmp_path)
        proc = run(tmp_path, *demo_data, "second", ARTIFACT_PATH=art)
        assert_failed_before_training(proc, tmp_path, "second", "ARTIFACT_PATH", "already exists")
        assert_unchanged(tmp_path, {k: v for k, v in before.items() if not k.startswith("logs/second")})
    finally:
        first.log.close()


def test_stale_temp_files_are_swept_when_named_for_this_run_and_reported_otherwise(tmp_path, demo_data):
    logs = tmp_path / "logs"
    logs.mkdir()
    mine, theirs = logs / ".sweep.lcq.k2j4.tmp", logs / ".other.lcq.x9q1.tmp"
    mine.write_bytes(b"a complete artifact of a run killed by SIGKILL")
    theirs.write_bytes(b"maybe a live run's write")
    cfg = make_config("tiny", data_path=demo_data[0], tokenizer_path=demo_data[1], log_dir=str(logs), run_id="sweep",
                      submission_json="")
    r = open_run(cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    r.log.close()
    log = (logs / "sweep.txt").read_text()
    assert not mine.exists() and f"temp_files_removed: {mine}" in log
    assert theirs.read_bytes() == b"maybe a live run's write" and f"temp_files_of_other_runs: {theirs}" in log


# ---------------------------------------------------------------------------------------------- issue 17: data gaps

def test_a_val_split_with_no_scored_token_is_refused_at_start(tmp_path, demo_data):
    from lcq.data import write_shard
    data, tok = copy_data(demo_data, tmp_path)
    write_shard(data / "fineweb_val_000000.bin", np.zeros(0, dtype=np.uint16))
    before = snapshot(tmp_path)
    proc = run(tmp_path, data, tok, "emptyval")
    assert_failed_before_training(proc, tmp_path, "emptyval", "0 val token(s), none scored", "DATA_PATH")
    assert_unchanged(tmp_path, before)


def test_a_val_split_without_bos_is_refused_at_start(tmp_path, demo_data):
    from lcq.data import read_shard, write_shard
    data, tok = copy_data(demo_data, tmp_path)
    val = data / "fineweb_val_000000.bin"
    toks = np.asarray(read_shard(val)).copy()
    toks[toks == 1] = 5  # the demo tokenizer's BOS is id 1
    write_shard(val, toks)
    proc = run(tmp_path, data, tok, "nobos")
    assert_failed_before_training(proc, tmp_path, "nobos", "no BOS id 1: one document")


def test_a_train_id_past_the_vocab_found_while_training_names_shard_and_position(tmp_path, demo_data):
    from lcq.data import ShardError, TrainLoader
    data, _ = copy_data(demo_data, tmp_path)
    files = sorted(data.glob("fineweb_train_*.bin"))
    blob = bytearray(files[0].read_bytes())
    pos = 5000  # between the start-up sample's chunks (4 per shard, 4096 tokens in all here)
    blob[HEADER_BYTES + 2 * pos:HEADER_BYTES + 2 * pos + 2] = np.array([4000], dtype="<u2").tobytes()
    files[0].write_bytes(bytes(blob))
    assert check_train_ids([str(f) for f in files], 1024, sample_tokens=4096)  # the sample misses it
    loader = TrainLoader(str(data / "fineweb_train_*.bin"), 0, 1, torch.device("cpu"), vocab_size=1024)
    loader.next_batch(4096, 256, 1)  # positions 0..4096 are clean
    with pytest.raises(ShardError, match=f"fineweb_train_000000.bin: token id 4000 at position {pos} >= VOCAB_SIZE"):
        loader.next_batch(4096, 256, 1)


def test_eval_only_ttt_from_the_artifact_is_refused_before_the_first_scored_stage(trained, tmp_path, demo_data):
    art = trained / "logs" / "src.lcq"  # trained with LCQ off: no LoRA section
    before = snapshot(trained)
    proc = run(tmp_path, *demo_data, "tttinit", "--eval_only", "--artifact", str(art), TTT_ENABLED=1,
               TTT_INIT="artifact")
    assert_failed_before_training(proc, tmp_path, "tttinit", "TTT_INIT=artifact", "ships no LoRA")
    assert "val_bpb" not in outputs(tmp_path, "tttinit")[0]
    assert_unchanged(trained, before)


# ---------------------------------------------------------------------------------------------- issue 17: ranks

def test_a_start_up_failure_on_rank_1_is_in_rank_0s_log_with_status_2(tmp_path, demo_data, free_port):
    import subprocess
    good, tok = demo_data
    bad, _ = copy_data(demo_data, tmp_path)
    shard = bad / "fineweb_train_000001.bin"
    blob = bytearray(shard.read_bytes())
    blob[:4] = np.array([MAGIC + 1], dtype="<i4").tobytes()
    shard.write_bytes(bytes(blob))
    procs = []
    for rank, data in ((0, good), (1, bad)):  # one host, one shard each rank sees differently (another node's disk)
        env = {k: v for k, v in os.environ.items() if k not in KNOB_VARS}
        env.update(settings(tmp_path, data, tok, "ranks", {}), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        procs.append(subprocess.Popen([sys.executable, str(REPO / "train_gpt.py")], cwd=tmp_path, env=env,
                                      stderr=subprocess.PIPE, text=True))
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [CONFIG_EXIT_CODE, CONFIG_EXIT_CODE], errs
    log, summary = outputs(tmp_path, "ranks")
    assert "error: rank 1: " in log and "bad magic" in log and "step:" not in log
    assert summary["status"] == CONFIG_EXIT_CODE and summary["error"].startswith("rank 1: ")


def test_audit_cross_checks_a_logs_own_numbers(trained):
    text = (trained / "logs" / "src.txt").read_text()
    score = next(ln for ln in text.splitlines() if ln.startswith("final_exact"))
    better = score.split(" val_bpb:")[0] + " val_bpb:3.00000000"

    def failed(log_text: str, name: str) -> set[str]:
        folder = trained / name
        folder.mkdir()
        (folder / "train_seed1337.log").write_text(log_text)
        return {c.name for c in S.audit(folder) if not c.ok}
    assert not {"final_is_last_stage[seed 1337]", "bpb_from_loss[seed 1337]"} & failed(text, "audit_honest")
    # the final line and the stage line edited together: the arithmetic still gives the old score
    both = text.replace(score.replace("final_exact", "quantized_exact"), better.replace("final_exact", "quantized_exact"))
    assert "bpb_from_loss[seed 1337]" in failed(both.replace(score, better), "audit_both")
    # only the final line edited: it no longer repeats the last stage
    assert "final_is_last_stage[seed 1337]" in failed(text.replace(score, better), "audit_final")
