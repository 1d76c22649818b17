"""The record-stack features (issue 11): each one's known answer, document isolation with all of them on, and a tiny
pipeline run with every new flag on (GPTQ, LCQ in 2+4-bit factors, the gate, the eval of what ships)."""
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lcq.tools.bench import scaled_features
from lcq.config import RECORD_FEATURES, ConfigError, make_config
from lcq.data import segment_bounds
from lcq.dist import DistInfo
from lcq.gptq import collect_hessians
from lcq.model import GPT, exclusive, gptq_targets
from lcq.optim import build_optimizers, lr_multiplier, newton_schulz
from lcq.recurrence import layer_sequence
from test_model import packed_docs  # pytest puts tests/ on sys.path
from test_model import randomised_model as randomised

BOS, V = 1, 128
CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def all_on(**overrides):
    """The tiny preset at 4 layers with every record feature on (layer indices scaled to 4 layers)."""
    base = make_config("tiny", vocab_size=V, num_layers=4)
    knobs = {k: v for group in scaled_features(base).values() for k, v in group.items()}
    return make_config("tiny", **{"vocab_size": V, "num_layers": 4, **knobs, **overrides})




def test_every_record_feature_is_on_in_the_scaled_tiny_config():
    cfg = all_on()
    assert set(scaled_features(cfg)) == set(RECORD_FEATURES)  # 4 layers leave room for the lanes after the loop
    assert (cfg.xsa_last_n, cfg.recur_passes, cfg.parallel_start_layer, cfg.attn_gate_window) == (4, 3, 3, 12)
    assert cfg.parallel_start_layer > cfg.recur_end_layer >= cfg.recur_start_layer


def test_layer_sequence_known_answer():
    assert layer_sequence(11, 3, 5, 3) == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]
    assert layer_sequence(4, 1, 2, 1) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="layer_sequence"):
        layer_sequence(4, 2, 4, 2)


def test_xsa_output_has_no_component_along_the_own_value():
    g = torch.Generator().manual_seed(0)
    y, v = torch.randn(10, 4, 8, generator=g), torch.randn(10, 2, 8, generator=g)
    out = exclusive(y, v)
    vn = F.normalize(v, dim=-1).repeat_interleave(2, dim=1)  # query heads 2h, 2h+1 share KV head h
    assert (out * vn).sum(-1).abs().max() < 1e-5
    # Only that component is removed: what is orthogonal to v passes unchanged.
    torch.testing.assert_close(out - y, -(y * vn).sum(-1, keepdim=True) * vn, atol=1e-6, rtol=1e-6)


def test_sparse_gate_starts_at_half_and_ln_scale_shrinks_deeper_inputs():
    cfg = all_on()
    model = GPT(cfg, bos_id=BOS)
    gate = model.blocks[0].attn.gate
    y, x = torch.randn(5, cfg.num_heads, 16), torch.randn(5, cfg.model_dim)
    torch.testing.assert_close(gate(y, x), 0.5 * y)  # zero-initialised gate: sigmoid(0)
    assert [b.ln_scale for b in model.blocks] == pytest.approx([1.0, 2 ** -0.5, 3 ** -0.5, 0.5])
    assert all(b.attn.q_gain.eq(5.0).all() for b in model.blocks)


def test_recurrence_reuses_stored_layers_and_keeps_the_quantized_tensors():
    """Weights are stored once: the looped model has the same GPTQ targets and matrices as the plain one, and each
    stored layer's Hessian sees every pass (the looped layer's hook fires `passes` times per forward)."""
    plain, looped = GPT(all_on(recur_passes=1), BOS), GPT(all_on(), BOS)
    assert gptq_targets(plain) == gptq_targets(looped)
    shapes = lambda m: {k: v.shape for k, v in m.state_dict().items() if k.endswith(".weight")}  # noqa: E731
    assert shapes(plain) == shapes(looped)
    calls = {}
    looped.blocks[1].attn.c_q.register_forward_hook(lambda *_: calls.__setitem__("n", calls.get("n", 0) + 1))
    _, ids = packed_docs()
    cu = segment_bounds(ids, BOS, 128)
    H = collect_hessians(looped, gptq_targets(looped), lambda: looped(ids, cu, 128))
    assert calls["n"] == 3 and set(H) == set(gptq_targets(looped))
    looped.recur_active = False
    calls["n"] = 0
    looped(ids, cu, 128)
    assert calls["n"] == 1


