"""`python -m lcq.bench fidelity --seed S`: our side of issue 24's fidelity check (docs/fidelity.md).

The `record` preset at the demo preset's dimensions (4 layers, d=128, MLP 4x, the demo corpus and tokenizer), trained
for a fixed number of steps, scored at the three stages that the out-of-tree port of #2135's script is scored at:
float (the EMA model), quantized (GPTQ plus the low-rank correction in its closed form, our LQER) and the eval-time
stage (TTT, with the n-gram tilt when the config has one). Every value comes from PRESETS["record"] and
RECORD_FEATURES except those that name the data, the dimensions or the clock (FIDELITY_KEEP); the record's layer
indices are scaled to the depth as `bench features` scales them, and its lengths and document counts to the demo's
(fidelity_config). So after a merge that changes the record preset, the same command measures the new preset.
"""
from __future__ import annotations

import dataclasses

from .. import dist as D
from ..config import PRESETS, RECORD_FEATURES, Config, replace

# What the record preset sets that stays the demo's: the data, its tokenizer and the MLP width (below). Everything the
# record preset leaves unset is the demo's already (batch of 4,096 tokens at 256, eval batch, the 60,000-token val prefix).
FIDELITY_KEEP = ("vocab_size", "data_path", "tokenizer_path", "mlp_mult")
# The record's lengths and counts that scale with the demo: eval windows with TRAIN_SEQ_LEN (record 2048 -> demo 256),
# the global TTT prefix with the val split's document count (#1855/#2135: 2,500 of 50,000 documents).
RECORD_TRAIN_SEQ_LEN = 2048
RECORD_VAL_DOCS = 50_000
# #2135's MLP is 4x (its README's command leaves MLP_MULT at the default 4.0); the record preset's 3.875 is a byte
# choice that the demo dimensions do not need.
FIDELITY_MLP_MULT = 4.0
# LQER's storage at these dimensions: #2135 corrects its top 3 tensors at rank 4 (int2 A / int4 B, asymmetric groups);
# our closed form spends the same kind of budget where it removes the most error (LCQ_BYTES, issue 16). The default is
# the byte count of that correction on the port's 4-layer d=128 tensors (docs/fidelity.md); --lcq-bytes sets another.
FIDELITY_LCQ_BYTES = 4_000


def fidelity_config(cfg: Config, steps: int, n_val_docs: int, lcq_bytes: int) -> Config:
    """`cfg` (the demo preset, with its seed and any overrides) with the record preset's values and features laid over
    it, scaled to cfg's dimensions; fixed steps, LCQ in closed form only (no distillation: deterministic, as LQER)."""
    from .bench_run import scaled_features

    record = {k: v for k, v in PRESETS["record"].items() if k not in FIDELITY_KEEP}
    feats = {k: v for group in scaled_features(cfg).values() for k, v in group.items()}
    # A feature that cannot hold at this depth (scaled_features leaves it out) is off, not at its 11-layer value.
    feats = {**{k: Config.__dataclass_fields__[k].default for g in RECORD_FEATURES.values() for k in g}, **feats}
    over = {**record, **feats}
    scale = cfg.train_seq_len / RECORD_TRAIN_SEQ_LEN
    phases, window, docs = over.get("ttt_phases", 0), over.get("eval_seq_len", 0), over.get("ttt_phase_docs", 0)
    over.update(
        mlp_mult=FIDELITY_MLP_MULT, iterations=steps, max_wallclock_seconds=1e5, train_reserve_seconds=30.0,
        serialize_reserve_seconds=5.0, eval_seq_len=round(window * scale),
        ttt_phase_docs=max(phases, round(docs * n_val_docs / RECORD_VAL_DOCS)) if phases else 0,
        lcq_bytes=str(lcq_bytes), lcq_max_steps=0, submission_json="")
    return replace(cfg, **over)


def bench_fidelity(cfg: Config, dinfo: D.DistInfo, steps: int, lcq_bytes: int) -> dict:
    from .bench_run import trained_run
    from ..data import doc_starts, load_val_tokens
    from ..pipeline import evaluate_shipped, lcq, quantize, ship

    if cfg.auto_build_demo and dinfo.is_master:
        from .corpus import ensure_demo
        ensure_demo(cfg.data_path, cfg.tokenizer_path)
    D.barrier()
    val = load_val_tokens(cfg.data_path, cfg.val_max_tokens)
    n_docs = len(doc_starts(val, int(val[0])))
    fcfg = fidelity_config(cfg, steps, n_docs, lcq_bytes)
    run = trained_run(fcfg, dinfo, f"fidelity_s{cfg.seed}")
    quantize(run)
    lcq(run)
    ship(run)
    evaluate_shipped(run)
    stages = {k: v.val_bpb for k, v in run.scores.items()}
    last = [k for k in stages if k.endswith("_ttt")]
    row = dict(seed=cfg.seed, steps=run.train_result.steps, float_bpb=stages["pre_quant"],
               quantized_bpb=stages.get("quantized_lcq", stages["quantized"]), gptq_only_bpb=stages["quantized"],
               eval_stage=last[0] if last else None, eval_stage_bpb=stages[last[0]] if last else None,
               lora_bytes=run.size.lora_bytes, model_bytes=run.size.model_bytes, val_docs=n_docs)
    run.log(f"bench fidelity {row}")
    run.log.close()
    print(f"\nfidelity (ours): record preset at {fcfg.num_layers} layers, d={fcfg.model_dim}, MLP {fcfg.mlp_mult}x, "
          f"{row['steps']} steps, seed {cfg.seed}; eval window {fcfg.window}, TTT phase prefix {fcfg.ttt_phase_docs} of "
          f"{n_docs} val documents, LCQ_BYTES={lcq_bytes} closed form")
    for name in ("float_bpb", "quantized_bpb", "eval_stage_bpb"):
        print(f"{name:<16} {row[name]:.5f}" if row[name] is not None else f"{name:<16} n/a (TTT off)")
    return dict(bench="fidelity", preset=cfg.preset, config={k: getattr(fcfg, k) for k in (
        "num_layers", "model_dim", "mlp_mult", "eval_seq_len", "ttt_phase_docs", "lcq_bytes", "iterations")},
        **row, fields=sorted(f.name for f in dataclasses.fields(Config) if getattr(fcfg, f.name) != getattr(cfg, f.name)))
