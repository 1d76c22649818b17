"""The LCQ stage's policy (lcq/distill.py): targets, byte and rank allocation, the closed form that ships with no
distillation (what LQER was), distillation and its objectives. LoRA mechanics are tests/test_lora.py."""
import json
import re

import pytest
import torch

from lcq import artifact, lora
from lcq.config import make_config
from lcq.distill import lcq_target_names, quant_errors
from lcq.model import GPT, stored_weight
from lcq.pipeline import build, evaluate_shipped, open_run, quantize, run_training, ship
from lcq.shipping import LORA_PREFIX, load_shipped, model_from_state
from test_ship import CPU, entry, run_stages, tiny_cfg, total_bytes


def test_closed_form_never_raises_a_real_tensors_weighted_error(tmp_path, demo_data):
    """Issue 11's LQER guarantee on real tensors: the tiny model trained a few steps, its Hessians collected by GPTQ on
    train tokens, GPTQ int6 codes; at 2+4 bits the closed form of every quantized tensor (each block matrix and the
    tied embedding under the head's Hessian) at ranks 1 and 4 lowers tr(E H E^T) or is refused."""
    torch.set_num_threads(1)
    cfg = tiny_cfg(tmp_path, demo_data, "realcf", lcq_rank="0", iterations=4)
    run = open_run(cfg, CPU)
    build(run)
    run_training(run)
    quantize(run)
    run.log.close()
    fmt = lora.factor_format(4, True, 16)
    names = lcq_target_names(run.model, tiny_cfg(tmp_path, demo_data, "x", lcq_targets=",".join(lora.DEFAULT_TARGETS) + ",lm_head"))
    assert stored_weight("lm_head") == "tok_emb.weight" and len(names) == 13
    lowered = 0
    for n, (E, H) in quant_errors(run, names).items():
        before = lora.weighted_error(E, H)
        assert before > 0, n
        for r in (1, 4):
            fit = lora.closed_form(E, H, r, 16.0 / r, fmt)
            if fit is not None:
                assert fit["error"] < before, (n, r)
                lowered += 1
    assert lowered > 0


def test_no_distillation_ships_exactly_the_closed_form(tmp_path, demo_data):
    """LCQ_MAX_STEPS=0 with LCQ_BYTES=N is LQER: the artifact's factors decode to exactly the closed-form fits the
    byte allocation priced (no step moved them), within N bytes; the decoded model scores what ships, and TTT starts
    from those factors (TTT_INIT=artifact)."""
    n = 4000
    cfg = tiny_cfg(tmp_path, demo_data, "nodistill", lcq_max_steps=0, lcq_bytes=str(n), lcq_rank="4",
                   lcq_factor_bits=4, lcq_factor_asym=True, lcq_factor_group=16,
                   lcq_targets="blocks.*.attn.c_q,blocks.*.mlp.fc,lm_head", ttt_enabled=True, ttt_init="artifact")
    run = run_stages(cfg)
    assert run.distill_result.steps == 0
    assert ship(run)
    names = lcq_target_names(run.model, cfg)
    ranks, fits, rows = lora.allocate_bytes(quant_errors(run, names), n - lora.LORA_SECTION_BYTES,
                                            lora.config_format(cfg), cfg.lcq_alpha, 4)
    evaluate_shipped(run)
    run.log.close()
    tensors, meta = artifact.load(cfg.artifact_file)
    assert meta["lora"]["ranks"] == {k: r for k, r in ranks.items() if r} == run.lcq_ranks
    for name, fit in fits.items():
        A, B = lora.dequantize_factors({k: tensors[f"{LORA_PREFIX}{name}.{k}"] for k in ("A_q", "A_scale", "B_q",
                                                                                         "B_scale")})
        assert torch.equal(A, fit["A"]) and torch.equal(B, fit["B"]), name
    # The tied head's correction reaches both uses (issue 16): the in-process student as lcq_stage builds it (side path,
    # the embedding lookup hooked) scores the logits of the decoded artifact, whose shared weight holds the fold.
    assert ranks["lm_head"] > 0
    student = model_from_state(cfg, run.bos_id, run.gptq_state, CPU.device)
    for name, w in lora.attach_lora(student, list(fits), {k: ranks[k] for k in fits}, cfg.lcq_alpha).items():
        w.set_factors(fits[name]["B"], fits[name]["A"])
        w.fmt, w.grid = lora.config_format(cfg), fits[name]["grid"]
    decoded, _, _ = load_shipped(cfg.artifact_file, cfg, CPU.device)
    assert decoded.lm_head.weight is decoded.tok_emb.weight
    assert not torch.equal(decoded.tok_emb.weight, run.gptq_state["tok_emb.weight"].float())
    ids = torch.tensor(run.val_tokens[:200].astype("int64"))
    cu = torch.tensor([0, 200], dtype=torch.int32)
    with torch.no_grad():
        torch.testing.assert_close(student(ids, cu, 64), decoded(ids, cu, 64), atol=2e-4, rtol=1e-4)
    assert sum(b for *_, b, _ in rows) <= n - lora.LORA_SECTION_BYTES and 0 < run.size.lora_bytes <= n
    assert "quantized_lcq" in run.scores and "quantized_lcq_ttt" in run.scores