@pytest.mark.parametrize("recur_active", [True, False])
def test_document_isolation_with_every_feature_on(recur_active):
    model = randomised(all_on())
    model.recur_active = recur_active
    docs, ids = packed_docs()
    cu = segment_bounds(ids, BOS, 128)
    with torch.no_grad():
        base = model(ids, cu, 128)
        alone = torch.cat([model(d, torch.tensor([0, d.numel()], dtype=torch.int32), 128) for d in docs])
        torch.testing.assert_close(base, alone, atol=1e-5, rtol=1e-5)
        changed = ids.clone()
        changed[41] = (changed[41] + 7) % V  # the last token of document 1 must not reach document 2's BOS (SmearGate)
        out = model(changed, cu, 128)
        assert torch.equal(out[42:], base[42:]) and torch.equal(out[:41], base[:41])


def test_eval_isolation_with_every_feature_on():
    """The doc-isolated eval of a packed val stream scores each document exactly as the eval of it alone (followed by
    the next document's BOS, which is its last target: docs/scoring.md)."""
    from lcq.evaluate import evaluate
    from lcq.tokenizer import ByteTables

    ids = torch.arange(V)
    tables = ByteTables(torch.where(ids < 2, 0, ids % 3 + 1).to(torch.int16), (ids % 2 == 0) & (ids >= 2), ids < 2)
    model = randomised(all_on())
    g = np.random.default_rng(0)
    docs = [np.concatenate([[BOS], g.integers(2, V, n - 1)]).astype(np.uint16) for n in (40, 9, 70)]
    res = evaluate(model, np.concatenate(docs), BOS, tables, 16, 5, 64, CPU)
    ends = [np.uint16(BOS)] * (len(docs) - 1) + [None]
    parts = [evaluate(model, d if e is None else np.append(d, e), BOS, tables, 16, 5, 64, CPU) for d, e in zip(docs, ends)]
    assert res.tokens == sum(p.tokens for p in parts) and res.bytes == sum(p.bytes for p in parts)
    assert res.val_loss * res.tokens == pytest.approx(sum(p.val_loss * p.tokens for p in parts), rel=1e-5)


def test_lanes_and_gates_train_with_adam_not_muon():
    model = GPT(all_on(), BOS)
    adam, muon = build_optimizers(model, all_on())
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[i].endswith(".weight") for i in muon_ids)
    for n in ("lanes.post", "lanes.resid", "skip_gates", "blocks.0.attn.gate.w"):
        assert id(dict(model.named_parameters())[n]) not in muon_ids


def test_polar_express_lifts_small_singular_values_faster():
    """Polar Express takes a different minimax tuple per step; after five steps its band around 1 is tighter from below
    than the fixed quintic's (whose fixed point band starts near 0.7), and neither overshoots past 1.25."""
    g = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    jordan = torch.linalg.svdvals(newton_schulz(g, 5, "jordan"))
    polar = torch.linalg.svdvals(newton_schulz(g, 5, "polar_express"))
    assert polar.min() > jordan.min() and polar.max() < 1.25 and jordan.max() < 1.25


def test_min_lr_floor_in_the_warmdown():
    cfg = make_config("tiny", iterations=100, warmdown_frac=0.5, min_lr_frac=0.1, max_wallclock_seconds=1e6)
    assert lr_multiplier(40, 0.0, cfg) == 1.0
    assert lr_multiplier(75, 0.0, cfg) == pytest.approx(0.5)
    assert lr_multiplier(96, 0.0, cfg) == pytest.approx(0.1)  # (1 - 0.96) / 0.5 = 0.08, floored
    assert lr_multiplier(100, 0.0, cfg) == pytest.approx(0.1)


