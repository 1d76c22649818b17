"""Progressive training context (TRAIN_SEQ_SCHEDULE, openai/parameter-golf PR #2014; lcq/seq_schedule.py): parsing and
validation, the stage each progress runs, agreement across ranks, constant tokens per step with documents cut at every
BOS at every length, off = one stage at TRAIN_SEQ_LEN, and a tiny run through the whole pipeline with it on."""
import re

import numpy as np
import pytest
import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lcq.config import ConfigError, make_config, resolve
from lcq.data import TrainLoader, segment_bounds, train_pattern
from lcq.dist import DistInfo
from lcq.model import GPT
from lcq.seq_schedule import SeqSchedule, parse_seq_schedule, stage_at
from lcq.train import out_of_time

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
SCHEDULE = "16@0,32@0.25,64@0.5"  # the tiny preset trains at TRAIN_SEQ_LEN=64


def test_schedule_parses_and_each_stage_runs_from_its_start():
    plan = parse_seq_schedule(" 1024@0, 2048@0.3 ,3072@0.6", 3072)
    assert plan == ((1024, 0.0), (2048, 0.3), (3072, 0.6))
    assert [stage_at(plan, p) for p in (0.0, 0.2999, 0.3, 0.5999, 0.6, 1.0)] == [0, 0, 1, 1, 2, 2]
    assert parse_seq_schedule("", 3072) == () and parse_seq_schedule("  ", 3072) == ()
    off = SeqSchedule("", 64)
    assert not off.staged and off.lengths == [64] and off.due(0.9) == 0
    on = SeqSchedule(SCHEDULE, 64)
    assert on.staged and on.length == 16 and on.describe() == SCHEDULE
    assert on.advance(2) and on.length == 64
    assert not on.advance(1) and on.length == 64  # never back to a shorter context


@pytest.mark.parametrize("text, fragment", [
    ("64", "has no @PROGRESS"),
    ("16@x,64@0.5", "is not LENGTH@PROGRESS"),
    ("abc@0,64@0.5", "is not LENGTH@PROGRESS"),
    ("16@0.1,64@0.5", "must start at progress 0"),
    ("16@0,32@0.5,64@0.4", "starts must increase strictly"),
    ("16@0,64@1", "stay below 1"),
    ("32@0,16@0.3,64@0.6", "increase strictly"),
    ("16@0,16@0.3,64@0.6", "increase strictly"),
    ("1@0,64@0.5", "lengths must be >= 2"),
    ("16@0,32@0.5", "must equal TRAIN_SEQ_LEN=64"),
    ("16@0,32@0.2,48@0.4,56@0.6,64@0.8", "at most 4"),
])
def test_bad_schedules_name_the_knob(text, fragment):
    with pytest.raises(ConfigError, match="TRAIN_SEQ_SCHEDULE") as e:
        make_config("tiny", train_seq_schedule=text)
    assert fragment in str(e.value)


def test_schedule_from_the_environment():
    cfg, _ = resolve([], env={"PRESET": "tiny", "TRAIN_SEQ_SCHEDULE": SCHEDULE})
    assert cfg.train_seq_schedule == SCHEDULE
    # an empty value is the field default: off
    assert resolve([], env={"PRESET": "tiny", "TRAIN_SEQ_SCHEDULE": ""})[0].train_seq_schedule == ""


def _agree_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        seq = SeqSchedule(SCHEDULE, 64)
        # Rank 1's clock is further on than rank 0's: rank 0 alone would stay at stage 0, rank 1 alone would go to 2.
        progress = (0.05, 0.55)[rank]
        flag = torch.zeros(4)
        flag[3] = seq.due(progress)
        # the train loop's one collective per step (lcq/train.py) carries the stage with the out-of-time decision
        assert not out_of_time(flag, elapsed=1.0, steps=1, last_step_s=0.0, budget_s=100.0)
        seq.advance(int(flag[3].item()))
        with open(f"{out_dir}/rank{rank}.txt", "w") as f:
            f.write(str(seq.length))
    finally:
        dist.destroy_process_group()


def test_every_rank_takes_the_same_stage_two_rank_gloo(tmp_path, free_port):
    mp.spawn(_agree_worker, args=(2, free_port, str(tmp_path)), nprocs=2, join=True)
    # MAX: the rank furthest on decides, so both ranks train the next step at 64 tokens
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)] == ["64", "64"]


