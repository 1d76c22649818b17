import json

import pytest

from lcq.config import PRESETS, Config, ConfigError, make_config, resolve


def test_precedence_default_preset_env_cli():
    cfg, _ = resolve([], env={})
    assert cfg.preset == "record" and cfg.train_seq_len == 2048 and cfg.max_wallclock_seconds == 600
    cfg, _ = resolve(["--preset", "demo"], env={})
    assert cfg.train_seq_len == PRESETS["demo"]["train_seq_len"]
    cfg, _ = resolve([], env={"PRESET": "demo", "TRAIN_SEQ_LEN": "128", "SEED": "7"})
    assert (cfg.preset, cfg.train_seq_len, cfg.seed) == ("demo", 128, 7)
    cfg, _ = resolve(["--train_seq_len=96", "--seed", "9"], env={"PRESET": "demo", "TRAIN_SEQ_LEN": "128"})
    assert (cfg.train_seq_len, cfg.seed) == (96, 9)


def test_official_knobs_are_env_settable():
    env = {"DATA_PATH": "/d", "TOKENIZER_PATH": "/t.model", "VOCAB_SIZE": "8192", "RUN_ID": "r1", "SEED": "42",
           "MAX_WALLCLOCK_SECONDS": "300", "ITERATIONS": "100", "TRAIN_SEQ_LEN": "1024",
           "TRAIN_BATCH_TOKENS": "524288", "VAL_LOSS_EVERY": "50", "QK_NORM": "false", "MLP_MULT": "3.5"}
    cfg, _ = resolve([], env=env)
    assert (cfg.data_path, cfg.tokenizer_path, cfg.vocab_size, cfg.run_id, cfg.seed) == ("/d", "/t.model", 8192, "r1", 42)
    assert (cfg.max_wallclock_seconds, cfg.iterations, cfg.train_seq_len, cfg.train_batch_tokens, cfg.val_loss_every) == \
        (300.0, 100, 1024, 524288, 50)
    assert cfg.qk_norm is False and cfg.mlp_mult == 3.5


@pytest.mark.parametrize("env,knob", [
    ({"TRAIN_SEQ_LEN": "abc"}, "TRAIN_SEQ_LEN"),
    ({"SEED": "1.5"}, "SEED"),
    ({"QK_NORM": "maybe"}, "QK_NORM"),
    ({"NUM_KV_HEADS": "3"}, "NUM_KV_HEADS"),
    ({"EVAL_STRIDE": "0"}, "EVAL_STRIDE"),
    ({"TRAIN_RESERVE_SECONDS": "700"}, "TRAIN_RESERVE_SECONDS"),
    ({"PRESET": "huge"}, "PRESET"),
    ({"MLP_ACT": "gelu"}, "MLP_ACT"),
])
def test_bad_env_value_names_the_knob(env, knob):
    with pytest.raises(ConfigError, match=knob):
        resolve([], env=env)


def test_unknown_cli_argument_rejected():
    with pytest.raises(ConfigError, match="--trian_seq_len"):
        resolve(["--trian_seq_len=5"], env={})
    cfg, rest = resolve(["--verbose", "--seed=3", "--eval_only", "--artifact", "x.lcq"], env={}, allow_extra=("--verbose",))
    assert rest == ["--verbose"] and cfg.seed == 3 and cfg.eval_only and cfg.artifact_file == "x.lcq"


def test_removed_lqer_knobs_name_their_replacement():
    """Issue 16: LQER is LCQ's closed form; an LQER_* knob left in the environment stops the run (it would otherwise be
    ignored) and names the LCQ knobs that replace it; an empty one is unset, as for every knob."""
    for knob in ("LQER_RANK", "LQER_TOP_K"):
        with pytest.raises(ConfigError, match=f"{knob}: .*LCQ_BYTES.*LCQ_MAX_STEPS=0"):
            resolve([], env={knob: "4"})
    assert resolve([], env={"LQER_RANK": ""})[0].lcq_bytes == "auto"
    with pytest.raises(ConfigError, match="unknown argument '--lqer_rank=4'"):
        resolve(["--lqer_rank=4"], env={})


def test_frozen_and_json_round_trip():
    cfg = make_config("tiny")
    with pytest.raises(Exception):
        cfg.seed = 1
    assert Config(**json.loads(cfg.to_json())) == cfg
    assert cfg.train_budget_seconds == cfg.max_wallclock_seconds - cfg.train_reserve_seconds


def test_removed_lcq_knobs_stop_the_run_by_name():
    """LCQ_OBJECTIVE, LCQ_TEACHER_TOPK and LCQ_RANK_ALLOC were removed (issue 16's round): a run that still sets one
    stops and names it, instead of silently running without it."""
    for knob in ("LCQ_OBJECTIVE", "LCQ_TEACHER_TOPK", "LCQ_RANK_ALLOC"):
        with pytest.raises(ConfigError, match=f"^{knob}: this knob is gone"):
            resolve([], env={knob: "1"})
    assert resolve([], env={"LCQ_TEACHER_TOPK": ""})[0].lcq_bytes == "auto"