@pytest.mark.parametrize("overrides,knob", [
    (dict(recur_passes=2, recur_start_layer=2, recur_end_layer=4), "RECUR_END_LAYER"),
    (dict(parallel_start_layer=1), "PARALLEL_START_LAYER"),
    (dict(recur_passes=2, recur_start_layer=1, recur_end_layer=3, parallel_start_layer=3), "PARALLEL_START_LAYER"),
    (dict(muon_ns_coeffs="newton"), "MUON_NS_COEFFS"),
    (dict(min_lr_frac=1.5), "MIN_LR_FRAC"),
    (dict(xsa_last_n=5), "XSA_LAST_N"),
    (dict(lcq_factor_bits=1), "LCQ_FACTOR_BITS"),
])
def test_bad_feature_knobs_name_the_knob(overrides, knob):
    with pytest.raises(ConfigError, match=knob):
        make_config("tiny", num_layers=4, **overrides)


def test_record_preset_shows_the_stack():
    cfg = make_config("record")
    assert (cfg.vocab_size, cfg.num_layers, cfg.model_dim, cfg.num_heads, cfg.num_kv_heads) == (8192, 11, 512, 8, 4)
    assert "sp8192_lossless_caps_caseops" in cfg.data_path and cfg.tokenizer_path.endswith("caseops_v1_reserved.model")
    assert (cfg.xsa_last_n, cfg.recur_passes, cfg.recur_start_layer, cfg.recur_end_layer) == (11, 3, 3, 5)
    assert (cfg.parallel_start_layer, cfg.attn_gate_window, cfg.embed_bits) == (8, 12, 7)
    assert cfg.mlp_mult == 4.0 and cfg.fit_max_fraction > 0  # as #1855 and #2135; the fit trims it to the cap (issue 25)
    # one low-rank correction (issue 16): the byte-allocated LoRA in #1855's 2+4-bit LQER storage
    assert (cfg.lcq_bytes, cfg.lcq_factor_bits, cfg.lcq_factor_asym) == ("auto", 4, True)
    assert cfg.lcq_targets.endswith(",lm_head")  # the tied head is a candidate, as LQER's embedding was
    assert (cfg.min_lr_frac, cfg.warmdown_frac, cfg.adam_beta2, cfg.ema_decay) == (0.10, 0.85, 0.99, 0.9965)


def test_tiny_pipeline_with_every_new_flag(tmp_path, demo_data):
    """train (recurrence switching on mid-run) -> GPTQ with per-role clips and int7 embedding -> LCQ (2+4-bit) -> gate ->
    the eval of the artifact decoded from disk, in one process."""
    from lcq.pipeline import build, evaluate_shipped, lcq, open_run, quantize, run_training, ship

    data_path, tok = demo_data
    cfg = all_on(vocab_size=1024, data_path=str(data_path), tokenizer_path=str(tok), log_dir=str(tmp_path),
                 run_id="features", submission_json="", recur_from_progress=0.5, gptq_calib_batches=2,
                 embed_weight_decay=0.085, scalar_weight_decay=0.02, iterations=6, lcq_max_steps=2, val_max_tokens=2048,
                 lcq_init="grail", lcq_factor_bits=4, lcq_factor_asym=True)  # grail: per pass of each looped layer
    run = open_run(cfg, CPU)
    build(run)
    run_training(run)
    assert run.model.recur_active  # what ships runs the loop
    quantize(run)
    lcq(run)
    assert ship(run)
    evaluate_shipped(run)
    run.log.close()
    log = (tmp_path / "features.txt").read_text()
    # progress = max(step / 6, elapsed / 50 s budget) reaches 0.5 at step 3 at the latest
    assert re.search(r"^recurrence:on step:[0-3] ", log, re.M)
    assert {"pre_quant", "quantized", "quantized_lcq"} <= set(run.scores)
    assert all(0 < run.scores[s].val_bpb < 10 for s in run.scores)
    assert run.size.lora_bytes > 0 and 0 < run.size.total <= cfg.artifact_cap_bytes
    assert run.lora_meta["format"] == [4, 2, 64]


