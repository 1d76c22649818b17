"""Benchmarks that print ratios measured side by side in one run (never timed tests).

    python -m lcq.bench quant    # GPTQ vs round-to-nearest: bpb gap ratio per bit width, bytes/param per compressor
    python -m lcq.bench lcq      # LCQ: recovered fraction per init / rank / training / shipping strategy, at int4 and int6
    python -m lcq.bench lcq --equal-bytes  # LQER vs LCQ vs the byte allocation at LoRA budgets of 2-32 KB (issue 16)
    python -m lcq.bench attribution  # does LCQ pay once the eval does TTT? three arms x training budgets, same seed
    python -m lcq.bench features  # the record stack at demo scale: all features on, then each one off in turn
    python -m lcq.bench sizing --preset record  # projected artifact bytes from measured bytes/param of its codes
    python -m lcq.bench serialize  # record-size artifact: bytes and charged seconds, serial vs parallel vs overlapped
    python -m lcq.bench compressors [--codes RUN.lcq]  # model section bytes/seconds: brotli vs auto vs group
    python -m lcq.bench step --preset record --world 8  # one training step's ATen ops, host reads, bytes sent (issue 18)
    python -m lcq.bench fidelity --seed 1337  # the record preset at demo dims: float, quantized, eval-stage bpb (issue 24)
    python -m lcq.bench ttt      # batched TTT at TTT_BATCH_DOCS 1/8/32/64, and its work projected to #1855's val split
    python -m lcq.bench ttt --context  # TTT_CONTEXT recompute vs reuse at equal seconds, 2 seeds (issue 26)
    python -m lcq.bench fit      # the fit (issue 25): bpb per KB of zeroing the cheapest +-1 codes, by fraction
    python -m lcq.bench ngram    # n-gram tilt hints: seconds on this CPU, one process and split over --world ranks

Each trains the demo-preset model on the embedded corpus (or the preset/knobs given, e.g. --preset record on a GPU box),
writes its run logs under LOG_DIR, prints a table and ends with one JSON line holding the figures.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import sys
import time
import zlib
from pathlib import Path

import torch

from .. import artifact
from .. import grouping
from .. import dist as D
from ..config import Config, replace, resolve
from ..distill import lcq_target_names
from ..evaluate import EvalResult
from ..files import atomic_write
from ..gptq import QuantSpec, clip_for, dequantize_state, quantize_rtn, quantize_state, tensor_role
from ..lora import LORA_ENTRY_BYTES, LORA_SECTION_BYTES, config_format, factor_bytes
from ..pipeline import (TIED, Run, build, evaluate_shipped, lcq, open_run, quant_spec, quantize,
                       run_training, score, score_ttt, ship)
from ..shipping import artifact_meta, load_shipped, model_from_state, pack_lora, prune, prune_order
from . import artifact_tools
from .bench_run import scaled_features, trained_run


# Clip candidates in row standard deviations (0 = max-abs). The record default (12.85) is tuned for int6 and is far
# too wide at int4, so each (bits, method) pair gets its own best k from this grid, chosen on the Hessian-weighted
# output error of the matrices (no val data involved).
CLIP_GRID = (0.0, 2.5, 3.0, 4.0, 6.0, 8.0, 12.85, 20.0)


def clip_for_bits(cfg: Config, bits: int) -> float:
    """For the LCQ bench: scale the configured int6 clip with the grid size (int4 clips near 2.9 sigma), so each
    bit width keeps the record's step of MATRIX_CLIP_SIGMAS / 31 standard deviations."""
    return cfg.matrix_clip_sigmas * (2 ** (bits - 1) - 1) / 31


def weighted_error(state, tensors, qmeta, hessians) -> float:
    """sum over matrices of tr(E H E^T): the calibration-data proxy of the output error GPTQ minimises."""
    deq = dequantize_state(tensors, qmeta)
    total = 0.0
    for name, H in hessians.items():
        if name == "tok_emb.weight":
            continue
        E = state[name].float() - deq[name].float()
        total += float(((E @ H.float()) * E).sum())
    return total


def int8_zlib_bytes(state: dict[str, torch.Tensor]) -> int:
    """The plain baseline: every float tensor with >1 row as per-row max-abs int8 + fp16 scales, the rest fp16, zlib -9."""
    chunks = []
    seen = set()
    for name in sorted(state):
        t = state[name]
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        if t.ndim == 2:
            q, s = quantize_rtn(t.float(), 8, 0.0)
            chunks += [q.numpy().tobytes(), s.numpy().tobytes()]
        else:
            chunks.append(t.detach().half().numpy().tobytes())
    return len(zlib.compress(b"".join(chunks), 9))


def bench_quant(cfg: Config, dinfo: D.DistInfo, bits_list: list[int]) -> dict:
    run = trained_run(replace(cfg, lcq_rank="0"), dinfo, "quant")
    float_score = score(run, run.model)
    run.log(f"bench float val_bpb:{float_score.val_bpb:.6f}")
    quantize(run)  # the Hessians, and the GPTQ time at the configured bits
    gptq_seconds = next(s for stage, s, _ in run.ledger if stage == "gptq")
    state = {k: v.detach() for k, v in run.model.state_dict().items()}
    n_params = sum(p.numel() for p in run.model.parameters())
    rows = []
    for bits in bits_list:
        row = dict(bits=bits)
        for method in ("gptq", "rtn"):
            best = None
            for k in CLIP_GRID:
                spec = QuantSpec(method=method, matrix_bits=bits, embed_bits=cfg.embed_bits, matrix_clip_sigmas=k,
                                 embed_clip_sigmas=cfg.embed_clip_sigmas, damp=cfg.gptq_damp,
                                 block_size=cfg.gptq_block_size, act_order=cfg.gptq_act_order)
                tensors, qmeta = quantize_state(state, run.hessians, spec, TIED)
                err = weighted_error(state, tensors, qmeta, run.hessians)
                if best is None or err < best[0]:
                    best = (err, k, tensors, qmeta)
            _, k, tensors, qmeta = best
            row[f"{method}_clip_sigmas"] = k
            model = model_from_state(cfg, run.bos_id, dequantize_state(tensors, qmeta), dinfo.device)
            r = score(run, model)
            row[f"{method}_bpb"] = r.val_bpb
            row[f"{method}_gap"] = r.val_bpb - float_score.val_bpb
            if method == "gptq":
                cpu = {k: v.cpu() for k, v in tensors.items()}
                meta = artifact_meta(cfg, run.bos_id, qmeta, None)
                for comp in ("lzma", "brotli"):
                    row[f"bytes_per_param_{comp}"] = len(artifact_tools.encode(cpu, meta, comp)) / n_params
            run.log(f"bench bits:{bits} {method} clip:{k} val_bpb:{r.val_bpb:.6f} gap:{row[f'{method}_gap']:.6f}")
        row["gap_ratio_gptq_over_rtn"] = row["gptq_gap"] / row["rtn_gap"] if row["rtn_gap"] > 0 else float("nan")
        rows.append(row)
    # How much of every gap is the int8 tied embedding alone (float matrices, quantized embedding).
    deq = dequantize_state(run.qtensors, run.qmeta)
    embed_only = dict(state, **{"tok_emb.weight": deq["tok_emb.weight"], "lm_head.weight": deq["tok_emb.weight"]})
    embed_gap = score(run, model_from_state(cfg, run.bos_id, embed_only, dinfo.device)).val_bpb - float_score.val_bpb
    baseline = int8_zlib_bytes(state) / n_params
    train_s = run.train_result.train_time_s
    result = dict(bench="quant", preset=cfg.preset, params=n_params, float_bpb=float_score.val_bpb,
                  int8_zlib_bytes_per_param=baseline, gptq_seconds=gptq_seconds, train_seconds=train_s,
                  gptq_time_fraction=gptq_seconds / train_s, embed_only_gap=embed_gap, rows=rows)
    print(f"\nGPTQ vs RTN on the {cfg.preset} model ({n_params} params, float val_bpb {float_score.val_bpb:.4f})")
    print(f"{'bits':>4} {'gptq gap':>10} {'rtn gap':>10} {'ratio':>7} {'k gptq/rtn':>11} {'B/param lzma':>13} "
          f"{'B/param brotli':>15} {'vs int8+zlib':>13}")
    for row in rows:
        best = min(row["bytes_per_param_lzma"], row["bytes_per_param_brotli"])
        clips = f"{row['gptq_clip_sigmas']:g}/{row['rtn_clip_sigmas']:g}"
        print(f"{row['bits']:>4} {row['gptq_gap']:>10.5f} {row['rtn_gap']:>10.5f} {row['gap_ratio_gptq_over_rtn']:>7.3f} "
              f"{clips:>11} {row['bytes_per_param_lzma']:>13.4f} {row['bytes_per_param_brotli']:>15.4f} {best / baseline:>13.3f}")
    print(f"the int{cfg.embed_bits} embedding alone (float matrices) costs {embed_gap:.5f} bpb of every gap above")
    print(f"int8 + zlib baseline: {baseline:.4f} bytes/param; GPTQ took {gptq_seconds:.2f}s = "
          f"{100 * gptq_seconds / train_s:.1f}% of the {train_s:.1f}s of training")
    run.log.close()
    return result


