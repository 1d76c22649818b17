"""`python -m lcq.preflight --gpu-check`: the one prepared device check (issue 27), the first command to run when a GPU
is lent. No GPU has run the record preset; this runs each GPU-only path once at the preset's dims on one device, on
synthetic tokens (no data or tokenizer needed), and prints one JSON line:

- attention: flash-attn 3 if it imports, else SDPA, named as this check's fallback only (a run refuses it: lcq/attention);
- warmup: the training warm-up over every warmed cu_seqlens bucket (lcq.train.bucket_plan when DATA_PATH has train
  shards, else the ladder for ASSUMED_SEGMENTS), peak device memory of each and FA3's predicted backward scratch;
- step: ms/step over `steps` full training steps (forward, backward, GradSync, Muon + Adam);
- kernels: the fused MLP (MLP_TILES and #1855's tiles) against F.linear at (tokens, d) -> hidden, the fused CE against
  the torch softcapped CE, forward + backward; `fused_mlp` names the FUSED_MLP setting that measured faster;
- gptq: one block's matrices through lcq.gptq.quantize_state;
- eval: a sliding-eval pass and a TTT batch, with the Dynamo frames each compiled after its warm-up (issue 27 item 6: a
  pass that recompiles over max_seqlen is flagged);
- serialize: the whole model's codes (Gaussian weights, rounded to nearest) through the artifact compressor.

A section that raises is reported with its error and the others still run, so one run answers every question. Its CPU
dry run at tiny dims (tests/test_gpu_check.py) runs every section.
"""
from __future__ import annotations

import copy
import json
import sys
import time
import traceback

import numpy as np
import torch

from .. import artifact, grouping, kernels
from .. import dist as D
from ..attention import _flash
from ..config import Config, replace
from ..data import cu_buckets, list_shards, train_pattern
from ..evaluate import evaluate
from ..gptq import quantize_state
from ..model import GPT, autocast_for, gptq_targets
from ..optim import GradSync, build_optimizers
from ..pipeline import quant_spec
from .estimates import fa3_scratch_bytes, gaussian_state
from ..shipping import TIED
from ..tokenizer import ByteTables
from ..train import bucket_plan, compile_loss, local_batch_tokens, warmup_batch
from ..ttt import evaluate_ttt, prepare_adapter, spec_from_config

ASSUMED_SEGMENTS = 256  # real 98,304-token rows hold ~100-200 segments (issue 27); used when no train shard is at hand
TILES_1855 = dict(BM=256, BN=128, BK=64, num_warps=8, num_stages=3)  # #1855's MLP kernel tiles (without its TMA)
BOS = 1


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn, device, reps: int = 5) -> float:
    """Mean ms of fn() over `reps` calls after one untimed call (compile, autotune, allocator)."""
    fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return 1000 * (time.perf_counter() - t0) / reps


def peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def frames() -> int:
    from torch._dynamo.utils import counters
    return int(counters["frames"]["total"])


def attention(device) -> dict:
    if device.type == "cuda" and _flash("fa3") is not None:
        return dict(backend="fa3")
    return dict(backend="sdpa", note="fallback for this check only: flash-attn 3 does not import here")


def warmup_and_steps(cfg: Config, model: GPT, device, backend: str, steps: int) -> tuple[dict, dict]:
    n = local_batch_tokens(cfg, 8)  # one rank's share of the record run on 8 GPUs
    try:
        list_shards(train_pattern(cfg.data_path), "train")
        buckets, warmed, most = bucket_plan(cfg, n, BOS, [cfg.train_seq_len])
        source = "train shards"
    except FileNotFoundError:
        (buckets, warmed), most, source = cu_buckets(n, ASSUMED_SEGMENTS), ASSUMED_SEGMENTS, "assumed"
    looped = cfg.recur_passes > 1
    loss_fn = compile_loss(model, len(buckets) * (1 + looped), backend) if backend else model.loss
    opts = build_optimizers(model, cfg, 1)
    muon = {id(p) for p in opts[1].param_groups[0]["params"]}
    gsync = GradSync(opts[1], [p for p in model.parameters() if p.requires_grad and id(p) not in muon], 1)
    autocast, gen = autocast_for(device, cfg.autocast_cpu_bf16), torch.Generator().manual_seed(0)
    heads, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.model_dim // cfg.num_heads

    def step(batch):
        with autocast:
            loss = loss_fn(*batch, cfg.train_seq_len)
        loss.backward()
        gsync.finish()
        for o in opts:
            o.step()
        gsync.zero()

    rows = []
    for order in ((False, True) if looped else (False,)):
        model.recur_active = order
        for size in buckets[:warmed]:
            batch = [t.to(device) for t in warmup_batch(gen, cfg.vocab_size, n, BOS, cfg.train_seq_len, buckets, size)]
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            step(batch)
            _sync(device)
            rows.append(dict(cu_size=size, recur=order, s=round(time.perf_counter() - t0, 3), peak_gib=peak_gib(device),
                             fa3_scratch_gib=round(fa3_scratch_bytes(n, size - 1, heads, kv, hd) / 2**30, 3)))
    warm = dict(tokens_per_rank=n, buckets=buckets, warmed=warmed, max_segments=most, segments_from=source, rows=rows)
    batch = [t.to(device) for t in warmup_batch(gen, cfg.vocab_size, n, BOS, cfg.train_seq_len, buckets, buckets[0])]
    f0 = frames()
    ms = timed_ms(lambda: step(batch), device, steps)
    return warm, dict(ms_per_step=round(ms, 2), steps=steps, frames_after_warmup=frames() - f0)


