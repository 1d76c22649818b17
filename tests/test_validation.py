"""Issue 28: every value knowable before step 1 is refused before step 1, by one validation pass, naming the knob."""
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import test_failfast as F
from lcq import checks, pipeline
from lcq import train as T
from lcq.checks import StartupError
from lcq.config import _BOUNDS, _CHECKED, _CHOICES, _TEXT, Config, ConfigError, knob_docs, make_config, resolve
from lcq.data import HEADER_BYTES


def field_type(f) -> str:
    return f.type if isinstance(f.type, str) else f.type.__name__


def test_every_field_has_a_range_or_a_stated_check():
    """Fails when a new field comes without its range: add it to config._BOUNDS (numbers) or _CHOICES / _CHECKED /
    _TEXT (strings)."""
    bounded = {n for _, _, names in _BOUNDS for n in names.split()}
    strings = set(_CHOICES) | set(_CHECKED.split()) | set(_TEXT.split())
    missing = []
    for f in dataclasses.fields(Config):
        kind = field_type(f)
        if kind in ("int", "float") and f.name not in bounded or kind == "str" and f.name not in strings:
            missing.append(f.name)
        assert kind in ("int", "float", "str", "bool"), f"{f.name}: type {kind} has no validation rule"
    assert not missing, f"fields with no range: {missing}"
    assert not bounded - {f.name for f in dataclasses.fields(Config)}, "a range names no field"


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(Config) if field_type(f) == "float"])
def test_every_float_knob_refuses_nan_and_inf(name):
    for bad in ("inf", "-inf", "nan"):
        with pytest.raises(ConfigError, match=name.upper()):
            resolve(env={"PRESET": "tiny", name.upper(): bad})


@pytest.mark.parametrize("knob, value", [
    ("LCQ_ALPHA", "inf"), ("GPTQ_DAMP", "inf"), ("MAX_WALLCLOCK_SECONDS", "inf"), ("EVAL_BUDGET_SECONDS", "inf"),
    ("TTT_LR", "inf"), ("LCQ_LR", "inf"), ("LCQ_TEMPERATURE", "1e-30"), ("ADAM_EPS", "-1e-8"), ("ADAM_EPS", "nan"),
    ("TIED_EMBED_INIT_STD", "nan"), ("GPTQ_DAMP", "2"), ("LEAKY_RELU_SLOPE", "-0.5"), ("SEED", "-1"),
])
def test_the_issue_rows_are_config_errors(knob, value):
    """Each of issue 28's float rows: refused at resolve, before anything is built, naming the knob."""
    with pytest.raises(ConfigError, match=f"^{knob}="):
        resolve(env={"PRESET": "tiny", knob: value})


def test_a_typo_in_the_environment_or_the_command_line_says_did_you_mean():
    with pytest.raises(ConfigError, match="TTT_ENABLE is no knob; did you mean TTT_ENABLED"):
        resolve(env={"TTT_ENABLE": "1"})
    with pytest.raises(ConfigError, match="LCQ_TARGET is no knob; did you mean LCQ_TARGETS"):
        resolve(env={"LCQ_TARGET": "lm_head"})
    with pytest.raises(ConfigError, match="TTT_LEARNING_RATE is no knob; did you mean TTT_"):  # by its prefix
        resolve(env={"TTT_LEARNING_RATE": "1e-4"})
    with pytest.raises(ConfigError, match="did you mean --ttt_enabled"):
        resolve(["--ttt_enable=1"], env={})
    # what launchers, shells and libraries set is not ours: no refusal
    harmless = dict(HOME="/root", USER="x", PATH="/bin", RANK="0", WORLD_SIZE="8", LOCAL_RANK="0",
                    LOCAL_WORLD_SIZE="8", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500", OMP_NUM_THREADS="1",
                    CUDA_VISIBLE_DEVICES="0", TORCHELASTIC_RUN_ID="x", NCCL_DEBUG="INFO", MAX_JOBS="4",
                    TRITON_INTERPRET="1", MATCHED_FINEWEB_REPO_ID="x", PYTHONPATH=".", TTT_ENABLE="")
    assert resolve(env=harmless)[0].preset == "record"


def test_knob_docs_is_the_field_list_with_its_comments():
    docs = knob_docs()
    assert [d["name"] for d in docs] == [f.name.upper() for f in dataclasses.fields(Config)]
    by = {d["name"]: d for d in docs}
    assert by["TTT_LR"]["comment"] == "Adam on the adapter (#1855: 1e-4)" and by["TTT_LR"]["record"] == "8e-05"
    assert by["TTT_LR"]["group"].startswith("score-first test-time training")
    assert by["TTT_ENABLED"]["default"] == "0" and by["TTT_ENABLED"]["record"] == "1"
    assert by["RUN_ID"]["default"] == '""'
    # a comment block above the field is its comment too
    assert by["TRAIN_RESERVE_SECONDS"]["comment"].startswith("seconds of the cap kept back")


def test_help_prints_usage_and_every_knob():
    proc = subprocess.run([sys.executable, str(F.REPO / "train_gpt.py"), "--help"], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=str(F.REPO)))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("lcq entry point") and "--eval_only --artifact" in proc.stdout
    for f in dataclasses.fields(Config):
        assert any(ln.startswith(f"  {f.name.upper()}=") for ln in lines), f.name
    assert max(map(len, lines)) < 600  # a table, not one 2,179-character line