def bench_lcq(cfg: Config, dinfo: D.DistInfo, bits_list: list[int], ranks: list[int], inits: list[str],
              time_frac: float) -> dict:
    run = trained_run(replace(cfg, lcq_rank="0"), dinfo, "lcq")
    train_s = run.train_result.train_time_s
    pre = score(run, run.model).val_bpb
    lcq_seconds = time_frac * train_s
    rows = []
    base_cfg = run.cfg
    for bits in bits_list:
        run.cfg = replace(base_cfg, lcq_rank="0", matrix_bits=bits, matrix_clip_sigmas=clip_for_bits(base_cfg, bits),
                          max_wallclock_seconds=1e9, train_reserve_seconds=0.0)
        run.ledger = []
        quantize(run)
        quant = score(run, model_from_state(run.cfg, run.bos_id, run.gptq_state, dinfo.device)).val_bpb
        variants = [(init, r, trained, "side") for r in ranks for init in inits for trained in (False, True)]
        variants += [(inits[-1], r, True, "baked") for r in ranks]
        for n, (init, r, trained, merge) in enumerate(variants):
            run.cfg = replace(run.cfg, lcq_rank=str(r), lcq_init=init, lcq_merge=merge, compressor="lzma",
                              lcq_max_steps=base_cfg.lcq_max_steps if trained else 0, lcq_seconds=lcq_seconds,
                              artifact_path=f"{base_cfg.log_dir}/{base_cfg.run_id}_{bits}_{n}.lcq",
                              serialize_reserve_seconds=0.0, lcq_safety_seconds=0.0)
            run.lora_tensors, run.lora_meta, run.scores = {}, None, {}
            saved = dict(qtensors=run.qtensors, qmeta=run.qmeta)
            lcq(run)
            ship(run)
            shipped = load_and_score(run)
            lcq_s = run.distill_result.seconds if trained else 0.0
            gap = quant - pre
            rows.append(dict(bits=bits, init=init, rank=r, trained=trained, merge=merge, pre_bpb=pre, quant_bpb=quant,
                             lcq_bpb=shipped, recovered=(quant - shipped) / gap if gap > 0 else float("nan"),
                             lora_bytes=run.size.lora_bytes, lcq_seconds=lcq_s, lcq_time_fraction=lcq_s / train_s,
                             steps=run.distill_result.steps))
            run.qtensors, run.qmeta = saved["qtensors"], saved["qmeta"]
            run.log(f"bench {json.dumps(rows[-1])}")
    print(f"\nLCQ on the {cfg.preset} model: pre-quant val_bpb {pre:.4f}, distillation budget {lcq_seconds:.1f}s "
          f"({100 * time_frac:.0f}% of {train_s:.1f}s training)")
    print(f"{'bits':>4} {'init':>8} {'rank':>4} {'trained':>7} {'merge':>6} {'quant bpb':>10} {'lcq bpb':>9} "
          f"{'recovered':>9} {'LoRA B':>8} {'time frac':>9}")
    for row in rows:
        print(f"{row['bits']:>4} {row['init']:>8} {row['rank']:>4} {str(row['trained']):>7} {row['merge']:>6} "
              f"{row['quant_bpb']:>10.5f} {row['lcq_bpb']:>9.5f} {row['recovered']:>9.3f} {row['lora_bytes']:>8} "
              f"{row['lcq_time_fraction']:>9.3f}")
    best = max((r for r in rows if not math.isnan(r["recovered"]) and r["lcq_time_fraction"] <= 0.15),
               key=lambda r: r["recovered"], default=None)
    if best:
        print(f"best within 15% of training time: {best['recovered']:.3f} of the gap recovered "
              f"(int{best['bits']}, {best['init']}, r={best['rank']}, trained={best['trained']}, {best['merge']}); "
              f"target >= 0.5: {'met' if best['recovered'] >= 0.5 else 'NOT met'}")
    run.log.close()
    return dict(bench="lcq", preset=cfg.preset, train_seconds=train_s, lcq_seconds_budget=lcq_seconds, rows=rows,
                best=best)


def load_and_score(run: Run) -> float:
    model, _, _ = load_shipped(run.cfg.artifact_file, run.cfg, run.dinfo.device)
    return score(run, model).val_bpb


def _arm_ttt(run: Run, init: str) -> EvalResult:
    """Sliding + score-first TTT on the run's artifact, the adapter started as `init` (artifact | zero)."""
    saved = run.cfg
    run.cfg = replace(saved, ttt_init=init)
    try:
        return score_ttt(run, saved.artifact_file)
    finally:
        run.cfg = saved


def attribution_arms(cfg: Config, budget: float) -> dict[str, tuple[Config, tuple[str, ...]]]:
    """The three arms at one training clock, each with the TTT starts it is scored with. The reserve, its serialize
    share and LCQ's safety margin scale with the budget as the preset's shares (demo: 30, 5 and 2 of 150 s); arm (a)
    keeps back only serialization plus a quarter of the rest for GPTQ (at least 1.5 GPTQ_MIN_SECONDS), as the old
    ablation did."""
    share = budget / cfg.max_wallclock_seconds
    reserve = cfg.train_reserve_seconds * share
    serialize = cfg.serialize_reserve_seconds * share
    small = serialize + max(1.5 * cfg.gptq_min_seconds, (reserve - serialize) / 4)
    base = replace(cfg, max_wallclock_seconds=budget, train_reserve_seconds=reserve, serialize_reserve_seconds=serialize,
                   lcq_safety_seconds=cfg.lcq_safety_seconds * share, ttt_enabled=False)
    return {"a_full_budget_no_lcq": (replace(base, lcq_rank="0", train_reserve_seconds=small), ("zero",)),
            "b_reserve_cut_lcq_side": (replace(base, lcq_merge="side"), ("artifact", "zero")),
            "c_reserve_cut_lcq_baked": (replace(base, lcq_merge="baked"), ("zero",))}