def test_features_bench_end_to_end(tmp_path, demo_data, monkeypatch, capsys):
    """`python -m lcq.bench features` on the tiny preset (4 layers so every feature fits), the int7 embedding switched off: the table and the JSON line with one row per arm, deltas against the all-on arm."""
    from lcq.tools.bench import main

    data_path, tok = demo_data
    for k, v in dict(DATA_PATH=str(data_path), TOKENIZER_PATH=str(tok), LOG_DIR=str(tmp_path)).items():
        monkeypatch.setenv(k, v)
    assert main(["features", "--features", "int7_embed", "--steps", "3", "--preset", "tiny", "--num_layers=4",
                 "--iterations=3", "--val_max_tokens=1024"]) == 0
    out = capsys.readouterr().out
    assert "Demo-scale deltas do not predict record-scale ones" in out
    result = json.loads(out.strip().splitlines()[-1])
    rows = result["rows"]
    assert [r["arm"] for r in rows] == ["all_on", "no_int7_embed"]
    assert rows[0]["delta_bpb"] == 0 and rows[0]["delta_bytes"] == 0
    int8 = rows[1]
    # the embedding's bits change only the quantized weights: same training, so the same pre-quant score; int8 at 20
    # sigmas has a finer step (20/127 of a row's std against int7's 14/63), so more model bytes
    assert int8["pre_quant_bpb"] == rows[0]["pre_quant_bpb"] and int8["delta_bytes"] > 0
    assert all(r["steps"] == 3 and 0 < r["bpb"] < 10 for r in rows)


# --- issue 19: #1855's own SmearGate, resid_mix and init, each one knob away from ours ---

def test_input_smear_known_answer_and_bos_mask():
    """SMEAR_GATE=input: x_t + lam * sigmoid(w . x_t[:12]) * x_{t-1}, nothing carried into a BOS or a segment start;
    lam = w = 0 at init is the identity."""
    from lcq.model import SmearGate

    g = torch.Generator().manual_seed(0)
    smear = SmearGate(16, "input")
    x, ids = torch.randn(6, 16, generator=g), torch.tensor([BOS, 5, 6, BOS, 7, 8])
    start = torch.tensor([True, False, False, False, True, False])
    assert torch.equal(smear(x, ids, start, BOS), x)
    with torch.no_grad():
        smear.lam.fill_(0.7)
        smear.w.copy_(torch.randn(1, 12, generator=g))
    out = smear(x, ids, start, BOS)
    for t in range(6):
        want = x[t] if t in (0, 3, 4) else x[t] + 0.7 * torch.sigmoid(smear.w[0] @ x[t, :12]) * x[t - 1]
        torch.testing.assert_close(out[t], want, atol=1e-6, rtol=1e-6)


def test_input_smear_and_resid_mix_start_as_the_plain_model():
    """lam = 0 and resid_mix = [1, 0] at init: the model computes exactly what the same weights compute without them."""
    torch.manual_seed(0)
    plain = randomised(all_on(smear_gate="off", resid_mix=False))
    mixed = GPT(all_on(smear_gate="input", resid_mix=True), BOS).eval()
    missing, unexpected = mixed.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and set(missing) == {"smear.w", "smear.lam"} | {f"blocks.{i}.resid_mix" for i in range(4)}
    _, ids = packed_docs()
    cu = segment_bounds(ids, BOS, 128)
    with torch.no_grad():
        assert torch.equal(mixed(ids, cu, 128), plain(ids, cu, 128))


def test_resid_mix_block_reads_the_learned_mix_of_stream_and_x0():
    cfg = all_on(resid_mix=True)
    model = randomised(cfg)
    block, plain = model.blocks[0], GPT(all_on(resid_mix=False), BOS).blocks[0]
    plain.load_state_dict({k: v for k, v in block.state_dict().items() if k != "resid_mix"})
    g = torch.Generator().manual_seed(1)
    x, x0 = torch.randn(9, cfg.model_dim, generator=g), torch.randn(9, cfg.model_dim, generator=g)
    cos, sin = model.rotary(torch.arange(9))
    cu = torch.tensor([0, 9], dtype=torch.int32)
    m = block.resid_mix.detach()
    with torch.no_grad():
        torch.testing.assert_close(block(x, cos, sin, cu, 9, "sdpa", x0), plain(m[0] * x + m[1] * x0, cos, sin, cu, 9, "sdpa"))


