"""`lcq preflight` on the tiny preset, run as `python -m lcq.tools preflight` (the form torchrun takes): the go/no-go
table, its JSON line, and a no-go that exits non-zero."""
import json
import os
import subprocess
import sys

import pytest

ROWS = ("setup", "attention", "compile", "collective", "train", "memory", "gptq", "serialize", "eval", "artifact", "ledger")


def preflight(tmp_path, demo_data, *args, nproc=1, extra_env=None):
    data_path, tokenizer_path = demo_data
    env = dict(os.environ, PRESET="tiny", DATA_PATH=str(data_path), TOKENIZER_PATH=str(tokenizer_path),
               LOG_DIR=str(tmp_path / "logs"), OMP_NUM_THREADS="1", **(extra_env or {}))
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [sys.executable, *launcher, "-m", "lcq.tools", "preflight", "--steps", "2", *args]  # `lcq preflight`
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    lines = proc.stdout.strip().splitlines()
    report = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
    return proc, lines, report


def table(lines):
    """{row: status} from the printed table (rows start at column 0, statuses follow the name)."""
    return {line.split()[0]: line.split()[1] for line in lines if line.split() and line.split()[0] in ROWS}


def test_tiny_preflight_prints_every_row_and_goes(tmp_path, demo_data):
    # a 30 s reserve, not tiny's 10 s: the GO verdicts follow this host's seconds (the script's render took 8.7 s on a
    # loaded 2-core box), and a test must not follow the wall clock
    proc, lines, report = preflight(tmp_path, demo_data, extra_env={"RUN_ID": "pf", "TRAIN_RESERVE_SECONDS": "30"})
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
    assert ev["forward_tokens"] >= 4095 and ev["projected_s"] > 0 and ev["frames_after_warmup"] == 0
    ledger = rows["ledger"]
    assert ledger["train"]["seconds"] == 30.0 and ledger["total"] <= 60.0  # tiny: 60 s cap, the 30 s reserve above
    # the run writes its own log and summary, never ones a real run would use
    assert (tmp_path / "logs" / "preflight_pf.txt").exists()
    summary = json.loads((tmp_path / "logs" / "preflight_pf.json").read_text())
    assert summary["preflight"]["rows"].keys() == report["rows"].keys() and summary["status"] == 0
    # issue 28: progress while it times steps, and no empty .lcq/.train_gpt.py claims left behind
    assert "preflight: timing 2 training steps after the warm-up" in lines and any(ln.startswith("step:1/2") for ln in lines)
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["preflight_pf.json", "preflight_pf.txt"]


def test_no_go_under_torchrun_names_the_failing_rows(tmp_path, demo_data):
    # A 60 KB cap cannot hold the tiny model's int6/int8 codes alone (~80 KB for 156 K parameters, before the ~45 KB
    # shipped script), and a 1 ms eval budget is far below any eval pass (thousands of forward tokens): both rows fail and
    # the process exits non-zero. TTT and the n-gram tilt on: the TTT pass is timed through lcq.ttt on both ranks and
    # projected too, the hints built over both ranks, and the whole eval is the sum of the pieces.
    proc, lines, report = preflight(tmp_path, demo_data, "--eval_budget_seconds=0.001", "--ttt_enabled=1",
                                    "--ngram_tilt=1", nproc=2, extra_env={"ARTIFACT_CAP_BYTES": "60000", "RUN_ID": "pf2"})
    assert proc.returncode != 0
    statuses = table(lines)
    assert statuses["artifact"] == statuses["eval"] == "NO-GO"
    assert statuses["collective"] == "GO" and statuses["train"] == "GO"
    assert report["preflight"] == "no-go" and {"artifact", "eval"} <= set(report["failed"])
    assert report["world_size"] == 2 and report["rows"]["collective"]["ok"]
    ev = report["rows"]["eval"]
    assert ev["ttt_projected_s"] > 0 and ev["hint_s"] > 0 and ev["sliding_passes"] == 3  # tiny ships a LoRA
    assert abs(ev["whole_eval_projected_s"] - (3 * ev["projected_s"] + ev["hint_s"] + ev["ttt_projected_s"])) < 1e-9
    # both TTT_CONTEXT modes are projected from their own timed pieces (issue 26)
    assert ev["ttt_projected_s_recompute"] == ev["ttt_projected_s"] and ev["ttt_projected_s_reuse"] > 0
    assert any(line.startswith("verdict: NO-GO") and "artifact" in line for line in lines)


@pytest.mark.parametrize("context", ["recompute", "reuse"])
def test_ttt_projection_counts_the_work_the_ttt_pass_does(context):
    """The eval row's TTT projection scales timed pieces of real batches by the schedule's padded forward tokens, chunk
    forwards and phase steps: those must be what lcq.ttt.evaluate_ttt really runs on the same split and knobs (with
    TTT_CONTEXT=reuse the forward tokens are the chunks' new tokens only)."""
    import copy
    import re
    import types

    import torch

    from lcq.config import make_config
    from lcq.evaluate import ValStream
    from lcq.model import GPT
    from lcq.tools.preflight import ttt_projection
    from lcq.ttt import evaluate_ttt, prepare_adapter, schedule, spec_from_config
    from test_evaluate import BOS, V, synthetic_tables, val_stream
    from test_ttt import CPU

    torch.manual_seed(0)
    cfg = make_config("tiny", vocab_size=V, ttt_rank=2, ttt_batch_docs=4, ttt_chunk_tokens=8, eval_seq_len=16,
                      eval_stride=8, ttt_phases=2, ttt_phase_docs=6, ttt_phase_tokens=32, ttt_context=context)
    toks = val_stream([13, 7, 21, 12, 2, 30, 18, 9, 17, 5, 23, 11, 3, 14, 6, 8, 10, 4], seed=4)
    run = types.SimpleNamespace(cfg=cfg, dinfo=CPU, model=GPT(cfg, bos_id=BOS), val_tokens=toks, bos_id=BOS,
                                tables=synthetic_tables(), val_bytes=None)
    proj = ttt_projection(run)
    m = prepare_adapter(copy.deepcopy(run.model), "zero", cfg)
    calls, tokens, logs = [0], [0], []

    def count(_mod, args, _out):  # every forward of the pass: chunk forwards and the phases' packed steps
        calls[0] += 1
        tokens[0] += args[0].numel()
    hook = m.register_forward_hook(count)
    spec = spec_from_config(cfg)
    evaluate_ttt(m, toks, BOS, run.tables, cfg.window, cfg.ttt_chunk_tokens, cfg.eval_batch_tokens, CPU, spec,
                 log=logs.append)
    hook.remove()
    steps = sum(int(re.search(r"sgd_steps:(\d+)", line).group(1)) for line in logs if line.startswith("ttt_phase:"))
    spans, order, _, segs = schedule(ValStream(toks, BOS, run.tables, CPU.device), cfg.window, 8, spec, 1)
    lens = spans[order, 1] - spans[order, 0]
    phase_tokens = sum(int(lens[:hi].sum()) for hi, _, _ in segs[:-1])  # each phase reads every document scored so far
    assert steps == proj["ttt_phase_steps"] > 0 and len(segs) == 3
    assert calls[0] == proj["ttt_chunk_forwards"] + steps
    assert tokens[0] == proj["ttt_forward_tokens"] + phase_tokens
    assert proj["ttt_batches"] == 5 and proj["ttt_documents"] == 18 and proj["ttt_timed_pieces"] >= 2
    assert proj["ttt_projected_s"] > 0 and len(proj["ttt_rank_s"]) == 1
