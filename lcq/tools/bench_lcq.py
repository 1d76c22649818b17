"""`python -m lcq.bench lcq --equal-bytes` (issue 16): low-rank corrections of the int6 demo model at equal shipped bytes.

At each LoRA budget (default 2, 4, 8, 16 and 32 KB, decimal) every method builds its correction, ships it as the
artifact's compressed `lora` section, decodes that section back and scores the corrected model on the val split:

- lqer_today: the LQER rule of lcq/gptq.py before issue 16 unified it into LCQ (#1797 with #1855's storage: int4 factor
  on the layer input in groups of 64, int2 factor on the output, the tied embedding first, then the top-k matrices by
  the Hessian-weighted error the rounded correction removes). A copy lives here so that it stays the baseline after
  the mechanism is gone from gptq.py. Rank and top-k per budget: of every (rank in LQER_RANKS, top_k) whose section
  fits, the one whose corrections remove the most Hessian-weighted error (LQER's own objective; no val data).
- lcq_uniform_int8: LCQ as it was: int8 symmetric factors, act_svd init, one rank over the LCQ targets (the largest
  whose compressed section fits), distilled for the pinned steps.
- alloc_closed: lcq.lora.allocate_bytes at 8, 4 and 2+4 bits (2+4 = LCQ_FACTOR_BITS=4 LCQ_FACTOR_ASYM=1, group 64),
  closed form only.
- alloc_distilled: the allocation at the bit width whose closed form recovered most at that budget, distilled for the
  pinned steps on its frozen grids (what ships is what trained).

recovered = (q_bpb - corrected_bpb) / (q_bpb - float_bpb). A budget that fits nothing ships 0 bytes and recovers 0.
"""
from __future__ import annotations

import hashlib
import json
import os
import time

import torch

from .. import artifact, grouping
from .. import dist as D
from ..config import Config, replace
from ..distill import distill, init_factors, lcq_target_names, quant_errors
from ..gptq import EMBED_NAME, _damped, _gptq_codes
from ..lora import LORA_SECTION_BYTES, allocate_bytes, weighted_error, attach_lora, factor_format, merge_lora, set_format
from ..gptq import dequantize_state, quantize_state
from ..pipeline import Run, build, open_run, quant_spec, quantize, run_training, score
from ..shipping import TIED, apply_lora, artifact_meta, model_from_state, pack_lora
from . import artifact_tools

BUDGETS = (2_000, 4_000, 8_000, 16_000, 32_000)
METHODS = ("lqer_today", "lcq_uniform_int8", "alloc_closed", "alloc_distilled")
ALLOC_FORMATS = {"8": factor_format(8, False, 64), "4": factor_format(4, False, 64), "2+4": factor_format(4, True, 64)}
LQER_RANKS = (1, 2, 4, 8, 16)
# Distillation steps for alloc_distilled and lcq_uniform_int8, pinned so that a run is reproducible (a clock would
# follow the host's load). The demo preset's LCQ window is TRAIN_RESERVE 30 - SERIALIZE_RESERVE 5 - LCQ_SAFETY 2 -
# GPTQ (~2 s) ~ 21 s; `python -m lcq.bench lcq` distilled 36-39 steps in 17.4 s on the 2-core AMD EPYC box
# (BENCHMARKS.md, issue 11), ~0.47 s a step, so the window buys ~45 steps: 40 after the serialize projection.
DEMO_LCQ_STEPS = 40
# Fields that do not change the trained float model: a cached checkpoint is reused across them.
_NOT_TRAINING = ("run_id", "log_dir", "artifact_path", "submission_json", "compressor", "eval_dump")


# ---- the trained model, once per seed -------------------------------------------------------------------------------