def bench_attribution(cfg: Config, dinfo: D.DistInfo, budgets: list[float], plot: str,
                      only: list[str] | None = None) -> dict:
    """Does a train-time LoRA still pay when the eval does TTT? Same seed and training clock per budget; every arm is
    the full pipeline, scored from its decoded artifact by the sliding eval and by sliding + TTT, bytes counted."""
    rows = []
    for budget in budgets:
        for tag, (arm, inits) in attribution_arms(cfg, budget).items():
            if only and tag[0] not in only:
                continue
            run = trained_run(arm, dinfo, f"attr_{int(budget)}_{tag}")
            quantize(run)
            lcq(run)
            ship(run)
            evaluate_shipped(run)
            shipped_stage = "quantized_lcq" if run.lora_meta else "quantized"
            row = dict(budget_s=budget, arm=tag, train_reserve_s=arm.train_reserve_seconds,
                       train_s=run.train_result.train_time_s, steps=run.train_result.steps,
                       train_clock_s=run.clock_used, pre_quant_bpb=run.scores["pre_quant"].val_bpb,
                       quantized_bpb=run.scores["quantized"].val_bpb, sliding_bpb=run.scores[shipped_stage].val_bpb,
                       sliding_eval_s=run.scores[shipped_stage].seconds, total_bytes=run.size.total,
                       lora_bytes=run.size.lora_bytes)
            for init in inits:
                res = _arm_ttt(run, init)
                row[f"ttt_{init}_bpb"] = res.val_bpb
                row[f"ttt_{init}_eval_s"] = res.seconds
            rows.append(row)
            run.log(f"bench {json.dumps(row)}")
            run.log.close()
    print(f"\nattribution on the {cfg.preset} preset (seed {cfg.seed}); bpb of the decoded artifact, bytes counted")
    print(f"{'budget':>6} {'arm':<24} {'train s':>7} {'steps':>5} {'pre-quant':>9} {'quantized':>9} {'sliding':>8} "
          f"{'ttt zero':>8} {'ttt lora':>8} {'bytes':>8} {'ttt eval s':>10}")
    for r in rows:
        lora = f"{r['ttt_artifact_bpb']:.5f}" if "ttt_artifact_bpb" in r else "-"
        print(f"{r['budget_s']:>6.0f} {r['arm']:<24} {r['train_s']:>7.1f} {r['steps']:>5} {r['pre_quant_bpb']:>9.5f} "
              f"{r['quantized_bpb']:>9.5f} {r['sliding_bpb']:>8.5f} {r['ttt_zero_bpb']:>8.5f} {lora:>8} "
              f"{r['total_bytes']:>8} {r['ttt_zero_eval_s']:>10.1f}")
    verdicts = []
    for budget in budgets:
        by = {r["arm"]: r for r in rows if r["budget_s"] == budget}
        if len(by) < 3:
            continue  # --arms ran a subset (a lever measured on one arm): no verdict
        full = by["a_full_budget_no_lcq"]["ttt_zero_bpb"]
        best_lcq = min(by["b_reserve_cut_lcq_side"]["ttt_artifact_bpb"], by["b_reserve_cut_lcq_side"]["ttt_zero_bpb"],
                       by["c_reserve_cut_lcq_baked"]["ttt_zero_bpb"])
        shipped = by["b_reserve_cut_lcq_side"]["ttt_artifact_bpb"]
        verdicts.append(dict(budget_s=budget, full_budget_ttt_zero=full, lcq_side_ttt_from_lora=shipped,
                             best_lcq_ttt=best_lcq, lora_ttt_minus_full=shipped - full))
        print(f"budget {budget:.0f}s: TTT from the shipped LoRA {shipped:.5f} vs full budget + TTT from zero {full:.5f}: "
              f"{'LCQ pays' if shipped < full else 'LCQ does not pay'} ({shipped - full:+.5f} bpb)")
    plotted = write_plot(rows, budgets, plot) if plot and dinfo.is_master else None
    return dict(bench="attribution", preset=cfg.preset, seed=cfg.seed, budgets=budgets, rows=rows, verdicts=verdicts,
                plot=plotted)