def test_bad_lcq_targets_name_the_knob():
    model = GPT(make_config("tiny"), bos_id=1)
    assert len(lcq_target_names(model, make_config("tiny"))) == 12
    with pytest.raises(ValueError, match="LCQ_TARGETS.*blocks.\\*.atn.c_q"):
        lcq_target_names(model, make_config("tiny", lcq_targets="blocks.*.atn.c_q"))
    with pytest.raises(ValueError, match="not linear"):
        lcq_target_names(model, make_config("tiny", lcq_targets="blocks.*.attn"))
    with pytest.raises(ValueError, match="baked cannot target lm_head"):
        lcq_target_names(model, make_config("tiny", lcq_targets="lm_head", lcq_merge="baked"))


def test_raising_the_rank_until_the_cap_fails(tmp_path, demo_data):
    no_lora = entry(tmp_path, demo_data, "r0", extra_env={"LCQ_RANK": "0"})
    assert no_lora.returncode == 0, no_lora.stderr[-2000:]
    log0 = (tmp_path / "logs" / "r0.txt").read_text()
    assert "lora 0," in log0 and "quantized_lcq" not in log0
    # Room for a small adapter, not for a large one. Sections are independent, so every run of this seed ships r0's
    # model section unchanged plus its LoRA section. Rank 2: 2 x 2,176 int8 codes + fp16 scales = 4,448 data bytes,
    # under 4,600 even stored uncompressed (artifact_bounds.max_compressed_bytes), plus a manifest of names and shapes that is
    # byte-identical on every machine and compresses to ~0.5 KB: < 5.2 KB, 2.8 KB under. Rank 16: 35,584 data bytes of
    # near-uniform int8 factor codes (rank 8's compress 0.94x): > 30 KB. auto: 8000 // 2,224 upper-estimate bytes per
    # rank = rank 3.
    cap = total_bytes(log0) + 8000
    small = entry(tmp_path, demo_data, "r2", extra_env={"LCQ_RANK": "2", "ARTIFACT_CAP_BYTES": str(cap)})
    big = entry(tmp_path, demo_data, "r16", extra_env={"LCQ_RANK": "16", "ARTIFACT_CAP_BYTES": str(cap)})
    assert small.returncode == 0, small.stderr[-2000:]
    assert big.returncode == 3
    lora = [int(re.search(r"lora (\d+),", (tmp_path / "logs" / f"{r}.txt").read_text()).group(1)) for r in ("r2", "r16")]
    assert 0 < lora[0] < lora[1]
    # auto: the largest rank that fits the same cap, and the run passes its gate.
    auto = entry(tmp_path, demo_data, "rauto", extra_env={"LCQ_RANK": "auto", "ARTIFACT_CAP_BYTES": str(cap),
                                                          "LCQ_AUTO_HEADROOM_BYTES": "0"})
    assert auto.returncode == 0, auto.stderr[-2000:]
    log = (tmp_path / "logs" / "rauto.txt").read_text()
    rank = int(re.search(r"^lcq_auto_rank: .* rank (\d+)$", log, re.M).group(1))
    assert 2 <= rank < 16 and total_bytes(log) <= cap