def test_orthogonal_init_of_qkv_and_mlp_up():
    model = GPT(all_on(init="orthogonal"), BOS)
    for block in model.blocks:
        for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.fc):
            w = lin.weight
            gram = w @ w.T if w.size(0) <= w.size(1) else w.T @ w  # orthonormal rows or columns, gain 1
            torch.testing.assert_close(gram, torch.eye(gram.size(0)), atol=1e-5, rtol=0)
        assert not block.attn.proj.weight.any() and not block.mlp.proj.weight.any()  # branch outputs still start at 0
    default = GPT(all_on(init="default"), BOS).blocks[0].mlp.fc.weight
    assert not torch.allclose(default.T @ default, torch.eye(default.size(1)), atol=0.1)


def test_variant_parameters_are_control_tensors_and_targets_stay():
    """The new parameters are raw control tensors (GPTQ, group compression) trained by Adam; GPTQ and LoRA targets and
    the quantized matrices are the same names as with our variants."""
    from lcq.grouping import role_of
    from lcq.gptq import tensor_role
    from lcq.lora import DEFAULT_TARGETS, match_targets

    ours, theirs = GPT(all_on(smear_gate="blend", resid_mix=False, init="default"), BOS), GPT(all_on(), BOS)
    assert gptq_targets(ours) == gptq_targets(theirs)
    assert match_targets(ours, DEFAULT_TARGETS) == match_targets(theirs, DEFAULT_TARGETS)
    new = set(theirs.state_dict()) - set(ours.state_dict())
    assert new == {"smear.w", "smear.lam"} | {f"blocks.{i}.resid_mix" for i in range(4)}
    state = theirs.state_dict()
    assert all(tensor_role(n, state[n]) == "raw" and role_of(n, state[n]) is None for n in new)
    _, muon = build_optimizers(theirs, all_on())
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    assert not any(id(p) in muon_ids for n, p in theirs.named_parameters() if n in new)


def test_record_preset_runs_1855s_variants_ours_one_knob_away():
    from lcq.config import resolve

    cfg, _ = resolve(["--print_config"], env={})
    assert (cfg.smear_gate, cfg.resid_mix, cfg.init) == ("input", True, "orthogonal")
    ours, _ = resolve([], env={"SMEAR_GATE": "blend", "RESID_MIX": "0", "INIT": "default"})
    assert (ours.smear_gate, ours.resid_mix, ours.init) == ("blend", False, "default")
    # an artifact written before issue 19 records SMEAR_GATE as on/off
    assert make_config("tiny", smear_gate=True).smear_gate == "blend"
    assert make_config("tiny", smear_gate=False).smear_gate == "off"
    for knob, bad in (("smear_gate", "on"), ("init", "xavier")):
        with pytest.raises(ConfigError, match=knob.upper()):
            make_config("tiny", **{knob: bad})


def test_resid_mix_reaches_every_attention_read_lane_layers_included():
    """With every resid_mix at [0, 1] each attention, in the sequential blocks and the lane layers alike, reads only the
    normed x0 (#1855 mixes x0 into lane 0's attention read; lane 1's MLP reads its own lane)."""
    from lcq.model import rms_norm, segment_positions

    model = randomised(all_on(smear_gate="input", resid_mix=True))
    with torch.no_grad():
        for block in model.blocks:
            block.resid_mix.copy_(torch.stack([torch.zeros(64), torch.ones(64)]))
    seen = {}
    for i, block in enumerate(model.blocks):
        block.attn.register_forward_pre_hook(lambda m, a, i=i: None if i in seen else seen.update({i: a[0]}))
    _, ids = packed_docs()
    cu = segment_bounds(ids, BOS, 128)
    _, start = segment_positions(cu, ids.numel())
    with torch.no_grad():
        model(ids, cu, 128)
        x0 = rms_norm(model.smear(model.tok_emb(ids), ids, start, BOS))
    assert sorted(seen) == [0, 1, 2, 3] and model.lanes.start == 3
    for i, block in enumerate(model.blocks):
        torch.testing.assert_close(seen[i], rms_norm(x0) * block.ln_scale, atol=1e-5, rtol=1e-5)