def write_plot(rows: list[dict], budgets: list[float], path: str) -> str | None:
    """Final bpb (sliding + TTT, each arm's best start) against the training budget, one line per arm (PNG)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"plot skipped: matplotlib is not installed (pip install -e '.[plot]'); {path} not written")
        return None
    series = {"a_full_budget_no_lcq": ("ttt_zero_bpb", "(a) full budget, no LCQ, TTT from zero"),
              "b_reserve_cut_lcq_side": ("ttt_artifact_bpb", "(b) reserve cut + LCQ side, TTT from the LoRA"),
              "b_zero": ("ttt_zero_bpb", "(b) reserve cut + LCQ side, TTT from zero"),
              "c_reserve_cut_lcq_baked": ("ttt_zero_bpb", "(c) reserve cut + LCQ baked, TTT from zero")}
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, (field, label) in series.items():
        arm = "b_reserve_cut_lcq_side" if key == "b_zero" else key
        pts = sorted((r["budget_s"], r[field]) for r in rows if r["arm"] == arm)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xlabel("training clock (s)")
    ax.set_ylabel("val_bpb, sliding + TTT (lower is better)")
    ax.set_xticks(budgets)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write(path, buf.getvalue())
    print(f"wrote {path}")
    return path


def _field_default(name: str):
    return Config.__dataclass_fields__[name].default


# Features that change only how the trained weights are quantized or stored: their arms re-quantize the all-on model
# instead of training again (same weights, so the delta is the quantizer's or the compressor's alone).
QUANT_ONLY_FEATURES = ("role_clips", "int7_embed", "group_compression")
# #1855's own variants of parts we also build (issue 19): their no_<name> arm is not "off" but our variant.
OUR_VARIANTS = {"input_smear": "SMEAR_GATE=blend", "resid_mix": "RESID_MIX=0", "orthogonal_init": "INIT=default"}


def bench_features(cfg: Config, dinfo: D.DistInfo, clock: float, steps: int = 0, only: list[str] | None = None) -> dict:
    """The record stack's features at this preset's scale: one arm with all of them on, then one arm per feature with
    only that one switched back to its field default. Same seed for every arm, and the same training clock, or with
    `steps` > 0 the same number of steps (on a machine other processes load, a clock buys each arm a different number
    of steps). LCQ off, so each arm's score is the decoded GPTQ artifact."""
    feats = scaled_features(cfg)
    unknown = sorted(set(only or []) - set(feats))
    if unknown:
        raise ValueError(f"--features: unknown {unknown}; choose from {sorted(feats)}")
    if steps:
        clock = max(clock, 1e5)  # the step count binds
    reserve = min(cfg.train_reserve_seconds, clock / 5)
    base = replace(cfg, **{k: v for group in feats.values() for k, v in group.items()}, lcq_rank="0",
                   max_wallclock_seconds=clock, train_reserve_seconds=reserve, iterations=steps or cfg.iterations,
                   serialize_reserve_seconds=min(cfg.serialize_reserve_seconds, reserve / 2), ttt_enabled=False)
    arms = [("all_on", base)] + [(f"no_{name}", replace(base, **{k: _field_default(k) for k in group}))
                                 for name, group in feats.items() if not only or name in only]
    rows, trained = [], None
    for tag, arm in arms:
        if tag[3:] in QUANT_ONLY_FEATURES:
            state, params, res = trained
            run = open_run(replace(arm, run_id=f"bench_feat_{tag}_{time.strftime('%Y%m%d_%H%M%S')}",
                                   submission_json=""), dinfo)
            run.model = model_from_state(run.cfg, run.bos_id, state, dinfo.device)
            run.train_result = res
            run.charge("train", res.train_time_s, run.cfg.train_budget_seconds, reused="all_on")
        else:
            run = trained_run(arm, dinfo, f"feat_{tag}")
            params, res = sum(p.numel() for p in run.model.parameters()), run.train_result
            if tag == "all_on":
                trained = ({k: v.detach().clone() for k, v in run.model.state_dict().items()}, params, res)
        quantize(run)
        lcq(run)
        ship(run)
        evaluate_shipped(run)
        rows.append(dict(arm=tag, steps=res.steps, train_s=res.train_time_s, params=params,
                         pre_quant_bpb=run.scores["pre_quant"].val_bpb, bpb=run.scores["quantized"].val_bpb,
                         model_bytes=run.size.model_bytes, total_bytes=run.size.total))
        run.log(f"bench {json.dumps(rows[-1])}")
        run.log.close()
    on = rows[0]
    for r in rows:
        r["delta_bpb"] = r["bpb"] - on["bpb"]  # > 0: switching the feature off costs bpb, i.e. the feature helps
        # Model bytes only: the code bytes are the same program in every arm.
        r["delta_bytes"] = r["model_bytes"] - on["model_bytes"]
    budget = f"{steps} steps per arm" if steps else f"{clock:.0f}s clock per arm ({clock - reserve:.0f}s training)"
    print(f"\nrecord features at the {cfg.preset} preset's scale ({cfg.num_layers} layers, d={cfg.model_dim}), seed "
          f"{cfg.seed}, {budget}, LCQ off; bpb of the decoded artifact; {', '.join(QUANT_ONLY_FEATURES)} re-quantize "
          f"the all-on model. Demo-scale deltas do not predict record-scale ones.")
    print(f"{'arm':<22} {'steps':>5} {'train s':>7} {'pre-quant':>9} {'bpb':>8} {'d bpb':>9} {'model B':>9} {'d bytes':>8}")
    for r in rows:
        print(f"{r['arm']:<22} {r['steps']:>5} {r['train_s']:>7.1f} {r['pre_quant_bpb']:>9.5f} {r['bpb']:>8.5f} "
              f"{r['delta_bpb']:>+9.5f} {r['model_bytes']:>9} {r['delta_bytes']:>+8}")
    print("d bpb = bpb with the feature off minus bpb with all on (> 0: the feature helps at this scale); "
          "d bytes = model bytes likewise (< 0: the feature costs bytes)")
    print("; ".join(f"no_{k} = ours, {v}" for k, v in OUR_VARIANTS.items() if k in feats))
    return dict(bench="features", preset=cfg.preset, seed=cfg.seed, clock_s=None if steps else clock,
                steps=steps or None, features={k: v for k, v in feats.items()}, rows=rows)