def kernel_times(cfg: Config, device, n: int) -> dict:
    """Forward + backward ms of the fused kernels against the torch math at (n, d) -> hidden and (n, vocab)."""
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    d, hidden = cfg.model_dim, int(cfg.mlp_mult * cfg.model_dim)
    x = torch.randn(n, d, device=device, dtype=dt, requires_grad=True)
    w1 = (torch.randn(hidden, d, device=device, dtype=dt) / d ** 0.5).requires_grad_()
    w2 = (torch.randn(d, hidden, device=device, dtype=dt) / hidden ** 0.5).requires_grad_()
    z = (torch.randn(n, cfg.vocab_size, device=device, dtype=dt) * 10).requires_grad_()
    t = torch.randint(0, cfg.vocab_size, (n,), device=device)
    slope, cap = cfg.leaky_relu_slope, cfg.logit_softcap

    def fwd_bwd(fn):
        return lambda: fn().float().sum().backward()

    out = dict(shape=[n, d, hidden], vocab=cfg.vocab_size, runs="triton" if kernels.use_triton(x) else "torch reference",
               torch_mlp_ms=timed_ms(fwd_bwd(lambda: kernels.mlp_ref(x, w1, w2, slope)), device),
               torch_ce_ms=timed_ms(fwd_bwd(lambda: kernels.ce_ref(z, t, cap)), device))
    if kernels.use_triton(x):
        for name, tiles in (("fused_mlp_ms", kernels.MLP_TILES), ("fused_mlp_1855_tiles_ms", TILES_1855)):
            saved = kernels.MLP_TILES
            kernels.MLP_TILES = tiles
            try:
                out[name] = timed_ms(fwd_bwd(lambda: kernels.mlp(x, w1, w2, slope)), device)
            finally:
                kernels.MLP_TILES = saved
        out["fused_ce_ms"] = timed_ms(fwd_bwd(lambda: kernels.softcap_ce(z, t, cap)), device)
        out["fused_mlp"] = "FUSED_MLP=1" if out["fused_mlp_ms"] <= out["torch_mlp_ms"] else "FUSED_MLP=0"
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def gptq_one_block(cfg: Config, model: GPT, device) -> dict:
    targets = {w: m for w, m in gptq_targets(model).items() if m.startswith("blocks.0.")}
    state = {w: model.get_submodule(m).weight.detach().float() for w, m in targets.items()}
    gen = torch.Generator().manual_seed(0)
    hessians = {}
    for w, t in state.items():
        X = torch.randn(4 * t.size(1), t.size(1), generator=gen).to(device)
        hessians[w] = X.T @ X / X.size(0)
    t0 = time.perf_counter()
    quantize_state(state, hessians, quant_spec(cfg), {})
    _sync(device)
    return dict(matrices=len(state), s=round(time.perf_counter() - t0, 3))