def test_byte_budget_is_spent_within_the_cap_and_one_byte_over_fails(tmp_path, demo_data):
    """LCQ_BYTES=auto with a cap that leaves the LoRA exactly N bytes: the allocation (2+4-bit factors, closed-form
    init, distilled) ships at most N and the run passes its gate; the same allocation (LCQ_BYTES=N gives the same
    budget, so the same ranks) under a cap one byte below what it shipped fails it."""
    low_bit = dict(LCQ_FACTOR_BITS="4", LCQ_FACTOR_ASYM="1", LCQ_FACTOR_GROUP="16")
    no_lora = entry(tmp_path, demo_data, "b0", extra_env={"LCQ_RANK": "0"})
    assert no_lora.returncode == 0, no_lora.stderr[-2000:]
    n = 3000
    cap = total_bytes((tmp_path / "logs" / "b0.txt").read_text()) + n
    auto = entry(tmp_path, demo_data, "bauto", extra_env=dict(low_bit, LCQ_BYTES="auto", ARTIFACT_CAP_BYTES=str(cap),
                                                              LCQ_AUTO_HEADROOM_BYTES="0"))
    assert auto.returncode == 0, auto.stderr[-2000:]
    log = (tmp_path / "logs" / "bauto.txt").read_text()
    assert f"leave {n} under the cap" in log
    rows = re.findall(r"^lcq_alloc: (\S+) rank (\d+) bytes (\d+) error removed (\S+)$", log, re.M)
    assert rows and sum(int(b) for _, _, b, _ in rows) <= n and all(float(e) > 0 for *_, e in rows)
    lora = int(re.search(r"lora (\d+),", log).group(1))
    assert 0 < lora <= n and total_bytes(log) <= cap
    over = entry(tmp_path, demo_data, "bover", extra_env=dict(low_bit, LCQ_BYTES=str(n),
                                                              ARTIFACT_CAP_BYTES=str(total_bytes(log) - 1)))
    assert over.returncode == 3
    log2 = (tmp_path / "logs" / "bover.txt").read_text()
    assert "GATE FAILED" in log2 and "1 byte over the cap" in log2
    assert re.findall(r"^lcq_alloc: .*$", log2, re.M)[1:] == re.findall(r"^lcq_alloc: .*$", log, re.M)[1:]


def test_uniform_rank_ships_that_rank_everywhere_and_logs_rho(tmp_path, demo_data):
    proc = entry(tmp_path, demo_data, "rho", extra_env={"LCQ_RANK": "4"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "logs" / "rho.json").read_text())
    assert summary["lcq"]["ranks"] and set(summary["lcq"]["ranks"].values()) == {4}
    assert "lcq_rho: total" in (tmp_path / "logs" / "rho.txt").read_text()


@pytest.mark.parametrize("init", ["act_svd", "svd"])
def test_lm_head_target_uses_the_tied_embeddings_hessian(tmp_path, demo_data, init):
    """lm_head's weight is the tied embedding: its Hessian and GPTQ weights are filed under tok_emb.weight, and both the
    act_svd init and the rho diagnostic must find them there (both raised KeyError: 'lm_head.weight')."""
    cfg = tiny_cfg(tmp_path, demo_data, f"head_{init}", lcq_init=init, lcq_max_steps=2,
                   lcq_targets="blocks.0.mlp.fc,lm_head")
    run = run_stages(cfg)
    assert set(run.lcq_ranks) == {"blocks.0.mlp.fc", "lm_head"}
    assert ship(run)
    evaluate_shipped(run)
    run.log.close()
    assert "lm_head" in run.log.summary["lcq_rho"] and "quantized_lcq" in run.scores