def bench_sizing(cfg: Config) -> dict:
    """Projected artifact bytes of `cfg`'s model (the record preset by default) from measured bytes per parameter of
    its codes: Gaussian rows (what Muon-trained matrices look like to a per-row std clip) quantized by the real scale
    rule at each role's bits and clip, stored as the artifact stores them (int8 codes + float16 row scales), brotli-11.
    One sample matrix per role and shape; control tensors at 2 bytes each, uncompressed; code = the shipped script."""
    import brotli

    from ..model import GPT
    from ..script import shipped_script

    spec = quant_spec(cfg)
    with torch.device("meta"):
        model = GPT(cfg, 1)
    gen = torch.Generator().manual_seed(cfg.seed)
    per_shape: dict[tuple, float] = {}
    rows, control = {}, 0
    for name, p in model.named_parameters():
        role = tensor_role(name, p)
        if role == "raw":
            control += 2 * p.numel()
            continue
        bits = spec.embed_bits if role == "embed" else spec.matrix_bits
        key = (tuple(p.shape), bits, clip_for(spec, name, role))
        if key not in per_shape:  # bytes per param, unpruned and with FIT_MAX_FRACTION of the +-1 codes zeroed
            q, s = quantize_rtn(torch.randn(*p.shape, generator=gen), bits, key[2])
            order = prune_order({"w.q": q, "w.scale": s}, {})
            pruned = prune({"w.q": q}, order, int(cfg.fit_max_fraction * len(order[1])))["w.q"]
            per_shape[key] = tuple(len(brotli.compress(c.numpy().tobytes() + s.numpy().tobytes(), quality=11))
                                   / p.numel() for c in (q, pruned))
        group = "embed" if role == "embed" else ("attn" if ".attn." in name else "mlp")
        r = rows.setdefault(group, dict(params=0, bytes=0.0, fitted_bytes=0.0, bits=bits, clip=key[2]))
        r["params"] += p.numel()
        r["bytes"] += per_shape[key][0] * p.numel()
        r["fitted_bytes"] += per_shape[key][1] * p.numel()
    code = len(shipped_script())
    total = sum(r["bytes"] for r in rows.values()) + control + code
    print(f"\nprojected artifact of the {cfg.preset} preset ({sum(r['params'] for r in rows.values()):,} quantized params, "
          f"MLP {cfg.mlp_mult}x, vocab {cfg.vocab_size}); brotli-11 on Gaussian codes")
    print(f"{'role':<6} {'params':>11} {'bits':>4} {'clip':>5} {'B/param':>8} {'bytes':>11} {'at bound':>11}")
    for g, r in rows.items():
        print(f"{g:<6} {r['params']:>11,} {r['bits']:>4} {r['clip']:>5} {r['bytes'] / r['params']:>8.4f} "
              f"{r['bytes']:>11,.0f} {r['fitted_bytes']:>11,.0f}")
    print(f"control tensors {control:,} B, code {code:,} B: total {total:,.0f} of "
          f"{cfg.artifact_cap_bytes:,} ({cfg.artifact_cap_bytes - total:+,.0f})")
    # The fit (issue 25): whether zeroing FIT_MAX_FRACTION of the +-1 codes (cheapest s^2 first) saves the excess, and
    # the share it would take if savings grew linearly with the count (a lower estimate: on the demo each code zeroed
    # saved more as more went, docs/fit.md)
    save = sum(r["bytes"] - r["fitted_bytes"] for r in rows.values())
    excess = max(0.0, total - cfg.artifact_cap_bytes)
    fit = dict(excess_bytes=round(excess), saved_at_bound_bytes=round(save), fits=excess <= save,
               fraction=cfg.fit_max_fraction * excess / save if save > 0 else None)
    print("fit: nothing to prune" if not excess else
          f"fit: {excess:,.0f} B over; FIT_MAX_FRACTION={cfg.fit_max_fraction:g} of the +-1 codes saves {save:,.0f} B: "
          + (f"projected to prune ~{fit['fraction']:.1%} of them" if fit["fits"] else "does NOT fit (NO-GO)"))
    total -= min(excess, save)
    # The LoRA the preset would ship under this projection: LCQ_BYTES (auto = the cap less the above and the headroom),
    # and the rank units it buys at the targets' mean unit cost with every target paying its manifest entry (a lower
    # estimate: the real split follows the trained model's errors, lcq.lora.allocate_bytes).
    names = lcq_target_names(model, cfg) if cfg.lcq_enabled else []
    lcq_bytes = 0 if not names or cfg.lcq_bytes == "0" else int(cfg.lcq_bytes) if cfg.lcq_bytes != "auto" else \
        max(0, cfg.artifact_cap_bytes - round(total) - cfg.lcq_auto_headroom_bytes)
    mods, fmt = dict(model.named_modules()), config_format(cfg)
    unit = sum(factor_bytes(mods[n].in_features, mods[n].out_features, 1, fmt) for n in names) / max(1, len(names))
    units = int(max(0, lcq_bytes - LORA_SECTION_BYTES - LORA_ENTRY_BYTES * len(names)) // unit) if names else 0
    print(f"LoRA (LCQ_BYTES={cfg.lcq_bytes}, factors {'+'.join(map(str, fmt[:2]))} bits): {lcq_bytes:,} B, ~{units} "
          f"rank units over {len(names)} targets; total {total + lcq_bytes:,.0f}")
    return dict(bench="sizing", preset=cfg.preset, roles=rows, control_bytes=control, code_bytes=code,
                projected_bytes=round(total), cap=cfg.artifact_cap_bytes, lcq_bytes=lcq_bytes, lcq_units=units,
                projected_total_bytes=round(total) + lcq_bytes, fit=fit)


def serialize_payload(cfg: Config) -> tuple[dict, dict, dict, dict, int]:
    """What a run of `cfg`'s preset ships, without training: a randomly initialised model of the preset with every
    block matrix drawn N(0, 1/fan_in) (the zero-init output projections would quantize to all-zero codes, far more
    compressible than trained weights), quantized by the real code (quantize_state: SDClip row scales at the preset's
    bits; RTN, since a random model has no Hessians worth solving), and a LoRA of the preset's rank on its LCQ targets
    with random factors, packed by the real code (pack_lora). Returns (base tensors, base meta, LoRA tensors, LoRA
    meta, parameters quantized). The meta holds qmeta (not the tokenizer identity: no tokenizer file is needed)."""
    from ..lora import attach_lora, lora_modules
    from ..model import build_model
    from ..distill import lcq_target_names
    from ..pipeline import quant_spec
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, 1, torch.device("cpu"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if tensor_role(name, p) == "matrix":
                p.normal_(0.0, p.shape[1] ** -0.5)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    params = sum(p.numel() for p in model.parameters())
    spec = dataclasses.replace(quant_spec(cfg), method="rtn")
    tensors, qmeta = quantize_state(state, None, spec, TIED)
    rank = 8 if cfg.lcq_rank in ("auto", "0") else int(cfg.lcq_rank)
    attach_lora(model, lcq_target_names(model, cfg), rank, cfg.lcq_alpha)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.set_factors(torch.randn_like(m.lora_B) * 0.01, torch.randn_like(m.lora_A) * m.lora_A.shape[1] ** -0.5)
    lora, ranks, alpha = pack_lora(model, config_format(cfg))
    lora_meta = dict(merge="side", init="random", ranks=ranks, alpha=alpha, format=list(config_format(cfg)))
    return tensors, {"bench": "serialize", "qmeta": qmeta, "lora": None}, lora, lora_meta, params


SERIALIZE_STRATEGIES = ("serial", "parallel", "overlapped")


def bench_serialize(cfg: Config, lcq_window: float | None, threads: int,
                    strategies: tuple[str, ...] = SERIALIZE_STRATEGIES, keep_backends: bool = False) -> dict:
    """Bytes and seconds charged to the training clock per serialization strategy, on the preset's artifact:

    serial: the whole artifact (model + LoRA) as one stream after LCQ, each compressor on one thread (the lcq of before
      issue 8: `auto` ran lzma and brotli side by side);
    parallel: the model and LoRA sections, cut into artifact.CHUNK_BYTES chunks on every thread, after LCQ;
    overlapped: what the pipeline does: the model section starts on host threads when GPTQ ends, LCQ runs on the
      device (the host thread waits out `lcq_window` seconds), then the LoRA section is compressed and the model
      section awaited. Charged: from the end of LCQ to the artifact's bytes in memory.
    The overlapped job gets the pipeline's deadline, the LCQ window (lrzip is dropped when projected past it), unless
    `keep_backends`: then every back-end runs, to time what it takes. The pipeline's projection (the job's
    seconds_left, from its first finished chunks) is reported beside what the model section really took, with the
    group planning's seconds and each back-end's seconds per chunk; the many-core figure gives each timed task its own
    thread after the planning (which runs on one): the planning plus the longest task. Each strategy's CPU
    seconds (all threads, lrzip's child processes included) stand beside its wall seconds: on a shared host the wall
    time depends on the other load, the CPU time much less."""
    if lcq_window is None:  # the GPTQ + LCQ share the preset's reserve split leaves
        lcq_window = cfg.train_reserve_seconds - cfg.serialize_reserve_seconds - cfg.lcq_safety_seconds
    if cfg.compressor == "group":  # several model sections: only what the pipeline does applies (issue 17)
        strategies = ("overlapped",)
        print(grouping.describe_backends(), flush=True)
    tensors, meta, lora, lora_meta, params = serialize_payload(cfg)
    comp, workers = cfg.compressor, threads or os.cpu_count() or 1
    raw_base = len(artifact._payload(tensors, meta))
    print(f"payload: {params:,} parameters quantized, model section {raw_base:,} raw bytes, LoRA "
          f"{sum(t.numel() * t.element_size() for t in lora.values()):,} bytes of factors; compressor {comp}, "
          f"{workers} threads, chunks of {artifact.CHUNK_BYTES:,} bytes, LCQ window {lcq_window:.1f}s", flush=True)
    rows = {}
    unknown = sorted(set(strategies) - set(SERIALIZE_STRATEGIES))
    if unknown:
        raise ValueError(f"--strategies: unknown {unknown}; choose from {','.join(SERIALIZE_STRATEGIES)}")

    t0, c0 = time.perf_counter(), time.process_time()
    one = None if "serial" not in strategies else artifact_tools.compress_section("model", {**tensors, **lora}, dict(meta, lora=lora_meta), comp,
                                    threads=len(artifact.AUTO_ORDER) if comp == "auto" else 1,
                                    chunk_bytes=1 << 62)
    if one is not None:
        blob = artifact.assemble([one])
        rows["serial"] = dict(bytes=len(blob), charged_seconds=time.perf_counter() - t0, compressor=one.compressor,
                              cpu_seconds=time.process_time() - c0)
        print(f"serial      {rows['serial']['bytes']:>11,} bytes  {rows['serial']['charged_seconds']:7.2f}s charged",
              flush=True)

    if "parallel" in strategies:
        t0, c0 = time.perf_counter(), time.process_time()
        base_job = artifact.SectionJob("model", tensors, meta, comp, workers)
        lora_sec = artifact_tools.compress_section("lora", lora, lora_meta, comp, workers)
        blob = artifact.assemble([base_job.result(), lora_sec])
        rows["parallel"] = dict(bytes=len(blob), charged_seconds=time.perf_counter() - t0,
                                compressor=base_job.result().compressor, cpu_seconds=time.process_time() - c0)
        print(f"parallel    {rows['parallel']['bytes']:>11,} bytes  {rows['parallel']['charged_seconds']:7.2f}s "
              "charged", flush=True)
    if "overlapped" in strategies:
        rows["overlapped"] = _overlapped(tensors, meta, lora, lora_meta, comp, workers, lcq_window, keep_backends)
    first = rows[next(iter(rows))]
    for row in rows.values():
        row["bytes_vs_first"] = row["bytes"] / first["bytes"] - 1
    # CPU seconds of all threads: what the work costs regardless of what else shares the cores
    print("cpu seconds: " + " ".join(f"{k} {r['cpu_seconds']:.1f}" for k, r in rows.items()))
    print(f"bytes vs {next(iter(rows))}: " + " ".join(f"{k} {100 * r['bytes_vs_first']:+.3f}%" for k, r in rows.items()))
    return dict(bench="serialize", preset=cfg.preset, compressor=comp, payload_params=params, raw_bytes=raw_base,
                threads=workers, cores=os.cpu_count(), chunk_bytes=artifact.CHUNK_BYTES, lcq_window_s=lcq_window,
                strategies=rows, bytes={k: r["bytes"] for k, r in rows.items()},
                charged_seconds={k: round(r["charged_seconds"], 3) for k, r in rows.items()})


def _cpu_seconds() -> float:
    """CPU seconds of this process's threads and of its waited-for children (lrzip)."""
    import resource
    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + child.ru_utime + child.ru_stime


def _overlapped(tensors: dict, meta: dict, lora: dict, lora_meta: dict, comp: str, workers: int,
                lcq_window: float, keep_backends: bool = False) -> dict:
    """The pipeline's strategy (see bench_serialize); charged = from the end of the LCQ window to the bytes."""
    c0 = _cpu_seconds()
    # the pipeline's job: one section, or group's several, due at the window's end
    base_job = grouping.model_job(tensors, meta, comp, workers, None if keep_backends else lcq_window)
    from ..shipping import RATE_WAIT_SECONDS
    projected = base_job.seconds_left(RATE_WAIT_SECONDS)  # what plan_serialize sees
    projected_at = time.perf_counter() - base_job.started
    lcq_end = base_job.started + lcq_window
    base_s = first = None
    while time.perf_counter() < lcq_end:  # the device distils; the host thread only waits (and notes the finish)
        if first is None and not base_job.done():
            left = base_job.seconds_left()  # the first projection, whenever it comes (distill_budget reads it)
            first = None if left is None else (time.perf_counter() - base_job.started, left)
        if base_s is None and base_job.done():
            base_s = time.perf_counter() - base_job.started
        time.sleep(0.1)
    t0 = time.perf_counter()
    lora_job = artifact.SectionJob("lora", lora, lora_meta, grouping.section_compressor(comp), workers)
    base = base_job.sections()
    blob = artifact.assemble([*base, lora_job.result()])
    base_s = time.perf_counter() - base_job.started if base_s is None else base_s
    timed = [t for t in base_job.tasks if t.seconds is not None and t.seconds < float("inf")]
    per_chunk = {}
    for c in sorted({t.compressor for t in timed}):
        full = [t.seconds for t in timed if t.compressor == c and t.nbytes == artifact.CHUNK_BYTES]
        per_chunk[c] = dict(tasks=sum(t.compressor == c for t in timed), full_chunks=len(full),
                            full_chunk_seconds_mean=sum(full) / len(full) if full else None,
                            full_chunk_seconds_max=max(full, default=None),
                            thread_seconds=sum(t.seconds for t in timed if t.compressor == c))
    many = base_job.plan_seconds + max(t.seconds for t in timed)  # one thread per task
    row = dict(bytes=len(blob), charged_seconds=time.perf_counter() - t0,
               compressor=",".join(sorted({b.compressor for b in base})), lcq_window_s=lcq_window,
               base_section_seconds=base_s, plan_seconds=base_job.plan_seconds, choice=base_job.choice,
               dropped=sorted(base_job.dropped), keep_backends=keep_backends, per_chunk=per_chunk,
               many_core_seconds=many, projected_base_seconds=None if projected is None else projected_at + projected,
               projected_after_s=projected_at, first_projection_s=None if first is None else sum(first),
               first_projection_after_s=None if first is None else first[0],
               sections={b.name: f"{b.compressor}/{b.variant}" for b in base}, cpu_seconds=_cpu_seconds() - c0)
    print(f"overlapped  {row['bytes']:>11,} bytes  {row['charged_seconds']:7.2f}s charged (model section took "
          f"{base_s:.1f}s of the {lcq_window:.1f}s LCQ window; projected "
          + ("-" if projected is None else f"{projected_at + projected:.1f}s") + f" after {projected_at:.1f}s"
          + ("" if first is None else f", first projection {sum(first):.1f}s after {first[0]:.1f}s") + ")",
          flush=True)
    print(f"  group planning {base_job.plan_seconds:.1f}s on one thread; "
          + "; ".join(f"{c}: {v['tasks']} tasks, {v['thread_seconds']:.1f} thread-s"
                      + (f", {v['full_chunk_seconds_mean']:.2f}s per full chunk (max {v['full_chunk_seconds_max']:.2f})"
                         if v["full_chunks"] else "") for c, v in per_chunk.items())
          + f"; one thread per task: {many:.1f}s", flush=True)
    print(f"  back-ends: {base_job.choice or 'no deadline'}; sections "
          + " ".join(f"{k.removeprefix('model_')}:{v}" for k, v in row["sections"].items()), flush=True)
    return row


def bench_fit(cfg: Config, dinfo: D.DistInfo, fractions: list[float]) -> dict:
    """What the fit costs (issue 25): the preset (demo) trained once and quantized, then the cheapest k of its +-1
    codes zeroed for k = fraction x all of them, ranked by the fit's cost (the exact change of the Hessian-weighted
    error) and by h_jj s^2 alone; each pruned model compressed by the shipped compressor and scored (the quantized
    model, no LoRA). bpb per KB saved, total and marginal (from the previous fraction), to set beside what a wider MLP
    buys per KB (issue 16's equal-bytes table: 0.0003 bpb/KB on the demo)."""
    from ..shipping import prune, prune_order, quant_errors

    run = open_run(replace(cfg, run_id=f"bench_fit_{int(time.time())}", submission_json=""), dinfo)
    build(run)
    run_training(run)
    quantize(run)
    meta = artifact_meta(cfg, run.bos_id, run.qmeta, None)

    def measure(tensors) -> int:
        return artifact.HEADER_BYTES + sum(s.nbytes for s in grouping.model_job(tensors, meta, cfg.compressor).sections())

    def bpb(tensors) -> float:
        state = dequantize_state(tensors, run.qmeta)
        return score(run, model_from_state(cfg, run.bos_id, state, dinfo.device)).val_bpb

    base_bytes, base_bpb = measure(run.qtensors), bpb(run.qtensors)
    print(f"\nfit cost on the {cfg.preset} preset: unpruned model {base_bytes:,} bytes, quantized val_bpb {base_bpb:.5f}")
    print(f"{'cost':<6} {'fraction':>8} {'pruned':>8} {'bytes':>9} {'saved':>7} {'dbpb':>9} {'bpb/KB':>8} {'marginal':>8}")
    rows = []
    for label, order in (("exact", prune_order(run.qtensors, run.hessians, quant_errors(run))),
                         ("diag", prune_order(run.qtensors, run.hessians))):
        prev = (0, 0.0)
        for f in fractions:
            n = int(f * len(order[1]))
            pruned = prune(run.qtensors, order, n)
            size, score_bpb = measure(pruned), bpb(pruned)
            saved, d = base_bytes - size, score_bpb - base_bpb
            row = dict(cost=label, fraction=f, pruned=n, candidates=len(order[1]), model_bytes=size, saved_bytes=saved,
                       val_bpb=score_bpb, dbpb=d, bpb_per_kb=d / (saved / 1000) if saved > 0 else None,
                       marginal_bpb_per_kb=(d - prev[1]) / ((saved - prev[0]) / 1000) if saved > prev[0] else None)
            prev = (saved, d)
            rows.append(row)
            fmt = lambda v: "-" if v is None else f"{v:.5f}"  # noqa: E731
            print(f"{label:<6} {f:>8.3f} {n:>8,} {size:>9,} {saved:>7,} {d:>+9.5f} {fmt(row['bpb_per_kb']):>8} "
                  f"{fmt(row['marginal_bpb_per_kb']):>8}", flush=True)
    return dict(bench="fit", preset=cfg.preset, compressor=cfg.compressor, model_bytes_unpruned=base_bytes,
                val_bpb_unpruned=base_bpb, rows=rows)


COMPARED_COMPRESSORS = ("brotli", "auto", "group")


def model_codes(cfg: Config, path: str) -> tuple[dict, dict, str]:
    """The model tensors and meta to compress: those of the artifact at `path` (e.g. a trained demo run's .lcq: real
    GPTQ codes compress differently from random ones), else the preset's record-size payload (serialize_payload).
    Returns (tensors, meta, a line naming the payload)."""
    from ..shipping import group_of
    if path:
        tensors, meta = artifact.load(path)
        base = {k: v for k, v in tensors.items() if group_of(k) == "model"}
        meta = {k: v for k, v in meta.items() if k not in artifact.sections_of(Path(path).read_bytes(), path)}
        return base, dict(meta, lora=None), f"the model tensors of {path}"
    tensors, meta, _, _, params = serialize_payload(cfg)
    return tensors, meta, f"the {cfg.preset} preset's random-init payload ({params:,} parameters, RTN codes)"


def bench_compressors(cfg: Config, path: str, threads: int, compressors: tuple[str, ...]) -> dict:
    """Bytes and seconds of the model's artifact section(s) per COMPRESSOR value on one payload (issue 11): each through
    lcq.grouping.model_job, the job the pipeline starts after GPTQ, on `threads` threads, then decoded back and checked
    bit for bit. CPU seconds count this process's threads and the lrzip child processes."""
    import resource

    tensors, meta, what = model_codes(cfg, path)
    workers = threads or os.cpu_count() or 1
    lrzip = artifact.lrzip_binary()
    print(f"payload: {what}; {workers} threads; lrzip: {lrzip or 'not on PATH (group falls back to brotli)'}",
          flush=True)
    rows = {}
    for comp in compressors:
        if comp not in COMPARED_COMPRESSORS:
            raise ValueError(f"--compressors: unknown {comp!r}; choose from {','.join(COMPARED_COMPRESSORS)}")
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0, c0 = time.perf_counter(), time.process_time()
        sections = grouping.model_job(tensors, meta, comp, workers).sections()
        blob = artifact.assemble(sections)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu += (after.ru_utime + after.ru_stime) - (kids.ru_utime + kids.ru_stime)
        t1 = time.perf_counter()
        out, _ = artifact.decode(blob, comp)
        decode_s = time.perf_counter() - t1
        for k, t in tensors.items():  # floats compared as their bits (NaN payloads, -0.0)
            bits = (lambda x: x.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])
                    if x.dtype.is_floating_point else x)
            if out[k].dtype != t.dtype or not torch.equal(bits(out[k]), bits(t.contiguous())):
                raise AssertionError(f"{comp}: tensor {k} did not round-trip")
        rows[comp] = dict(bytes=len(blob), seconds=seconds, cpu_seconds=cpu, decode_seconds=decode_s,
                          sections={sec.name: dict(compressor=sec.compressor, variant=sec.variant, bytes=sec.nbytes)
                                    for sec in sections})
        print(f"{comp:<7} {len(blob):>11,} bytes  {seconds:7.2f}s wall  {cpu:7.2f} CPU-s  decode {decode_s:6.2f}s  "
              + " ".join(f"{sec.name.removeprefix('model_')}:{sec.compressor}" + (f"/{sec.variant}" if sec.variant
                         else "") + f":{sec.nbytes:,}" for sec in sections), flush=True)
    ref = rows.get("brotli") or rows[next(iter(rows))]
    for row in rows.values():
        row["bytes_vs_brotli"] = row["bytes"] / ref["bytes"] - 1
    print("bytes vs brotli: " + " ".join(f"{k} {r['bytes'] - ref['bytes']:+,} ({100 * r['bytes_vs_brotli']:+.3f}%)"
                                         for k, r in rows.items()))
    return dict(bench="compressors", preset=cfg.preset, payload=what, lrzip=lrzip, threads=workers,
                cores=os.cpu_count(), rows=rows, bytes={k: r["bytes"] for k, r in rows.items()},
                seconds={k: round(r["seconds"], 3) for k, r in rows.items()})