def eval_passes(cfg: Config, model: GPT, device, backend: str) -> dict:
    """A sliding pass and a TTT pass over synthetic documents; Dynamo frames compiled after each pass's warm-up."""
    g = np.random.default_rng(0)
    lengths = g.integers(cfg.window // 8, 2 * cfg.window, 24)
    val = np.concatenate([np.concatenate([[BOS], g.integers(2, cfg.vocab_size, n - 1)]) for n in lengths])
    ids = torch.arange(cfg.vocab_size)
    tables = ByteTables(torch.ones(cfg.vocab_size, dtype=torch.int16), torch.zeros_like(ids, dtype=torch.bool), ids < 2)
    dinfo = D.DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    model = copy.deepcopy(model).eval()
    model.compile_eval = backend or False
    args = (BOS, tables, cfg.window, cfg.eval_stride, cfg.eval_batch_tokens, dinfo)
    evaluate(model, val[: val.size // 2], *args)  # the warm call: compiles what the pass needs
    f0 = frames()
    res = evaluate(model, val, *args)
    out = dict(tokens=int(val.size), sliding_s=round(res.seconds, 3), sliding_frames_after_warmup=frames() - f0)
    if cfg.ttt_enabled:
        lines = []
        spec = replace(spec_from_config(cfg), batch_docs=min(cfg.ttt_batch_docs, 8), phases=1, phase_docs=8)
        counts = []

        def log(line):
            lines.append(line)
            counts.append(frames())

        res = evaluate_ttt(prepare_adapter(copy.deepcopy(model), "zero", cfg), val, BOS, tables, cfg.window,
                           cfg.eval_stride, cfg.eval_batch_tokens, dinfo, spec, log=log)
        warm = next((i for i, line in enumerate(lines) if line.startswith("ttt_warmup:")), None)
        out.update(ttt_s=round(res.seconds, 3), ttt_frames_after_warmup=None if warm is None else frames() - counts[warm],
                   ttt_warmup=None if warm is None else lines[warm])
    flagged = [k for k in ("sliding_frames_after_warmup", "ttt_frames_after_warmup") if out.get(k)]
    if flagged:
        out["warn"] = (f"{', '.join(flagged)} > 0: a pass compiled on the eval clock (dynamic=True over max_seqlen with "
                       "a flash-attn op that is not a custom_op recompiles, then runs eagerly past the limit)")
    return out


def serialize(cfg: Config, model: GPT) -> dict:
    state = gaussian_state({k: v.detach().float().cpu() for k, v in model.state_dict().items()}, cfg.seed)
    q, meta = quantize_state(state, None, replace(quant_spec(cfg), method="rtn"), TIED)  # the codes' bytes, not error
    t0 = time.perf_counter()
    blob = artifact.assemble(grouping.model_job(q, dict(qmeta=meta), cfg.compressor,
                                                artifact.serialize_threads(cfg.serialize_threads)).sections())
    return dict(compressor=cfg.compressor, bytes=len(blob), s=round(time.perf_counter() - t0, 3))


def gpu_check(cfg: Config, device: torch.device, steps: int = 20, backend: str | None = None) -> dict:
    """Every section on `device` at cfg's dims. backend: torch.compile's for the training loss and eval forwards
    (default: inductor on CUDA with COMPILE=1, none elsewhere; the CPU dry run passes a CPU one)."""
    if backend is None and device.type == "cuda" and cfg.compile:
        backend = "inductor"
    torch.manual_seed(cfg.seed)
    report: dict = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                        torch=torch.__version__, preset=cfg.preset, compile_backend=backend)
    report["attention"] = attention(device)
    model = GPT(cfg, BOS).to(device)
    model.attn_backend = report["attention"]["backend"]
    n = local_batch_tokens(cfg, 8)
    # the TTT pass last: its warm-up compiles every chunk shape, the longest section on a GPU
    sections = dict(warmup_step=lambda: warmup_and_steps(cfg, model, device, backend, steps),
                    kernels=lambda: kernel_times(cfg, device, n), gptq=lambda: gptq_one_block(cfg, model, device),
                    serialize=lambda: serialize(cfg, model), eval=lambda: eval_passes(cfg, model, device, backend))
    for name, fn in sections.items():
        t0 = time.perf_counter()
        try:
            got = dict(zip(("warmup", "step"), fn())) if name == "warmup_step" else {name: fn()}
        except Exception as e:  # reported, and the next section still runs: device time is scarce
            got = {name: dict(error=f"{type(e).__name__}: {e}", trace=traceback.format_exc(limit=-3))}
        report.update(got)
        report.setdefault("section_s", {})[name] = round(time.perf_counter() - t0, 2)
        # each section as it ends, on stderr: a check cut off by its time limit still leaves what it measured
        print(f"gpu_check {name} {report['section_s'][name]}s: {json.dumps(got, default=str)}", file=sys.stderr,
              flush=True)
    report["peak_gib"] = peak_gib(device)
    return report
