"""Preflight: "will my run fit?" on this box, in about two minutes, before the paid run (issue 8).

    python -m lcq.preflight                                         # the record preset on this box
    torchrun --standalone --nproc_per_node=8 -m lcq.preflight       # every rank runs; rank 0 prints
    python -m lcq.preflight --preset demo --steps 10                # CPU: same code, demo model

It runs the configured preset's real model at its real per-device batch through the stages' own code (lcq.train for a
few timed steps after the configured warm-up, lcq.pipeline.quantize for GPTQ, lcq.artifact for the bytes and the
host's compression speed, lcq.evaluate / lcq.ttt for eval throughput) and prints one go/no-go row per question, each
with what its number was derived from, then one JSON line. Projections that must fit a budget carry TIME_MARGIN; the
exit status is 1 on any NO-GO, 2 on a bad knob. Every config knob works as in train_gpt.py (FIELD_NAME=value or
--field_name=value).
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import resource
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import artifact
from .. import dist as D
from .. import grouping, kernels
from ..attention import varlen_attention
from ..checks import release
from ..config import Config, ConfigError, replace, resolve
from ..data import doc_starts, list_shards, read_header, segment_bounds, val_pattern
from ..distill import lcq_target_names, lora_bytes_per_rank
from ..evaluate import Scored, ValStream, _batches, evaluate, plan_doc, plan_windows
from ..gptq import quantize_state
from ..lora import config_format, quantize_factors
from ..ngram import build_tilt
from ..pipeline import NAMED_ERRORS, build, open_run, quant_spec, quantize
from ..runlog import device_name
from ..script import shipped_script
from ..shipping import LORA_PREFIX, TIED, FitError, artifact_meta, least_count, prune, prune_order
from ..seq_schedule import SeqSchedule
from ..train import bucket_plan, train
from ..ttt import (SlotAdapters, adapt_batch, batch_cost, global_phase, make_cache, prepare_adapter, schedule, ttt_forward,
                   warm_up)
from ..ttt import spec_from_config as ttt_spec
from .estimates import gaussian_state

# A projected time must fit its budget with 10% to spare: a short measurement misses step-time jitter, data-loader
# stalls and slow outliers that a 600 s run meets.
TIME_MARGIN = 0.10
# Projected artifact bytes within this fraction under the cap are a WARN, over the cap a NO-GO. The model bytes are
# already an upper estimate (artifact_rows: trained rows compress ~1-2% smaller than the Gaussian refill, BENCHMARKS.md
# record sizing), so the margin flags a tight fit instead of failing it; a stated choice, not a measurement.
BYTES_MARGIN = 0.01
# Peak device memory above this share of the device leaves no room for LCQ's teacher + student or fragmentation.
MEMORY_SHARE = 0.90
GO, NO_GO, WARN, INFO = "GO", "NO-GO", "WARN", "INFO"
ENTRY = Path(__file__).resolve().parents[2] / "train_gpt.py"  # the script a run ships (not this module's __main__)


# The GPU box's pieces and their install lines (README "A record run", requirements-gpu.txt; #1855's README pins the same
# torch build and flash-attn 3 wheel index)
TORCH_INSTALL = "pip install -r requirements-gpu.txt  (torch==2.9.1+cu128, which brings its triton)"
FA3_INSTALL = ("pip install --no-deps flash_attn_3 --find-links "
               "https://windreamer.github.io/flash-attention3-wheels/cu128_torch291/")


@dataclass
class Row:
    name: str
    status: str
    result: str
    basis: str
    data: dict = field(default_factory=dict)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ------------------------------------------------------------------------------------------------------ rows

def check_collective(dinfo: D.DistInfo) -> Row:
    """All-reduce a known value (SUM of rank+1 and MAX of rank) and check the answer on every rank."""
    if not dinfo.distributed:
        return Row("collective", GO, "single process, no collective to check", "WORLD_SIZE=1")
    t0 = time.perf_counter()
    s = D.all_reduce_sum(torch.tensor([dinfo.rank + 1.0], dtype=torch.float64, device=dinfo.device))
    m = D.all_reduce_max(torch.tensor([float(dinfo.rank)], dtype=torch.float64, device=dinfo.device))
    D.sync(dinfo.device)
    ms = 1000 * (time.perf_counter() - t0)
    want_s, want_m = dinfo.world_size * (dinfo.world_size + 1) / 2, dinfo.world_size - 1
    ok = float(s) == want_s and float(m) == want_m
    # every rank must agree that every rank got it right
    bad = D.all_reduce_max(torch.tensor([0.0 if ok else 1.0], device=dinfo.device))
    ok = float(bad) == 0.0
    backend = torch.distributed.get_backend()
    return Row("collective", GO if ok else NO_GO,
               f"{backend} all-reduce over {dinfo.world_size} ranks: sum {float(s):g} (want {want_s:g}), max "
               f"{float(m):g} (want {want_m:g}), {ms:.1f} ms",
               "all-reduce SUM of rank+1 and MAX of rank; a rank with a wrong answer fails every rank",
               dict(ok=ok, backend=backend, world_size=dinfo.world_size, ms=round(ms, 3)))


def check_attention(cfg: Config, backend: str, device: torch.device, bos_id: int) -> Row:
    """The run's attention backend against a per-document SDPA reference on a packed multi-document batch."""
    gen = torch.Generator().manual_seed(cfg.seed)
    n = 2 * cfg.train_seq_len
    toks = torch.randint(0, cfg.vocab_size, (n,), generator=gen)
    toks[torch.randint(1, n, (max(2, n // 200),), generator=gen)] = bos_id  # documents of uneven lengths
    cu = segment_bounds(toks, bos_id, cfg.train_seq_len)
    h, hkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.model_dim // cfg.num_heads
    # the model hands the kernel bf16 under autocast (CUDA, or CPU with AUTOCAST_CPU_BF16) and float32 otherwise
    dtype = torch.bfloat16 if device.type == "cuda" or cfg.autocast_cpu_bf16 else torch.float32
    q, k, v = (torch.randn(n, heads, hd, generator=gen).to(device, dtype) for heads in (h, hkv, hkv))
    out = varlen_attention(q, k, v, cu.to(device), cfg.train_seq_len, backend).float()
    ref = torch.empty(n, h, hd, device=device)
    bounds = cu.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[s:e].float().transpose(0, 1) for t in (q, k, v))
        ks, vs = ks.repeat_interleave(h // hkv, 0), vs.repeat_interleave(h // hkv, 0)
        ref[s:e] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(0, 1)
    diff = float((out - ref).abs().max())
    vmax = float(v.float().abs().max())
    # An output is a convex mix of v rows: 16-bit kernels round P and the output to 8 mantissa bits, so their error
    # stays below a few 2^-8 of max|v|; float32 is ~1e-7 relative. A mask that lets documents or the future leak in
    # moves outputs by O(max|v|), far above either bound.
    tol = (2.0 ** -6 if dtype != torch.float32 else 1e-5) * vmax
    return Row("attention", GO if diff <= tol else NO_GO,
               f"{backend}: max abs diff {diff:.2e} from the SDPA reference (tol {tol:.2e})",
               f"{len(bounds) - 1} packed segments in {n} tokens (BOS + {cfg.train_seq_len}-token cuts), heads "
               f"{h}/{hkv}, head_dim {hd}, {str(dtype).removeprefix('torch.')}; reference: causal SDPA per document",
               dict(backend=backend, max_abs_diff=diff, tol=tol, segments=len(bounds) - 1))


class _Quiet:
    """A log for lcq.train that keeps its lines out of the table (they go to the preflight log file)."""

    def __init__(self, log):
        self._log = log

    def __call__(self, msg: str = "") -> None:
        # step lines (at least every lcq.train.LOG_SECONDS) reach the console too: progress while steps are timed
        self._log(msg, console=msg.startswith("step:"))

    def stage(self, name: str, seconds: float, **fields) -> None:
        self._log(f"stage:{name} time:{seconds:.2f}s " + " ".join(f"{k}:{v}" for k, v in fields.items()), console=False)


def timed_steps(run, steps: int) -> tuple[Row, Row]:
    """lcq.train for `steps` timed steps after the configured warm-up; returns the train row and the compile row.
    The budget is lifted so the steps always run; the projection uses the real budget."""
    cfg, dinfo = run.cfg, run.dinfo
    compiled = cfg.compile and dinfo.device.type == "cuda"
    if compiled:
        from torch._dynamo.utils import counters
        counters.clear()
    tcfg = replace(cfg, iterations=steps, val_loss_every=0, train_log_every=max(steps, 1),
                   max_wallclock_seconds=cfg.train_reserve_seconds + 1e9)
    res = train(run.model, tcfg, dinfo, _Quiet(run.log), run.bos_id)
    ms = res.step_avg_ms
    budget = cfg.train_budget_seconds
    projected = min(cfg.iterations, int(budget * 1000 / (ms * (1 + TIME_MARGIN))))
    tok_s = res.tokens_per_step / (ms / 1000)
    train_row = Row("train", GO if projected >= 1 else NO_GO,
                    f"{ms:.2f} ms/step, {tok_s:,.0f} tok/s; projected {projected} steps in the {budget:.1f}s train "
                    f"budget" + (" (ITERATIONS caps it)" if projected == cfg.iterations else ""),
                    f"mean of {steps} timed steps (lcq.train, {res.tokens_per_step} tokens/step, "
                    f"{res.tokens_per_step // (dinfo.world_size * cfg.grad_accum_steps)} per device per micro-step) "
                    f"after {cfg.warmup_steps} warm-up steps (or one per compiled shape, if more); steps = budget / (ms/step x {1 + TIME_MARGIN:.2f})",
                    dict(ms_per_step=ms, tokens_per_step=res.tokens_per_step, tok_per_s=tok_s,
                         projected_steps=projected, train_budget_s=budget, timed_steps=steps))
    if not compiled:
        why = "COMPILE=0" if not cfg.compile else "torch.compile is used on CUDA only"
        compile_row = Row("compile", INFO, f"off ({why})", "eager forward", dict(enabled=False))
    else:
        graphs = int(counters["stats"]["unique_graphs"])
        breaks = int(sum(counters["graph_break"].values()))
        reasons = "; ".join(list(counters["graph_break"])[:2])
        # static shapes (lcq/train.py): one training graph per cu_seqlens bucket and layer order, all in the warm-up
        buckets, warmed, _ = bucket_plan(cfg, res.tokens_per_step // (dinfo.world_size * cfg.grad_accum_steps),
                                         run.bos_id, SeqSchedule(cfg.train_seq_schedule, cfg.train_seq_len).lengths)
        want = warmed * (1 + (cfg.recur_passes > 1))
        compile_row = Row("compile", GO if breaks == 0 else WARN,
                          f"{graphs} graph(s) ({want} training: cu_seqlens buckets {buckets[:warmed]} x layer orders), "
                          f"{breaks} graph break(s)" + (f": {reasons}" if breaks else ""),
                          "torch._dynamo counters over the warm-up and timed steps (a break costs speed, which the "
                          "train row already measures)",
                          dict(enabled=True, graphs=graphs, training_graphs=want, breaks=breaks))
    return train_row, compile_row


def lora_ranks(run, code: int, model_bytes: int) -> tuple[dict[str, int], str]:
    """(rank by target, note) for the configured LCQ, chosen as lcq.pipeline.lcq chooses them (auto: the rank the
    pipeline's own per-rank byte estimate fits under the cap)."""
    cfg = run.cfg
    if not cfg.lcq_enabled:
        return {}, "LCQ off"
    names = lcq_target_names(run.model, cfg)
    room = cfg.artifact_cap_bytes - code - model_bytes - cfg.lcq_auto_headroom_bytes
    if cfg.lcq_bytes != "0":  # the allocation follows the real errors; a uniform rank of at most its bytes stands in
        budget = room if cfg.lcq_bytes == "auto" else int(cfg.lcq_bytes)
        rank = max(0, int(budget // lora_bytes_per_rank(run.model, names, config_format(cfg))))
        note = f"LCQ_BYTES={cfg.lcq_bytes}: at most {budget} bytes, sized as uniform rank {rank}"
    elif cfg.lcq_rank == "auto":
        rank = max(0, int(room // lora_bytes_per_rank(run.model, names, config_format(cfg))))
        note = f"LCQ_RANK=auto: rank {rank} fits the room left"
    else:
        rank = int(cfg.lcq_rank)
        note = f"rank {rank}"
    return {n: rank for n in names}, f"{note} on {len(names)} targets"


def lora_section(run, ranks: dict[str, int], threads) -> tuple[int, float]:
    """(bytes, seconds) of a LoRA section of these ranks: N(0, 1) factors of the real shapes through the shipped
    factor quantizer (lcq.lora.quantize_factors) and a timed lcq.artifact.SectionJob. Gaussian rows under max-abs
    int8 are nearly incompressible, as trained factors are; a small section's time is mostly the compressors' set-up,
    which a rate measured on the big base section would miss."""
    cfg = run.cfg
    gen = torch.Generator().manual_seed(cfg.seed)
    mods = dict(run.model.named_modules())
    tensors = {}
    for name, r in ranks.items():
        A = torch.randn(r, mods[name].in_features, generator=gen)
        B = torch.randn(mods[name].out_features, r, generator=gen)
        for key, t in quantize_factors(A, B, config_format(cfg)).items():
            tensors[f"{LORA_PREFIX}{name}.{key}"] = t
    meta = dict(merge=cfg.lcq_merge, init=cfg.lcq_init, ranks=ranks, alpha=cfg.lcq_alpha,
                format=list(config_format(cfg)))
    t0 = time.perf_counter()
    section = artifact.SectionJob("lora", tensors, meta, grouping.section_compressor(cfg.compressor), threads).result()
    return section.nbytes, time.perf_counter() - t0


def artifact_rows(run) -> tuple[Row, dict]:
    """Rank 0: the artifact's bytes from the current weights and from a Gaussian refill, both through the real
    quantizer and compressor; the refill's base section is also the timed compression (lcq.grouping.model_job, the
    job the pipeline starts on host threads when GPTQ ends). Returns (artifact row, serialize measurements)."""
    cfg = run.cfg
    threads = artifact.serialize_threads(cfg.serialize_threads)
    t0 = time.perf_counter()
    code = len(shipped_script(ENTRY))
    script_s = time.perf_counter() - t0  # the pipeline renders it on a host thread from GPTQ's end, like the base
    current = len(artifact.assemble(grouping.model_job(run.qtensors, artifact_meta(cfg, run.bos_id, run.qmeta, None),
                                                       cfg.compressor, threads).sections()))
    state = {k: v.detach() for k, v in run.model.state_dict().items()}
    gtensors, gmeta = quantize_state(gaussian_state(state, cfg.seed), run.hessians, quant_spec(cfg), TIED)
    gtensors = {k: v.detach().cpu() for k, v in gtensors.items()}
    t0 = time.perf_counter()
    job = grouping.model_job(gtensors, artifact_meta(cfg, run.bos_id, gmeta, None), cfg.compressor, threads)
    sections = job.sections()
    base_s = time.perf_counter() - t0
    gauss = len(artifact.assemble(sections))
    model_bytes = max(current, gauss)
    fit, fit_s = project_fit(run, gtensors if gauss >= current else run.qtensors, model_bytes,
                             cfg.artifact_cap_bytes - code, threads)
    model_bytes = fit.get("after", model_bytes)
    ranks, lora_note = lora_ranks(run, code, model_bytes)
    lora, lora_s = 0, 0.0
    if cfg.lcq_merge == "baked":
        lora_note += ", LCQ_MERGE=baked ships no factors"
    elif any(ranks.values()):
        lora, lora_s = lora_section(run, ranks, threads)
        lora_note += f": a Gaussian-factor section of those shapes, {lora_s:.2f}s to compress"
    total = code + model_bytes + lora
    limit = int(cfg.artifact_cap_bytes * (1 - BYTES_MARGIN))
    no_room = cfg.lcq_rank == "auto" and not any(ranks.values())
    status = NO_GO if total > cfg.artifact_cap_bytes or no_room or "error" in fit else GO if total <= limit else WARN
    row = Row("artifact", status,
              f"projected {total:,} bytes = code {code:,} + model {model_bytes:,} + lora {lora:,}; cap "
              f"{cfg.artifact_cap_bytes:,} ({abs(cfg.artifact_cap_bytes - total):,} "
              f"{'under' if total <= cfg.artifact_cap_bytes else 'OVER'}); go if <= {limit:,}, warn up to the "
              f"cap ({BYTES_MARGIN:.0%} margin)"
              + (f"; fit: {fit['error']}" if "error" in fit else f"; fit: pruned {fit['pruned']:,} of "
                 f"{fit['candidates']:,} +-1 codes ({fit['pruned'] / fit['candidates']:.1%}, FIT_MAX_FRACTION "
                 f"{cfg.fit_max_fraction:g}), {fit['before']:,} -> {fit['after']:,} model bytes in {fit_s:.1f}s"
                 if fit else ""),
              f"model = max(current weights {current:,}, Gaussian refill {gauss:,}): {cfg.quant_method} "
              f"int{cfg.matrix_bits}/int{cfg.embed_bits} + {cfg.compressor}, the real code. Untrained weights "
              "(zero-init projections) compress far smaller than trained ones; at a fixed per-row std (the SDClip "
              "grid) Gaussian rows maximise the codes' entropy, so the refill bounds trained weights from above. "
              f"Code: the shipped train_gpt.py. LoRA: {lora_note}",
              dict(total=total, code=code, model_current=current, model_gaussian=gauss, lora=lora,
                   lora_rank=max(ranks.values(), default=0), cap=cfg.artifact_cap_bytes, limit=limit, fit=fit,
                   fit_s=fit_s))
    rates = job.rates() or {}
    return row, dict(base_s=base_s, lora_s=lora_s, script_s=script_s, raw_bytes=job.raw_bytes, threads=job.threads,
                     rates=rates, fit_s=fit_s)


def project_fit(run, tensors: dict, over: int, target: int, threads: int) -> tuple[dict, float]:
    """The fit (lcq.shipping.fit_to_cap) a run would make, timed: the same search with the shipped compressor on
    `tensors` (the larger of the current weights' codes and the Gaussian refill's, an upper bound on trained codes),
    costs h_jj s^2 (a refill has no float weights to take the error term from). ({} when the model fits unpruned,
    else its counts and bytes, or "error" when pruning FIT_MAX_FRACTION does not fit; seconds)."""
    if over <= target:
        return {}, 0.0
    cfg, t0, cache = run.cfg, time.perf_counter(), {}
    order = prune_order(tensors, run.hessians)
    meta = artifact_meta(cfg, run.bos_id, run.qmeta, None)

    def measure(n: int) -> int:
        job = grouping.model_job(prune(tensors, order, n), meta, cfg.compressor, threads, cache=cache)
        return artifact.HEADER_BYTES + sum(sec.nbytes for sec in job.sections())

    out = dict(before=over, candidates=len(order[1]))
    try:
        n, sizes = least_count(measure, over, target, int(cfg.fit_max_fraction * len(order[1])),
                               max(1, (over - target) * 10))
        out.update(pruned=n, after=sizes[n], probes=len(sizes) - 1)
    except FitError as e:
        out["error"] = str(e)
    return out, time.perf_counter() - t0


def serialize_plan(cfg: Config, gptq_s: float, m: dict) -> tuple[Row, list]:
    """The serialize row and the projected training clock, as lcq.pipeline spends it: the base section compresses on
    host threads from GPTQ's end (the shipped script renders beside it) while LCQ distils; after LCQ the serialize stage
    compresses the LoRA section and waits for the base one if it is not done (LCQ_MERGE=baked: GPTQ again, then the
    whole base section; LCQ off: the base section). LCQ gets what is left of the reserve after LCQ_SAFETY_SECONDS."""
    window = cfg.train_reserve_seconds - gptq_s - m["fit_s"] - cfg.lcq_safety_seconds  # after GPTQ and the fit
    base_s, lora_s, script_s = m["base_s"], m["lora_s"], m["script_s"]
    k = 1 + TIME_MARGIN
    if not cfg.lcq_enabled:
        serialize_s, lcq_s, ok = base_s + script_s, 0.0, (base_s + script_s) * k <= window
        how = "LCQ off: the serialize stage waits for the base section and the script"
    elif cfg.lcq_merge == "baked":
        serialize_s = base_s
        lcq_s = window - gptq_s * k - serialize_s * k
        ok = lcq_s > 0
        how = "LCQ_MERGE=baked: GPTQ again after LCQ, then the whole base section"
    else:
        serialize_s = lora_s
        lcq_s = window - serialize_s * k
        ok = (base_s + script_s + serialize_s) * k <= window and lcq_s > 0
        how = ("the base section and the script (host threads from GPTQ's end, counted one after the other) must "
               "finish while LCQ runs; on the clock after LCQ: the LoRA section")
    rates = " ".join(f"{c} {r / 1e6:.2f}" for c, r in m["rates"].items())
    row = Row("serialize", GO if ok else NO_GO,
              f"host compression {rates} MB/s per thread x {m['threads']} threads; full base section {base_s:.2f}s, "
              f"on the clock {serialize_s:.2f}s; LCQ + serialize window {window:.1f}s",
              f"timed model job (lcq.grouping.model_job) of the full-size Gaussian-refill payload ({m['raw_bytes']:,} raw bytes, "
              f"COMPRESSOR={cfg.compressor}, SERIALIZE_THREADS={cfg.serialize_threads} -> {m['threads']} threads); LoRA section "
              f"{lora_s:.2f}s (timed, see the artifact row); rendering the shipped script {script_s:.2f}s (timed); "
              f"{how}; go if x{k:.2f} fits"
              + ("; on CPU LCQ shares these cores, so the overlap is optimistic" if m.get("cpu") else ""),
              dict(base_section_s=base_s, lora_section_s=lora_s, script_s=script_s, serialize_s=serialize_s,
                   window_s=window,
                   threads=m["threads"], rates_bytes_per_s=m["rates"], raw_bytes=m["raw_bytes"]))
    stages = [("train", cfg.train_budget_seconds, cfg.train_budget_seconds), ("gptq", gptq_s, None),
              ("fit", m["fit_s"], None), ("lcq", max(0.0, lcq_s), None), ("serialize", serialize_s, None)]
    return row, stages


# What the TTT projection times: pieces of real batches of the val split (TTT_BATCH_DOCS documents each), TTT_SAMPLE_CHUNKS
# chunk forwards long, cut from the median-cost and the dearest batch at their first, middle and last chunks (short to
# full-window rows). Whole batches would not do: on a small split (demo) two batches are the whole pass, and at record
# scale the dearest batch (the longest documents) alone takes minutes.
TTT_SAMPLE_CHUNKS = 2


def ttt_projection(run, context: str | None = None) -> dict:
    """The TTT pass's seconds on this box: lcq.ttt's own schedule of the configured val split (TTT_BATCH_DOCS per batch,
    longest first, phase segments, the cost-balanced rank split); pieces of its real batches (TTT_SAMPLE_CHUNKS) timed
    through lcq.ttt.adapt_batch on a copy of the model with a zero-started adapter (TTT_RANK on TTT_TARGETS: a shipped
    LCQ adapter is smaller), the slowest rank's time of each; a least-squares fit seconds = a x padded forward tokens +
    b x chunk forwards over them (lcq.ttt.batch_cost's count), applied to every batch; a rank's time is the sum over its
    batches, the pass the slowest rank's. Global phases: one timed SGD step
    (after an untimed one) times the phases' steps. The compile warm-up (CUDA with COMPILE=1) is timed and reported
    apart: it runs before the eval clock. context: a TTT_CONTEXT other than the configured one (with reuse the pieces
    run through the KV cache and the fit's forward tokens are the chunks' new tokens)."""
    cfg, dinfo = replace(run.cfg, ttt_context=context or run.cfg.ttt_context), run.dinfo
    spec, window, dev = ttt_spec(cfg), cfg.window, dinfo.device
    reuse = spec.context == "reuse"
    model = prepare_adapter(copy.deepcopy(run.model), "zero", cfg)
    model.eval()
    val = ValStream(run.val_tokens, run.bos_id, run.tables, dev, run.val_bytes)
    spans, order, plans, segs = schedule(val, window, cfg.ttt_chunk_tokens, spec, dinfo.world_size)
    batches = [[plans[d] for d in b] for _, bs, _ in segs for b in bs]
    owner = np.array([r for _, _, o in segs for r in o])
    feats = np.array([(batch_cost(p, spec.batch_docs, window, reuse), max(len(x) for x in p)) for p in batches],
                     dtype=float)
    ad = SlotAdapters(model, spec.batch_docs, spec.lr, (spec.beta1, spec.beta2), spec.eps, spec.weight_decay)
    fwd, kv = ttt_forward(model, dev), make_cache(model, spec, window, dev)
    warm_s = 0.0
    if getattr(model, "compile_eval", False):
        t0 = time.perf_counter()
        warm_up(fwd, ad, window, model.tok_emb.num_embeddings, dev, spec.steps > 0, kv, spec.chunk_tokens)
        D.sync(dev)
        warm_s = time.perf_counter() - t0
    by_cost = np.argsort(feats[:, 0], kind="stable")
    m = TTT_SAMPLE_CHUNKS

    def piece(i: int, k: int) -> list[np.ndarray]:
        """Chunks k..k+m-1 of batch i's documents, the first (longest) document's first chunk appended: every timed
        forward then learns as in a whole batch (a batch's last forward is its only one without a step), and the
        appended one is a short score-only forward."""
        p = [x[k:k + m] for x in batches[i]]
        p[0] = np.concatenate([p[0], batches[i][0][:1]])
        return p

    picks = {}
    for i in dict.fromkeys((int(by_cost[len(by_cost) // 2]), int(by_cost[-1]))):
        n0 = len(batches[i][0])
        for k in dict.fromkeys((0, max(0, n0 // 2 - m // 2), max(0, n0 - m))):
            picks[(i, k)] = piece(i, k)

    def timed(p: list[np.ndarray]) -> float:
        D.sync(dev)
        t0 = time.perf_counter()
        adapt_batch(fwd, ad, val, p, spec, window, Scored.empty(), kv)
        D.sync(dev)
        return time.perf_counter() - t0

    timed(piece(int(by_cost[0]), 0))  # untimed: first-call overheads
    secs = D.all_reduce_max(torch.tensor([timed(p) for p in picks.values()], dtype=torch.float64, device=dev))
    secs = secs.cpu().numpy()
    X = np.array([(batch_cost(p, spec.batch_docs, window, reuse), len(p[0])) for p in picks.values()], dtype=float)
    coef = np.linalg.lstsq(X, secs, rcond=None)[0] if len(X) > 1 else np.array([-1.0, 0.0])
    if (coef < 0).any():  # a fit the noise bent below zero: seconds proportional to forward tokens instead
        coef = np.array([secs.sum() / X[:, 0].sum(), 0.0])
    per_rank = np.bincount(owner, weights=feats @ coef, minlength=dinfo.world_size)
    phase_s, phase_steps = 0.0, 0
    if len(segs) > 1:
        ad.install(back=True)
        step_tokens = spec.phase_tokens or cfg.eval_batch_tokens
        rows = [np.concatenate([plan_doc(s, e, window, window) for s, e in spans[order[:hi]].tolist()])
                for hi, _, _ in segs[:-1]]
        phase_steps = sum(len(list(_batches(r, step_tokens))) for r in rows)
        # one step's worth of the first documents in scoring order (the last one cut), as global_phase packs them
        lens = spans[order, 1] - spans[order, 0]
        k = min(int(np.searchsorted(np.cumsum(lens), step_tokens)), len(order) - 1)
        one = spans[order[:k + 1]].copy()
        one[-1, 1] = min(one[-1, 1], one[-1, 0] + step_tokens - int(lens[:k].sum()))
        global_phase(model, val, one, window, spec, step_tokens, dinfo)  # untimed: first-call overheads
        D.sync(dev)
        t0 = time.perf_counter()
        global_phase(model, val, one, window, spec, step_tokens, dinfo)
        D.sync(dev)
        phase_s = phase_steps * float(D.all_reduce_max(torch.tensor([time.perf_counter() - t0],
                                                                    dtype=torch.float64, device=dev)))
    return dict(ttt_projected_s=float(per_rank.max()) + phase_s, ttt_batches=len(batches),
                ttt_timed_pieces=len(picks), ttt_timed_s=[round(float(t), 4) for t in secs],
                ttt_sec_per_forward_token=float(coef[0]), ttt_sec_per_chunk_forward=float(coef[1]),
                ttt_forward_tokens=int(feats[:, 0].sum()), ttt_chunk_forwards=int(feats[:, 1].sum()),
                ttt_rank_s=[round(float(t), 3) for t in per_rank], ttt_phase_s=phase_s, ttt_phase_steps=phase_steps,
                ttt_warmup_s=warm_s, ttt_documents=len(spans))


def eval_row(run) -> Row:
    """The whole eval from timed pieces (issue 24): every sliding pass the pipeline scores (pre_quant, quantized, and
    quantized_lcq when LCQ ships a LoRA), each projected as the forward tokens of the configured val split / the rate
    of timed lcq.evaluate calls on a val prefix; the n-gram hints (lcq.ngram.hints on the scored val tokens, split
    over this run's ranks, timed whole); the TTT pass (ttt_projection). No-go if the sum x (1 + TIME_MARGIN) is over
    EVAL_BUDGET_SECONDS."""
    cfg, dinfo = run.cfg, run.dinfo
    shard_tokens = sum(read_header(f) for f in list_shards(val_pattern(cfg.data_path), "val"))
    val = run.val_tokens
    starts = doc_starts(val, run.bos_id)
    windows = plan_windows(starts, val.size, cfg.window, cfg.eval_stride)
    forward = int((windows[:, 1] - windows[:, 0]).sum())
    ends = np.append(starts[1:], val.size)

    def prefix(target: int) -> np.ndarray:
        """The val stream cut at the first document start past `target` forward tokens (approx. window/stride each)."""
        fwd = np.cumsum((ends - starts) * max(1.0, cfg.window / cfg.eval_stride))
        cut = int(np.searchsorted(fwd, target))
        return val[:int(ends[min(cut, len(ends) - 1)])]

    per_batch = dinfo.world_size * cfg.eval_batch_tokens
    warm, timed = prefix(per_batch), prefix(2 * per_batch)

    def side(part: np.ndarray):  # the byte sidecar's entries for a val prefix (CaseOps data), if the data has one
        return None if run.val_bytes is None else run.val_bytes[:part.size]

    args = (run.bos_id, run.tables, cfg.window, cfg.eval_stride, cfg.eval_batch_tokens, dinfo)
    from torch._dynamo.utils import counters
    evaluate(run.model, warm, *args, val_bytes=side(warm))
    frames = counters["frames"]["total"]
    res = evaluate(run.model, timed, *args, val_bytes=side(timed))
    # issue 27: frames the timed pass compiled after the warm call. dynamic=True over varying max_seqlen recompiles with
    # a flash-attn build whose op is not a torch custom_op, up to the recompile limit, then runs eagerly on the clock
    frames = counters["frames"]["total"] - frames
    tw = plan_windows(doc_starts(timed, run.bos_id), timed.size, cfg.window, cfg.eval_stride)
    rate = float((tw[:, 1] - tw[:, 0]).sum()) / res.seconds
    projected = forward / rate
    passes = 3 if cfg.lcq_enabled else 2
    hint_s = 0.0
    if cfg.ngram_tilt:
        hint_s = build_tilt(val, cfg.ngram_order, cfg.ngram_threshold, cfg.ngram_boost, dinfo).seconds
    ttt_text, ttt_basis, ttt_data, ttt_s = "", "", {}, 0.0
    if cfg.ttt_enabled:
        ttt_data = ttt_projection(run)
        ttt_s = ttt_data["ttt_projected_s"]
        other = "reuse" if cfg.ttt_context == "recompute" else "recompute"  # issue 26: both modes, from timed pieces
        ttt_data[f"ttt_projected_s_{cfg.ttt_context}"] = ttt_s
        ttt_data[f"ttt_projected_s_{other}"] = ttt_projection(run, other)["ttt_projected_s"]
        ttt_text = (f" + TTT pass {ttt_s:.1f}s (TTT_CONTEXT={cfg.ttt_context}; {other}: "
                    f"{ttt_data[f'ttt_projected_s_{other}']:.1f}s)"
                    + (f" (+ {ttt_data['ttt_warmup_s']:.1f}s compile warm-up before the eval clock)"
                       if ttt_data["ttt_warmup_s"] else ""))
        ttt_basis = (f" TTT: {ttt_data['ttt_documents']:,} documents in {ttt_data['ttt_batches']:,} batches of "
                     f"TTT_BATCH_DOCS={cfg.ttt_batch_docs} (lcq.ttt.schedule, {dinfo.world_size} rank(s)), "
                     f"{ttt_data['ttt_forward_tokens']:,} padded forward tokens in {ttt_data['ttt_chunk_forwards']:,} "
                     f"chunk forwards; {ttt_data['ttt_timed_pieces']} pieces of real batches ({TTT_SAMPLE_CHUNKS} chunks "
                     f"each + a short one) timed through lcq.ttt.adapt_batch "
                     f"({', '.join(f'{t:.3f}' for t in ttt_data['ttt_timed_s'])}s; zero-started TTT_RANK="
                     f"{cfg.ttt_rank} adapter) fit {ttt_data['ttt_sec_per_forward_token'] * 1e6:.3f} us per forward "
                     f"token + {ttt_data['ttt_sec_per_chunk_forward'] * 1e3:.3f} ms per chunk forward; slowest rank "
                     f"{max(ttt_data['ttt_rank_s']):.1f}s"
                     + (f" + {ttt_data['ttt_phase_steps']} global-phase SGD steps {ttt_data['ttt_phase_s']:.1f}s "
                        "(one timed step each)" if ttt_data["ttt_phase_steps"] else "") + ".")
    whole = passes * projected + hint_s + ttt_s
    ok = whole * (1 + TIME_MARGIN) <= cfg.eval_budget_seconds
    cut = cfg.val_max_tokens and val.size < shard_tokens
    used = f"first {val.size:,} (VAL_MAX_TOKENS)" if cut else f"all {val.size:,}"
    recompiled = f"; WARN: the timed pass compiled {frames} Dynamo frame(s) after its warm-up call" if frames else ""
    hint_text = f" + n-gram hints {hint_s:.1f}s" if cfg.ngram_tilt else ""
    return Row("eval", (GO if not frames else WARN) if ok else NO_GO,
               f"{rate:,.0f} forward tok/s; whole eval projected {whole:.1f}s = {passes} sliding passes x "
               f"{projected:.1f}s{hint_text}{ttt_text}, EVAL_BUDGET_SECONDS {cfg.eval_budget_seconds:.0f}{recompiled}",
               f"val shards hold {shard_tokens:,} tokens (headers); scoring {used} tokens, {starts.size:,} documents, "
               f"window {cfg.window} stride {cfg.eval_stride}: {len(windows):,} windows, {forward:,} forward tokens. "
               f"Rate: timed lcq.evaluate of the first {timed.size:,} val tokens after a warm-up call, "
               f"{cfg.eval_batch_tokens} tokens/batch/rank, float model without LoRA (a side LoRA adds its low-rank "
               "path); each scored stage (pre_quant, quantized, as shipped) is one such pass. "
               + (f"Hints: lcq.ngram.hints on the {val.size:,} scored tokens (order {cfg.ngram_order}), split over "
                  f"{dinfo.world_size} rank(s), timed once (the run builds them once)." if cfg.ngram_tilt else "")
               + ttt_basis + f" Go if the sum x{1 + TIME_MARGIN:.2f} fits.",
               dict(**ttt_data, tok_per_s=rate, projected_s=projected, sliding_passes=passes, hint_s=hint_s,
                    whole_eval_projected_s=whole, frames_after_warmup=frames, val_tokens_in_shards=shard_tokens,
                    val_tokens_scored=int(val.size), documents=int(starts.size), windows=len(windows),
                    forward_tokens=forward, eval_budget_s=cfg.eval_budget_seconds))


def memory_row(dinfo: D.DistInfo) -> Row:
    if dinfo.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dinfo.device)
        total = torch.cuda.get_device_properties(dinfo.device).total_memory
        what = "torch.cuda.max_memory_allocated, max over ranks (one device each)"
        reduce = D.all_reduce_max
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        what = "peak RSS (getrusage), summed over ranks (they share the host's memory)"
        reduce = D.all_reduce_sum
    peak = int(reduce(torch.tensor([float(peak)], dtype=torch.float64, device=dinfo.device)).item())
    ok = peak <= MEMORY_SHARE * total
    return Row("memory", GO if ok else NO_GO,
               f"peak {peak / 2**30:.2f} GiB of {total / 2**30:.1f} GiB ({peak / total:.0%}); "
               f"go if <= {MEMORY_SHARE:.0%}",
               f"{what}, over warm-up + timed steps, GPTQ and the eval forward (LCQ's teacher + "
               "student pair is not measured)", dict(peak_bytes=peak, total_bytes=total))


def ledger_row(cfg: Config, stages: list, gptq_ok: bool, serialize_ok: bool) -> Row:
    total = sum(s for _, s, _ in stages)
    lcq_s = next(s for n, s, _ in stages if n == "lcq")
    ok = gptq_ok and serialize_ok and total <= cfg.max_wallclock_seconds and (lcq_s > 0 or not cfg.lcq_enabled)
    return Row("ledger", GO if ok else NO_GO,
               ", ".join(f"{n} {s:.1f}s" for n, s, _ in stages) + f" + safety {cfg.lcq_safety_seconds:.1f}s; total "
               f"{total + cfg.lcq_safety_seconds:.1f}s of MAX_WALLCLOCK_SECONDS {cfg.max_wallclock_seconds:.0f}",
               "train runs to its budget (MAX_WALLCLOCK_SECONDS - TRAIN_RESERVE_SECONDS); GPTQ measured; LCQ gets the "
               "rest of the reserve after the serialize projection and LCQ_SAFETY_SECONDS. No-go if the gptq or "
               "serialize row is, or LCQ is left no time",
               {n: dict(seconds=round(s, 3)) for n, s, _ in stages} | dict(total=round(total, 3)))


# ------------------------------------------------------------------------------------------------------ main

ORDER = ("setup", "attention", "compile", "collective", "train", "memory", "gptq", "serialize", "eval", "artifact", "ledger")


def kernels_in_use(device: torch.device) -> str:
    """Which implementation lcq/kernels.py runs on `device`."""
    return "triton" if kernels.triton is not None and (device.type == "cuda" or kernels.INTERPRET) else "torch reference"


def setup_row(cfg: Config, device: torch.device) -> Row:
    """Each piece of the GPU box set-up this run needs and misses, with its install line (issue 18)."""
    missing = {}
    if device.type == "cuda":
        if kernels.triton is None:
            missing["triton"] = TORCH_INSTALL
        if cfg.attention_backend in ("auto", "fa3") and importlib.util.find_spec("flash_attn_interface") is None:
            missing["flash-attn 3 (flash_attn_interface)"] = FA3_INSTALL
    lrzip = cfg.compressor != "group" or artifact.lrzip_binary() is not None
    text = "; ".join(f"missing {k}: {v}" for k, v in missing.items())
    return Row("setup", NO_GO if missing else GO if lrzip else WARN,
               (text or "every piece present") + ("" if lrzip else f"; lrzip not on PATH ({artifact.LRZIP_INSTALL}): "
                                                  "COMPRESSOR=group compresses without it, a little larger"),
               f"torch {torch.__version__} (CUDA {torch.version.cuda}); kernels: {kernels_in_use(device)} (fused "
               "LeakyReLU^2 MLP, softcapped CE, lcq/kernels.py)",
               dict(missing=missing, lrzip=lrzip, kernels=kernels_in_use(device)))


def preflight(cfg: Config, dinfo: D.DistInfo, steps: int) -> tuple[list[Row], object]:
    rows: dict[str, Row] = {}
    rows["setup"] = setup_row(cfg, dinfo.device)
    if rows["setup"].status == NO_GO:  # before the model: a missing kernel would stop it with one piece named
        raise RuntimeError(rows["setup"].result)
    run = open_run(cfg, dinfo)
    try:  # a preflight ships nothing: the empty artifact and script names open_run claimed are removed (issue 28)
        return _rows(run, rows, steps), run
    finally:
        release(run.claims)


def _rows(run, rows: dict[str, Row], steps: int) -> list[Row]:
    cfg, dinfo = run.cfg, run.dinfo
    if dinfo.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dinfo.device)
    rows["collective"] = check_collective(dinfo)
    model = build(run)
    rows["attention"] = check_attention(cfg, model.attn_backend, dinfo.device, run.bos_id)
    run.log(f"preflight: timing {steps} training steps after the warm-up")
    rows["train"], rows["compile"] = timed_steps(run, steps)
    run.log("preflight: GPTQ over the calibration tokens")
    quantize(run)  # the real GPTQ stage over the configured calibration tokens; it logs its own stage line
    gptq_s, share = next((s, b) for stage, s, b in run.ledger if stage == "gptq")  # quantize's own time and budget
    calib = run.log.summary["stages"]["gptq"].get("calib_tokens_per_rank", "the configured")
    rows["gptq"] = Row("gptq", GO if gptq_s * (1 + TIME_MARGIN) <= share else NO_GO,
                       f"{gptq_s:.2f}s, share {share:.1f}s (TRAIN_RESERVE - SERIALIZE_RESERVE - LCQ_SAFETY)",
                       f"measured: lcq.pipeline.quantize itself ({cfg.quant_method}, Hessians over {calib} train "
                       f"tokens/rank + the solve of every matrix) on the preflight's weights; go if "
                       f"x{1 + TIME_MARGIN:.2f} fits the share",
                       dict(seconds=gptq_s, share_s=share))
    measured = None
    run.log("preflight: compressing the artifact, then timing the eval")
    if dinfo.is_master:  # only rank 0 serializes in the pipeline: other ranks compressing too would slow it down
        rows["artifact"], measured = artifact_rows(run)
        measured["cpu"] = dinfo.device.type != "cuda"
    D.barrier()
    rows["eval"] = eval_row(run)
    rows["memory"] = memory_row(dinfo)
    if dinfo.is_master:
        rows["serialize"], stages = serialize_plan(cfg, gptq_s, measured)
        rows["ledger"] = ledger_row(cfg, stages, rows["gptq"].status == GO, rows["serialize"].status == GO)
    return [rows[n] for n in ORDER if n in rows]


def render(rows: list[Row], header: str) -> list[str]:
    lines = [header, f"{'row':<11} {'status':<6}  result"]
    for r in rows:
        lines.append(f"{r.name:<11} {r.status:<6}  {r.result}")
        lines.append(f"{'':<19} from: {r.basis}")
    failed = [r.name for r in rows if r.status == NO_GO]
    lines.append("verdict: " + ("GO: the run should fit" if not failed else f"NO-GO: {', '.join(failed)}"))
    return lines


def run_gpu_check(cfg: Config, steps: int) -> int:
    """Print gpu_check's JSON line for the first CUDA device (else the CPU); exit 1 if a section failed."""
    from .gpu_check import gpu_check  # it imports this module
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    report = gpu_check(cfg, device, steps)
    print(json.dumps(dict(gpu_check=report), sort_keys=True, default=str), flush=True)
    return int(any(isinstance(v, dict) and "error" in v for v in report.values()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lcq preflight", description=__doc__, allow_abbrev=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="timed training steps after the warm-up (default 20)")
    ap.add_argument("--gpu-check", action="store_true",
                    help="the one prepared device check (lcq/gpu_check.py) at the preset's dims on one device: every "
                         "GPU-only path once, one JSON line; the first command to run on a lent GPU")
    args, rest = ap.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.steps < 1:
        ap.error(f"--steps {args.steps}: must be >= 1")
    try:
        cfg, _ = resolve(rest)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.gpu_check:
        return run_gpu_check(cfg, args.steps)
    # its own log file, so a preflight never collides with the run it checks
    cfg = replace(cfg, run_id=f"preflight_{cfg.run_id}")
    dinfo = D.init_dist()
    try:
        t0 = time.perf_counter()
        try:
            rows, run = preflight(cfg, dinfo, args.steps)
        except Exception as e:  # missing data, a kernel that does not load, out of memory: a no-go with its reason
            if not isinstance(e, NAMED_ERRORS):  # a named error says what and the fix; no traceback (issue 28)
                traceback.print_exc()
            if dinfo.is_master:
                print(f"verdict: NO-GO: preflight stopped: {type(e).__name__}: {e}", flush=True)
                print(json.dumps(dict(preflight="no-go", failed=["error"], error=f"{type(e).__name__}: {e}",
                                      preset=cfg.preset, world_size=dinfo.world_size), sort_keys=True), flush=True)
            return 1
        failed = [r.name for r in rows if r.status == NO_GO]
        flag = D.all_reduce_max(torch.tensor([1.0 if failed else 0.0], device=dinfo.device))
        status = 1 if float(flag) else 0
        device = device_name(dinfo) + ("" if dinfo.device.type == "cuda" else f", {cpu_model()}")
        if dinfo.is_master:
            header = (f"preflight preset={cfg.preset} device={device} world_size={dinfo.world_size} "
                      f"timed_steps={args.steps} time_margin={TIME_MARGIN:.0%} bytes_margin={BYTES_MARGIN:.0%} "
                      f"wall={time.perf_counter() - t0:.1f}s")
            for line in render(rows, header):
                run.log(line)
            report = dict(preflight="go" if not status else "no-go", failed=failed, preset=cfg.preset, device=device,
                          world_size=dinfo.world_size, timed_steps=args.steps, time_margin=TIME_MARGIN,
                          bytes_margin=BYTES_MARGIN,
                          rows={r.name: dict(status=r.status, result=r.result, basis=r.basis, **r.data) for r in rows})
            run.log.summary.update(preflight=report, status=status)
            run.log.write_summary()  # logs/preflight_<run_id>.json
            run.log(json.dumps(report, sort_keys=True, default=float))
        run.log.close()
        return status
    finally:
        D.shutdown()


if __name__ == "__main__":
    sys.exit(main())