def main(argv: list[str] | None = None) -> int:
    # allow_abbrev off: a config flag such as --compressor=group is not a prefix match for --compressors
    ap = argparse.ArgumentParser(prog="lcq bench", description=__doc__, allow_abbrev=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=("quant", "lcq", "attribution", "features", "sizing", "serialize", "compressors",
                                     "step", "ttt", "gptq", "fit", "ngram", "slowdown", "fidelity"))
    ap.add_argument("--bits", default=None, help="comma-separated bit widths (quant: 4,5,6,8; lcq: 4,6)")
    ap.add_argument("--ranks", default="4,16,64", help="lcq: comma-separated LoRA ranks")
    ap.add_argument("--inits", default="zero,svd,act_svd,grail", help="lcq: comma-separated inits")
    ap.add_argument("--time-frac", type=float, default=0.15, help="lcq: distillation seconds as a fraction of training")
    ap.add_argument("--equal-bytes", action="store_true",
                    help="lcq: corrections at equal shipped LoRA bytes instead (lcq/bench_lcq.py)")
    ap.add_argument("--byte-budgets", default="",
                    help="lcq --equal-bytes: comma-separated LoRA section budgets in bytes (default 2-32 KB)")
    ap.add_argument("--lcq-steps", type=int, default=None,
                    help="lcq --equal-bytes: distillation steps (default: lcq.bench_lcq.DEMO_LCQ_STEPS)")
    ap.add_argument("--cache", default="", help="lcq --equal-bytes: folder of trained checkpoints to reuse ('' = none)")
    ap.add_argument("--methods", default="lqer_today,lcq_uniform_int8,alloc_closed,alloc_distilled",
                    help="lcq --equal-bytes: comma-separated subset of the methods to run")
    ap.add_argument("--head", action="store_true",
                    help="lcq --equal-bytes: also run the allocation rows with lm_head among the targets")
    ap.add_argument("--wider", type=float, default=0.0,
                    help="lcq --equal-bytes: also train a model at this MLP_MULT to price bytes spent on the model")
    ap.add_argument("--budgets", default="60,120,240", help="attribution: comma-separated training clocks in seconds")
    ap.add_argument("--plot", default="attribution.png", help="attribution: PNG path ('' = no plot)")
    ap.add_argument("--arms", default="abc", help="attribution: which arms to run (letters of a, b, c; a lever on one arm)")
    ap.add_argument("--clock", type=float, default=75.0, help="features: wallclock seconds per arm (train + GPTQ + serialize)")
    ap.add_argument("--steps", type=int, default=0, help="features: > 0 = this many training steps per arm instead of a clock; "
                                                         "fidelity: training steps (default 300)")
    ap.add_argument("--lcq-bytes", type=int, default=None,
                    help="fidelity: LCQ_BYTES of the closed-form correction (default: bench_fidelity.FIDELITY_LCQ_BYTES)")
    ap.add_argument("--features", default="", help="features: comma-separated subset to switch off (default: all)")
    ap.add_argument("--lcq-window", type=float, default=None,
                    help="serialize: seconds LCQ runs on the device while the model section compresses (default: "
                         "TRAIN_RESERVE - SERIALIZE_RESERVE - LCQ_SAFETY of the preset)")
    ap.add_argument("--threads", type=int, default=0,
                    help="serialize, compressors: compression threads (0 = every core)")
    ap.add_argument("--keep-backends", action="store_true",
                    help="serialize: run every back-end (lrzip too) whatever the LCQ window, to time what it takes")
    ap.add_argument("--strategies", default=",".join(SERIALIZE_STRATEGIES),
                    help="serialize: comma-separated subset of serial,parallel,overlapped")
    ap.add_argument("--compressors", default=",".join(COMPARED_COMPRESSORS),
                    help="compressors: comma-separated COMPRESSOR values to compare on the model section")
    ap.add_argument("--codes", default="", help="compressors: an artifact (.lcq) whose model tensors to compress "
                                               "instead of the preset's random-init payload")
    ap.add_argument("--fractions", default="0.01,0.02,0.05,0.1,0.2,0.4",
                    help="fit: comma-separated fractions of the +-1 codes to zero")
    ap.add_argument("--world", type=int, default=8, help="step, gptq: gloo ranks the step / the split runs on; ngram: ranks the hints split over")
    ap.add_argument("--tokens", type=int, default=512, help="step: tokens per rank")
    ap.add_argument("--batch-docs", default="1,8,32,64", help="ttt: comma-separated TTT_BATCH_DOCS values")
    ap.add_argument("--ngram-tokens", type=int, default=8_000_000,
                    help="ngram: tokens of the synthetic stream timed (projected to the record's 47,851,520)")
    ap.add_argument("--ttp-log", default="", help="ttt: a #1855-style log whose ttp: lines give the record's split")
    ap.add_argument("--context", action="store_true",
                    help="ttt: TTT_CONTEXT recompute vs reuse at equal seconds on record-length documents (issue 26); "
                         "the last --batch-docs value is the batch")
    ap.add_argument("--seeds", default="1337,42", help="ttt --context: comma-separated training seeds")
    ap.add_argument("--max-steps", type=int, default=8, help="ttt --context: most TTT_STEPS the reuse arm may spend")
    ap.add_argument("--chunk", type=int, default=12, help="ttt --context: TTT_CHUNK_TOKENS of every arm")
    ap.add_argument("--factor", type=float, default=4.0, help="slowdown: the throttled arm gets 1/FACTOR of the CPU time")
    args, rest = ap.parse_known_args(argv)
    # serialize, compressors: the record-size payload, no training
    default = "record" if args.kind in ("serialize", "compressors") else "demo"
    cfg, _ = resolve(rest if any(a.startswith("--preset") for a in rest) else ["--preset", default, *rest])
    dinfo = D.init_dist()
    try:
        if args.kind == "quant":
            result = bench_quant(cfg, dinfo, [int(b) for b in (args.bits or "4,5,6,8").split(",")])
        elif args.kind == "lcq" and args.equal_bytes:
            from .bench_lcq import BUDGETS, DEMO_LCQ_STEPS, bench_equal_bytes
            steps = DEMO_LCQ_STEPS if args.lcq_steps is None else args.lcq_steps
            budgets = [int(b) for b in args.byte_budgets.split(",")] if args.byte_budgets else list(BUDGETS)
            result = bench_equal_bytes(cfg, dinfo, budgets, steps, args.cache,
                                       args.wider, tuple(args.methods.split(",")), args.head)
        elif args.kind == "lcq":
            result = bench_lcq(cfg, dinfo, [int(b) for b in (args.bits or "4,6").split(",")],
                               [int(r) for r in args.ranks.split(",")], args.inits.split(","), args.time_frac)
        elif args.kind == "serialize":
            result = bench_serialize(cfg, args.lcq_window, args.threads, tuple(args.strategies.split(",")),
                                     args.keep_backends)
        elif args.kind == "compressors":
            result = bench_compressors(cfg, args.codes, args.threads, tuple(args.compressors.split(",")))
        elif args.kind == "ttt" and args.context:
            from .bench_ttt import bench_context
            result = bench_context(cfg, dinfo, [int(x) for x in args.seeds.split(",")],
                                   int(args.batch_docs.split(",")[-1]), args.max_steps, args.chunk)
        elif args.kind == "ttt":
            from .bench_ttt import bench_ttt
            result = bench_ttt(cfg, dinfo, [int(b) for b in args.batch_docs.split(",")], args.ttp_log or None)
        elif args.kind == "step":
            from .bench_step import bench_step
            result = bench_step(cfg, args.world, args.tokens)
        elif args.kind == "ngram":
            from .bench_ngram import bench_ngram
            result = bench_ngram(cfg, args.ngram_tokens, args.world)
        elif args.kind == "slowdown":
            from .bench_slowdown import bench_slowdown
            result = bench_slowdown(rest if any(a.startswith("--preset") for a in rest) else ["--preset", default, *rest],
                                    args.factor)
        elif args.kind == "gptq":
            from .bench_gptq import bench_gptq
            result = bench_gptq(cfg, args.world)
        elif args.kind == "fit":
            result = bench_fit(cfg, dinfo, [float(f) for f in args.fractions.split(",")])
        elif args.kind == "fidelity":
            from .bench_fidelity import FIDELITY_LCQ_BYTES, bench_fidelity
            result = bench_fidelity(cfg, dinfo, args.steps or 300,
                                    FIDELITY_LCQ_BYTES if args.lcq_bytes is None else args.lcq_bytes)
        elif args.kind == "sizing":
            result = bench_sizing(cfg)
        elif args.kind == "features":
            result = bench_features(cfg, dinfo, args.clock, args.steps, args.features.split(",") if args.features else None)
        else:
            result = bench_attribution(cfg, dinfo, [float(b) for b in args.budgets.split(",")], args.plot,
                                       list(args.arms))
        if dinfo.is_master:
            print(json.dumps(result, sort_keys=True))
        return 0
    finally:
        D.shutdown()


if __name__ == "__main__":
    sys.exit(main())