def test_tokens_per_step_and_document_cuts_at_every_length(demo_data):
    data_path, tok = demo_data
    bos = spm.SentencePieceProcessor(model_file=str(tok)).bos_id()
    local = 1024
    for length in SeqSchedule(SCHEDULE, 64).lengths:
        loader = TrainLoader(train_pattern(str(data_path)), 0, 1, torch.device("cpu"))
        x, y, cu = loader.next_batch(local, length, bos)
        assert x.numel() == y.numel() == local  # the same tokens per step at every stage; only the cuts move
        bounds = cu.tolist()
        assert bounds[0] == 0 and bounds[-1] == local and max(np.diff(bounds)) <= length
        assert set(torch.nonzero(x == bos).flatten().tolist()) <= set(bounds)  # every document starts a segment
        assert len(bounds) - 1 >= local // length
    # At the shortest length a document longer than it is cut too; no segment sees another, cut or not.
    torch.manual_seed(0)
    model = GPT(make_config("tiny", vocab_size=128), bos_id=1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ids = torch.randint(2, 128, (80,), generator=torch.Generator().manual_seed(1))
    ids[[0, 30]] = 1  # documents start at 0 and 30; the row is also cut every 16 tokens from its start
    cu = segment_bounds(ids, 1, 16)
    assert cu.tolist() == [0, 16, 30, 32, 48, 64, 80]
    changed = ids.clone()
    changed[50] = 2 if ids[50] != 2 else 3  # inside segment 48..63
    with torch.no_grad():
        a, b = model.eval()(ids, cu, 16), model(changed, cu, 16)
    assert torch.equal(a[:48], b[:48]) and torch.equal(a[64:], b[64:]) and not torch.equal(a[50:64], b[50:64])


def _train(tmp_path, demo_data, run_id, **overrides):
    from lcq.pipeline import build, open_run, run_training

    data_path, tok = demo_data
    cfg = make_config("tiny", data_path=str(data_path), tokenizer_path=str(tok), log_dir=str(tmp_path), run_id=run_id,
                      submission_json="", iterations=6, train_log_every=1, **overrides)
    run = open_run(cfg, CPU)
    build(run)
    res = run_training(run)
    losses = re.findall(r"^step:\d+/\d+ train_loss:(\S+)", (tmp_path / f"{run_id}.txt").read_text(), re.M)
    return run, res, losses


def test_off_and_a_single_stage_train_identically(tmp_path, demo_data):
    off, _, loss_off = _train(tmp_path, demo_data, "off")
    one, _, loss_one = _train(tmp_path, demo_data, "one", train_seq_schedule="64@0")
    off.log.close()
    one.log.close()
    assert loss_off == loss_one and len(loss_off) == 6
    for (name, a), (_, b) in zip(off.model.state_dict().items(), one.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_tiny_pipeline_with_progressive_context(tmp_path, demo_data):
    """Lengths switch in order at their progress (with depth recurrence switching too), then GPTQ, LCQ, the gate and
    the eval of the decoded artifact run as usual."""
    from lcq.pipeline import evaluate_shipped, lcq, quantize, ship

    run, res, _ = _train(tmp_path, demo_data, "prog", train_seq_schedule=SCHEDULE, num_layers=4, recur_passes=2,
                         recur_start_layer=1, recur_end_layer=2, recur_from_progress=0.5, warmup_steps=6,
                         lcq_max_steps=2, val_max_tokens=2048)
    assert res.steps == 6 and res.tokens_per_step == run.cfg.train_batch_tokens
    quantize(run)
    lcq(run)
    assert ship(run)
    evaluate_shipped(run)
    run.log.close()
    log = (tmp_path / "prog.txt").read_text()
    assert f"train_seq_schedule:{SCHEDULE} train_seq_len:16 tokens_per_step:1024" in log
    switches = [(int(n), int(s)) for n, s in re.findall(r"^train_seq_len:(\d+) step:(\d+) progress:[0-9.]+$", log, re.M)]
    # progress = max(step / 6, elapsed / 50 s budget): >= 0.25 after step 2 and >= 0.5 after step 3 at the latest, and
    # a switch due after step k applies from step k (0-based) on
    assert [n for n, _ in switches] == [32, 64]
    assert 1 <= switches[0][1] < switches[1][1] <= 3
    assert {"pre_quant", "quantized", "quantized_lcq"} <= set(run.scores)
    assert all(0 < run.scores[s].val_bpb < 10 for s in run.scores)
    assert 0 < run.size.total <= run.cfg.artifact_cap_bytes