def _train_key(cfg: Config) -> str:
    fields = {k: v for k, v in cfg.to_dict().items()
              if k not in _NOT_TRAINING and not k.startswith(("lcq_", "lqer_", "ttt_", "gptq_", "eval_"))}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def trained_run(cfg: Config, dinfo: D.DistInfo, cache: str) -> tuple[Run, dict]:
    """An opened run holding the trained float model: from `cache` (a checkpoint of the same training config and seed)
    or trained now and saved there ('' = no cache). Returns (run, {steps, train_seconds, cached})."""
    cfg = replace(cfg, run_id=f"bench_equal_bytes_{time.strftime('%Y%m%d_%H%M%S')}", submission_json="", lcq_rank="0")
    run = open_run(cfg, dinfo)
    build(run)
    path = os.path.join(cache, f"{cfg.preset}_seed{cfg.seed}_{_train_key(cfg)}.pt") if cache else ""
    if path and os.path.exists(path):
        saved = torch.load(path, map_location=dinfo.device)
        run.model.load_state_dict(saved["state"])
        run.log(f"bench equal_bytes: trained model from {path}")
        return run, dict(saved["info"], cached=True)
    res = run_training(run)
    info = dict(steps=res.steps, train_seconds=res.train_time_s)
    if path and dinfo.is_master:
        os.makedirs(cache, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        torch.save({"state": {k: v.detach().cpu() for k, v in run.model.state_dict().items()}, "info": info}, tmp)
        os.replace(tmp, path)
    return run, dict(info, cached=False)


# ---- today's LQER rule (lcq/gptq.py before issue 16), kept computable as the baseline -----------------------------
# The fit (the comment above lqer_select in gptq.py had the why): E L = U S V^T with L L^T = H damped as GPTQ damps
# it; the input factor P = S_r V_r^T L^-1 (r, in) holds the magnitudes and is rounded by GPTQ against H on int4 codes
# [-8, 7] with one fp16 scale per 64 consecutive values (max|x| / 7.5); the output factor Q (out, r) is refit to the
# rounded P by weighted least squares and rounded by GPTQ against P_hat H P_hat^T on int2 codes [-2, 1] with one scale
# for the tensor, its clip the best of LQER_OUT_CLIPS by the output error. A P whose size is not a multiple of the
# group falls back to symmetric int4 per row for both. The decoder adds Q_hat @ P_hat to W_hat.
LQER_IN_BITS, LQER_OUT_BITS, LQER_GROUP = 4, 2, 64
LQER_OUT_CLIPS = (1.0, 0.85, 0.7, 0.55, 0.4)


def _half_scale(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(2.0**-24, 65504.0).to(torch.float16)


def lqer_fit(E: torch.Tensor, H: torch.Tensor | None, rank: int, damp: float) -> tuple[dict, dict, float]:
    """Today's LQER correction of E at `rank` -> (packed int8 codes + fp16 scales, meta, Hessian-weighted error it
    removes; <= 0 means the rule would not ship it)."""
    E = E.detach().double()
    rows, cols = E.shape
    H32 = torch.eye(cols) if H is None else H.detach().float()
    L = torch.linalg.cholesky(_damped(H32, damp).double())
    U, S, Vh = torch.linalg.svd(E @ L, full_matrices=False)
    r = min(rank, S.numel())
    P = torch.linalg.solve_triangular(L.T, (S[:r, None] * Vh[:r]).T, upper=True).T.float()
    asym = P.numel() % LQER_GROUP == 0
    if asym:
        top = 2 ** (LQER_IN_BITS - 1)
        sP = _half_scale(P.reshape(-1, LQER_GROUP).abs().amax(1) / (top - 0.5))
        gridP = sP.float().repeat_interleave(LQER_GROUP).reshape(P.shape)
        qP = _gptq_codes(P, H32, gridP, -top, top - 1, damp, 128, True)
    else:
        qmax = 2 ** (LQER_IN_BITS - 1) - 1
        sP = _half_scale(P.abs().amax(1) / qmax)
        gridP = sP.float()[:, None].expand(P.shape)
        qP = _gptq_codes(P, H32, sP.float(), -qmax, qmax, damp, 128, True)
    P_hat = (qP * gridP).double()
    Hd = _damped(H32, damp).double()
    G = P_hat @ Hd @ P_hat.T
    Q = (E @ Hd @ P_hat.T @ torch.linalg.pinv(G, hermitian=True)).float()
    G = G.float()
    before = weighted_error(E, H)
    if asym:
        top, best = 2 ** (LQER_OUT_BITS - 1), None
        for clip in LQER_OUT_CLIPS:
            sQ = _half_scale(Q.abs().amax().reshape(1) * clip / (top - 0.5))
            qQ = _gptq_codes(Q, G, sQ.float().expand(rows), -top, top - 1, damp, 128, True)
            err = weighted_error(E - ((qQ * sQ.float()) @ P_hat.float()).double(), H)
            if best is None or err < best[0]:
                best = (err, qQ, sQ)
        err, qQ, sQ = best
    else:
        sQ = _half_scale(Q.abs().amax(1) / qmax)
        qQ = _gptq_codes(Q, G, sQ.float(), -qmax, qmax, damp, 128, True)
        err = weighted_error(E - ((qQ * sQ.float()[:, None]) @ P_hat.float()).double(), H)
    packed = {"A": qQ.to(torch.int8), "A_scale": sQ, "B": qP.to(torch.int8), "B_scale": sP}
    return packed, {"asym": asym, "group": LQER_GROUP if asym else 0, "rank": r}, before - err


def lqer_delta(packed: dict[str, torch.Tensor], meta: dict) -> torch.Tensor:
    """Q_hat @ P_hat in float32 from `lqer_fit`'s packing (as decoded from the artifact)."""
    Q, P = packed["A"].float(), packed["B"].float()
    if meta["asym"]:
        Q = Q * packed["A_scale"].float()
        P = (P.reshape(-1, int(meta["group"])) * packed["B_scale"].float()[:, None]).reshape(P.shape)
    else:
        Q, P = Q * packed["A_scale"].float()[:, None], P * packed["B_scale"].float()[:, None]
    return Q @ P


def lqer_order(errors: dict[str, tuple], rank: int, damp: float) -> list[tuple[str, dict, dict, float]]:
    """Today's choice order at `rank`: the tied embedding first when its correction helps, then the other tensors by
    the error their rounded correction removes (ties by name); tensors it would make worse are left out. lqer_select's
    top-k is the first k of this list (it searched the same order exactly, pruned by a bound)."""
    fits = {n: lqer_fit(E, H, rank, damp) for n, (E, H) in errors.items()}
    order = sorted((n for n in fits if fits[n][2] > 0), key=lambda n: (n != EMBED_NAME, -fits[n][2], n))
    return [(n, *fits[n]) for n in order]


def lqer_section(chosen: list[tuple[str, dict, dict, float]], compressor: str) -> artifact.Section:
    tensors = {f"lqer.{n}.{k}": v.contiguous() for n, packed, _, _ in chosen for k, v in packed.items()}
    return artifact_tools.compress_section("lora", tensors, {"lqer": {n: m for n, _, m, _ in chosen}}, compressor, 1)


# ---- shipping and scoring ------------------------------------------------------------------------------------------

def decoded(section: artifact.Section) -> tuple[dict[str, torch.Tensor], dict]:
    """The section's tensors and meta as a scorer reads them back from the artifact's bytes."""
    return artifact.decode(artifact.assemble([section]), "equal-bytes section")


def score_lqer(run: Run, section: artifact.Section) -> float:
    tensors, meta = decoded(section)
    state = dict(run.gptq_state)
    for n, m in meta["lqer"].items():
        state[n] = state[n].float() + lqer_delta({k: tensors[f"lqer.{n}.{k}"] for k in ("A", "A_scale", "B",
                                                                                      "B_scale")}, m)
        if n == EMBED_NAME and "lm_head.weight" in state:
            state["lm_head.weight"] = state[n]
    return score(run, model_from_state(run.cfg, run.bos_id, state, run.dinfo.device)).val_bpb


def lora_section(student, fmt, init: str, compressor: str) -> artifact.Section:
    tensors, ranks, alpha = pack_lora(student, fmt)
    meta = dict(merge="side", init=init, ranks=ranks, alpha=alpha, format=list(fmt))
    return artifact_tools.compress_section("lora", tensors, meta, compressor, 1)


def score_lora(run: Run, section: artifact.Section) -> float:
    """The GPTQ model with the section's decoded factors folded in (what load_shipped scores)."""
    tensors, meta = decoded(section)
    model = model_from_state(run.cfg, run.bos_id, run.gptq_state, run.dinfo.device)
    apply_lora(model, tensors, meta)
    merge_lora(model)
    return score(run, model).val_bpb


def student_from_fits(run: Run, names: list[str], ranks: dict[str, int], fits: dict[str, dict], fmt):
    """The GPTQ model with the allocation's closed-form factors on their own (frozen) grids, as lcq.pipeline.lcq
    attaches them."""
    student = model_from_state(run.cfg, run.bos_id, run.gptq_state, run.dinfo.device)
    wrappers = attach_lora(student, names, ranks, run.cfg.lcq_alpha)
    for n, fit in fits.items():
        wrappers[n].set_factors(fit["B"], fit["A"])
        wrappers[n].fmt, wrappers[n].grid = fmt, fit["grid"]
    return student


def distilled(run: Run, student, steps: int) -> int:
    """Distil the student's factors against the float model for exactly `steps` steps (no clock: reproducible)."""
    cfg = replace(run.cfg, lcq_max_steps=steps)
    res = distill(student, run.model, cfg, run.dinfo, run.log, run.bos_id, 1e9)
    return res.steps


def model_bytes(run: Run, qtensors: dict, qmeta: dict, compressor: str) -> int:
    """Bytes of the model's compressed artifact section."""
    tensors = {k: v.detach().cpu() for k, v in qtensors.items()}
    return artifact_tools.compress_section("model", tensors, artifact_meta(run.cfg, run.bos_id, qmeta, None), compressor,
                                     1).nbytes


def model_alternatives(run: Run, q_bpb: float, base_bytes: int, compressor: str, wider: float, cache: str) -> list:
    """The same kind of bytes spent on the model instead: every matrix at int7 (the same clip in sigmas, so half int6's
    step), and, when `wider` > 0, a model trained with MLP_MULT=wider at int6. Rows: extra model bytes and the bpb
    they buy against the int6 model."""
    cfg, out = run.cfg, []
    state = {k: v.detach() for k, v in run.model.state_dict().items()}
    seven = replace(cfg, matrix_bits=7)
    tensors, qmeta = quantize_state(state, run.hessians, quant_spec(seven), TIED)
    bpb = score(run, model_from_state(cfg, run.bos_id, dequantize_state(tensors, qmeta), run.dinfo.device)).val_bpb
    out.append(dict(what="int7 matrices", extra_model_bytes=model_bytes(run, tensors, qmeta, compressor) - base_bytes,
                    bpb=bpb))
    if wider > 0:
        other, _ = trained_run(replace(cfg, mlp_mult=wider), run.dinfo, cache)
        quantize(other)
        bpb = score(other, model_from_state(other.cfg, other.bos_id, other.gptq_state, run.dinfo.device)).val_bpb
        out.append(dict(what=f"MLP_MULT={wider:g} at int{cfg.matrix_bits}", bpb=bpb,
                        extra_model_bytes=model_bytes(other, other.qtensors, other.qmeta, compressor) - base_bytes))
        other.log.close()
    for row in out:
        row["bpb_gain_per_kb"] = (q_bpb - row["bpb"]) / row["extra_model_bytes"] * 1000
        print(f"model instead: {row['what']}: +{row['extra_model_bytes']} model bytes, bpb {row['bpb']:.5f} "
              f"({row['bpb_gain_per_kb']:+.5f} bpb per KB)", flush=True)
    return out


# ---- the bench -----------------------------------------------------------------------------------------------------

def bench_equal_bytes(cfg: Config, dinfo: D.DistInfo, budgets: list[int], steps: int, cache: str,
                      wider: float = 0.0, methods: tuple[str, ...] = METHODS, head: bool = False) -> dict:
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; choose from {','.join(METHODS)}")
    methods = set(methods)
    t_start = time.perf_counter()
    run, info = trained_run(cfg, dinfo, cache)
    cfg = run.cfg
    float_bpb = score(run, run.model).val_bpb
    quantize(run)  # GPTQ int6 at the demo's settings, and the Hessians
    q_bpb = score(run, model_from_state(cfg, run.bos_id, run.gptq_state, dinfo.device)).val_bpb
    gap = q_bpb - float_bpb
    comp = grouping.section_compressor(cfg.compressor)
    rows: list[dict] = []

    def add(budget: int, method: str, bits: str, shipped: int, bpb: float, **extra) -> dict:
        row = dict(budget_bytes=budget, method=method, bits=bits, shipped_bytes=shipped, bpb=bpb,
                   recovered=(q_bpb - bpb) / gap if gap > 0 else float("nan"),
                   bpb_gain_per_kb=(q_bpb - bpb) / shipped * 1000 if shipped else 0.0, **extra)
        rows.append(row)
        print(f"{budget:>7} {method:<17} {bits:>4} {shipped:>8} {bpb:>10.5f} {row['recovered']:>9.3f} "
              + " ".join(f"{k}={v}" for k, v in extra.items()), flush=True)
        return row

    print(f"\nequal bytes on the {cfg.preset} model (seed {cfg.seed}, {info['steps']} training steps): float val_bpb "
          f"{float_bpb:.5f}, int{cfg.matrix_bits} GPTQ {q_bpb:.5f}, gap {gap:.5f}; LoRA section compressor {comp}; "
          f"distillation {steps} steps")
    print(f"{'budget':>7} {'method':<17} {'bits':>4} {'shipped':>8} {'bpb':>10} {'recovered':>9} detail", flush=True)

    # today's LQER: every quantized matrix and the tied embedding are candidates
    state = {k: v.detach() for k, v in run.model.state_dict().items()}
    lq_errors = {n: (state[n].float() - run.gptq_state[n].float(), H) for n, H in sorted(run.hessians.items())}
    orders = {r: lqer_order(lq_errors, r, cfg.gptq_damp) for r in LQER_RANKS} if "lqer_today" in methods else {}
    names = lcq_target_names(run.model, cfg)
    # LCQ_TARGETS leaves lm_head out (lcq/lora.py); with `head` the allocation rows are also run with it added, the
    # only place a LoRA can correct the tied embedding (both uses, head and lookup, as LQER's correction did: h16c)
    sets = {"lcq": names, **({"lcq+lm_head": names + ["lm_head"]} if head and "lm_head" not in names else {})}
    errors = {t: quant_errors(run, ns) for t, ns in sets.items()}
    for budget in budgets:
        if "lqer_today" in methods:
            best = None  # (error removed, rank, k, section)
            for r, order in orders.items():
                for k in range(1, len(order) + 1):
                    sec = lqer_section(order[:k], comp)
                    if sec.nbytes > budget:
                        break
                    gain = sum(g for *_, g in order[:k])
                    if best is None or gain > best[0]:
                        best = (gain, r, k, sec)
            if best is None:
                add(budget, "lqer_today", "2+4", 0, q_bpb, targets="all", rank=0, top_k=0, steps=0)
            else:
                add(budget, "lqer_today", "2+4", best[3].nbytes, score_lqer(run, best[3]), targets="all",
                    rank=best[1], top_k=best[2], steps=0)

        if "lcq_uniform_int8" in methods:  # today's LCQ: int8, one rank for every target, act_svd init, distilled
            fmt8, fit_rank, sec = ALLOC_FORMATS["8"], 0, None
            for r in range(1, 65):
                student = model_from_state(cfg, run.bos_id, run.gptq_state, dinfo.device)
                attach_lora(student, names, r, cfg.lcq_alpha)
                init_factors(student, run.model, "act_svd", run.hessians, None, cfg.lcq_grail_ridge)
                set_format(student, fmt8)
                trial = lora_section(student, fmt8, "act_svd", comp)
                if trial.nbytes > budget:
                    break
                fit_rank, sec, keep = r, trial, student
            if sec is None:
                add(budget, "lcq_uniform_int8", "8", 0, q_bpb, targets="lcq", rank=0, steps=0)
            else:
                done = distilled(run, keep, steps)
                sec = lora_section(keep, fmt8, "act_svd", comp)
                add(budget, "lcq_uniform_int8", "8", sec.nbytes, score_lora(run, sec), targets="lcq", rank=fit_rank,
                    steps=done)

        for tset, tnames in sets.items():
            if not {"alloc_closed", "alloc_distilled"} & methods:
                break
            # the byte allocation, closed form, at each storage (alloc_distilled needs them to pick its storage)
            closed = {}
            for bits, fmt in ALLOC_FORMATS.items():
                ranks, fits, alloc = allocate_bytes(errors[tset], max(0, budget - LORA_SECTION_BYTES), fmt,
                                                    cfg.lcq_alpha, 64)
                units = sum(ranks.values())
                row = dict(budget_bytes=budget, method="alloc_closed", bits=bits, shipped_bytes=0, bpb=q_bpb,
                           recovered=0.0 if gap > 0 else float("nan"), targets=tset, units=0, tensors=0, steps=0)
                if units:
                    sec = lora_section(student_from_fits(run, tnames, ranks, fits, fmt), fmt, "closed_form", comp)
                    row = dict(row, shipped_bytes=sec.nbytes, bpb=score_lora(run, sec), units=units, tensors=len(alloc))
                closed[bits] = (row, (ranks, fits) if units else None)
                if "alloc_closed" in methods:
                    add(budget, "alloc_closed", bits, row["shipped_bytes"], row["bpb"], targets=tset, units=row["units"],
                        tensors=row["tensors"], steps=0)
            if "alloc_distilled" not in methods:
                continue
            # the allocation at its best storage here, distilled
            bits = max(closed, key=lambda b: ((q_bpb - closed[b][0]["bpb"]), b))
            row, plan = closed[bits]
            if plan is None:
                add(budget, "alloc_distilled", bits, 0, q_bpb, targets=tset, units=0, tensors=0, steps=0)
            else:
                fmt = ALLOC_FORMATS[bits]
                student = student_from_fits(run, tnames, *plan, fmt)
                done = distilled(run, student, steps)
                sec = lora_section(student, fmt, "closed_form", comp)
                add(budget, "alloc_distilled", bits, sec.nbytes, score_lora(run, sec), targets=tset,
                    units=row["units"], tensors=row["tensors"], steps=done)

    verdicts = {}
    for budget in budgets:
        at = [r for r in rows if r["budget_bytes"] == budget]
        lq = [r["recovered"] for r in at if r["method"] == "lqer_today"]
        for tset in sets:
            alloc = [r["recovered"] for r in at if r["method"].startswith("alloc") and r["targets"] == tset]
            if lq and alloc:
                verdicts[f"{budget}/{tset}"] = dict(lqer_today=lq[0], best_alloc=max(alloc),
                                                    alloc_at_least_lqer=max(alloc) >= lq[0])
    if verdicts:
        print("best allocation vs lqer_today: " + " ".join(
            f"{b}:{v['best_alloc']:.3f}/{v['lqer_today']:.3f}{'' if v['alloc_at_least_lqer'] else ' (LOWER)'}"
            for b, v in verdicts.items()))
    base_bytes = model_bytes(run, run.qtensors, run.qmeta, comp)
    alternatives = model_alternatives(run, q_bpb, base_bytes, comp, wider, cache)
    over = [r for r in rows if r["shipped_bytes"] > r["budget_bytes"]]
    if over:
        print(f"WARNING: {len(over)} rows ship more than their budget: {over}")
    run.log.close()
    return dict(bench="lcq_equal_bytes", preset=cfg.preset, seed=cfg.seed, train_steps=info["steps"],
                cached_model=info["cached"], float_bpb=float_bpb, quant_bpb=q_bpb, matrix_bits=cfg.matrix_bits,
                distill_steps=steps, compressor=comp, targets=sets, equal_bytes=rows, verdicts=verdicts,
                model_bytes=base_bytes, model_instead=alternatives,
                seconds=time.perf_counter() - t_start)