def test_the_download_hint_names_the_record_preset_variant(tmp_path):
    cfg = make_config("record", tokenizer_path=str(tmp_path / "none.model"))
    with pytest.raises(StartupError, match="download --variant caseops"):
        checks.check_tokenizer_file(cfg)
    assert checks.download_hint("./data/datasets/fineweb10B_sp1024").endswith("--variant sp1024")


def test_preflight_on_missing_data_says_why_without_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lcq.tools.preflight", "--preset", "tiny", "--data_path",
                           str(tmp_path / "none")], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=str(F.REPO), RUN_ID="pfmissing"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "verdict: NO-GO: preflight stopped: StartupError: TOKENIZER_PATH=" in proc.stdout
    assert not [p for p in (tmp_path / "logs").iterdir() if p.stat().st_size == 0]


# ---------------------------------------------------------------------------------------------- against the model

@pytest.mark.parametrize("run_id, env, needle", [
    ("lcqnone", dict(LCQ_TARGETS="nothing.*"), "LCQ_TARGETS: target pattern 'nothing.*' matches no module"),
    ("lcqnonlinear", dict(LCQ_TARGETS="blocks.0.attn"), "LCQ_TARGETS matches modules that are not linear"),
    ("tttnone", dict(TTT_ENABLED=1, TTT_TARGETS="zzz"), "TTT_TARGETS: target pattern 'zzz' matches no module"),
    ("bakedhead", dict(LCQ_MERGE="baked", LCQ_TARGETS="lm_head"), "LCQ_MERGE=baked cannot target lm_head"),
])
def test_module_patterns_are_resolved_before_step_1(tmp_path, demo_data, run_id, env, needle):
    proc = F.run(tmp_path, *demo_data, run_id, **env)
    F.assert_failed_before_training(proc, tmp_path, run_id, needle, "found before training")


def test_a_bad_id_in_the_calibration_batches_is_found_before_step_1(tmp_path, demo_data, monkeypatch):
    """A train id >= VOCAB_SIZE inside the first GPTQ_CALIB_TOKENS of the stream, where the start-up sample does not
    look (at record scale it reads ~1M of 8G tokens; here it is cut to 64 tokens to leave the same gap)."""
    data, tok = F.copy_data(demo_data, tmp_path)
    shard = data / "fineweb_train_000000.bin"
    blob = bytearray(shard.read_bytes())
    at = HEADER_BYTES + 2 * 1000  # token 1000: inside tiny's 2,048 calibration tokens, between the sampled chunks
    blob[at:at + 2] = np.array([1500], dtype="<u2").tobytes()
    shard.write_bytes(bytes(blob))
    sparse = checks.check_train_ids
    monkeypatch.setattr(pipeline, "check_train_ids", lambda files, vocab: sparse(files, vocab, sample_tokens=64))
    proc = F.run(tmp_path, data, tok, "calib")
    F.assert_failed_before_training(proc, tmp_path, "calib", "fineweb_train_000000.bin", "token id 1500",
                                    "found before training")


# ---------------------------------------------------------------------------------------------- eval-only, logging

@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_data):
    """A tiny run (LCQ off) with a step line every step from the wall-clock rule alone (TRAIN_LOG_EVERY=1000)."""
    tmp = tmp_path_factory.mktemp("validation_src")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(T, "LOG_SECONDS", 0.0)
        proc = F.run(tmp, *demo_data, "src", LCQ_RANK=0, ITERATIONS=6, TRAIN_LOG_EVERY=1000)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp


def test_a_step_line_comes_at_least_every_log_seconds(trained):
    log = (trained / "logs" / "src.txt").read_text()
    assert [int(ln.split("/")[0][5:]) for ln in log.splitlines() if ln.startswith("step:")] == [1, 2, 3, 4, 5, 6]


def test_eval_only_takes_preset_and_tokenizer_from_the_artifact(trained, tmp_path):
    """`train_gpt.py --eval_only --artifact RUN.lcq` with no PRESET, DATA_PATH or TOKENIZER_PATH: the artifact's own
    (issue 28: the demo's artifact asked for the record preset's CaseOps tokenizer)."""
    art = str(trained / "logs" / "src.lcq")
    src = json.loads((trained / "logs" / "src.json").read_text())
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with pytest.MonkeyPatch.context() as mp:
        for name in F.KNOB_VARS:
            mp.delenv(name, raising=False)
        mp.chdir(tmp_path)
        for k, v in dict(LOG_DIR=str(tmp_path / "logs"), RUN_ID="evalmeta", SUBMISSION_JSON="").items():
            mp.setenv(k, v)
        cfg, _ = resolve(["--eval_only", "--artifact", art], recorded=F.ENTRY.recorded_run)
        assert cfg.preset == "tiny" and cfg.tokenizer_path == src["config"]["tokenizer_path"]
        try:
            code = F.ENTRY.main(["--eval_only", "--artifact", art])
        finally:
            for s, h in saved.items():
                signal.signal(s, h)
    assert code == 0
    mine = json.loads((tmp_path / "logs" / "evalmeta.json").read_text())
    assert mine["config"]["preset"] == "tiny" and mine["config"]["data_path"] == src["config"]["data_path"]
    assert mine["final"]["val_bpb"] == src["scores"]["quantized"]["val_bpb"]
    # a preset named on the command line wins; the artifact's tokenizer and data still come with it
    cfg, _ = resolve(["--eval_only", "--artifact", art, "--preset", "demo"], env={}, recorded=F.ENTRY.recorded_run)
    assert cfg.preset == "demo" and cfg.tokenizer_path == src["config"]["tokenizer_path"]
