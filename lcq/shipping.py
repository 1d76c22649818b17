"""What ships: model <-> artifact tensors (GPTQ codes, raw control tensors, quantized LoRA factors), and the model a
scorer rebuilds from the artifact file alone."""
from __future__ import annotations

import functools
import hashlib
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn

from . import artifact
from . import dist as D
from . import grouping
from .config import MODEL_FIELDS, Config, replace
from .data import file_sha256
from .gptq import dequantize_state
from .lora import FactorFormat, attach_lora, dequantize_factors, lora_modules, merge_lora, quantize_factors
from .model import GPT, configure_runtime

# 2 (issue 24): U-Net skip weights pair as #1855 pairs them, so a model-1 file would decode into another network
FORMAT = "lcq-model-2"
LORA_PREFIX = "lora."
TIED = {"lm_head.weight": "tok_emb.weight"}


def group_of(name: str) -> str:
    """Byte attribution group of an artifact tensor: LoRA factors vs the quantized model."""
    return "lora" if name.startswith(LORA_PREFIX) else "model"


def pack_lora(model: nn.Module, fmt: FactorFormat) -> tuple[dict[str, torch.Tensor], dict[str, int], float]:
    """Quantized factors of every LoRA wrapper (on its own grid when it has one, else on `fmt`'s from its factors) ->
    (artifact tensors, ranks by module, alpha)."""
    tensors, ranks, alpha = {}, {}, None
    for name, m in lora_modules(model).items():
        packed = m.quantized() if m.fmt is not None else quantize_factors(m.lora_A, m.lora_B, fmt)
        for key, t in packed.items():
            tensors[f"{LORA_PREFIX}{name}.{key}"] = t.cpu()
        ranks[name] = m.rank
        alpha = m.scale * m.rank
    return tensors, ranks, alpha


@functools.lru_cache(maxsize=8)
def _sha256_of(path: str, mtime_ns: int, size: int) -> str:
    return file_sha256(path)


def tokenizer_identity(path: str, vocab_size: int) -> dict:
    """What identifies the tokenizer an artifact was trained with: the .model file's sha256 and the vocabulary size
    (issue 10: bos_id alone let an artifact be scored with another tokenizer). Hashed once per file version."""
    st = os.stat(path)
    return {"sha256": _sha256_of(os.path.abspath(path), st.st_mtime_ns, st.st_size), "vocab_size": vocab_size}


# What --eval_only takes from the artifact where PRESET/--preset, the environment and the command line say nothing
# (issue 28: the demo's artifact was scored with the record preset's CaseOps tokenizer path and refused)
RUN_FIELDS = ("preset", "tokenizer_path", "data_path", "vocab_size")


def artifact_meta(cfg: Config, bos_id: int, qmeta: dict, lora: dict | None) -> dict:
    return {"format": FORMAT, "model": {f: getattr(cfg, f) for f in MODEL_FIELDS}, "bos_id": bos_id,
            "tokenizer": tokenizer_identity(cfg.tokenizer_path, cfg.vocab_size), "qmeta": qmeta, "lora": lora,
            "run": {f: getattr(cfg, f) for f in RUN_FIELDS}}


def recorded_run(path: str) -> dict:
    """The artifact's RUN_FIELDS ({} for a file that does not decode: the start-up checks name what is wrong)."""
    try:
        run = artifact.load(path)[1].get("run")
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in run.items() if k in RUN_FIELDS} if isinstance(run, dict) else {}


def check_artifact_fits(path: str, meta: dict, cfg: Config, bos_id: int) -> dict[str, tuple]:
    """Before scoring an artifact with `cfg`'s tokenizer and data: refuse a tokenizer other than the one it was trained
    with (sha256, vocab size, BOS), which would score meaningless ids or index past the embedding. Returns the model
    knobs of `cfg` that differ from the artifact's shape, {knob: (config value, artifact value)}: the artifact's own
    shape is what runs, so these knobs are ignored and the caller logs them."""
    tok = meta.get("tokenizer")
    if not isinstance(tok, dict) or "sha256" not in tok or "vocab_size" not in tok:
        raise artifact.ArtifactError(f"{path}: records no tokenizer (sha256, vocab size). Fix: re-create it")
    mine = tokenizer_identity(cfg.tokenizer_path, cfg.vocab_size)
    if tok["vocab_size"] != mine["vocab_size"] or tok["sha256"] != mine["sha256"] or int(meta["bos_id"]) != bos_id:
        raise artifact.ArtifactError(
            f"{path} was trained with a tokenizer of sha256 {str(tok['sha256'])[:16]}, vocab {tok['vocab_size']}, "
            f"bos_id {meta['bos_id']}, not TOKENIZER_PATH={cfg.tokenizer_path} (sha256 {mine['sha256'][:16]}, "
            f"vocab {mine['vocab_size']}, bos_id {bos_id}). Fix: set TOKENIZER_PATH, VOCAB_SIZE, DATA_PATH to its own")
    return {k: (getattr(cfg, k), v) for k, v in meta["model"].items() if getattr(cfg, k) != v}


def _refuse(path: str, what: str) -> artifact.ArtifactError:
    return artifact.ArtifactError(f"{path}: {what}, refused before allocating")


def model_config(path: str, meta: dict, cfg: Config, tensors: dict[str, torch.Tensor]) -> Config:
    """The network an artifact claims, checked before it sizes anything (issue 17: crafted dims made the loader try
    terabytes; an unknown field raised a TypeError): known fields that pass the config's checks, the weight count they
    imply (computed, never allocated) within 4x of the values the file holds, and LoRA ranks equal to their factors'
    rows."""
    model = meta.get("model")
    unknown = sorted(set(model) - set(MODEL_FIELDS)) if isinstance(model, dict) else "meta.model"
    if unknown:
        raise artifact.ArtifactError(f"{path}: model fields {unknown} are unknown to this lcq; use the one that "
                                     "wrote it")
    try:
        mcfg = replace(cfg, **model)
    except Exception as e:
        raise _refuse(path, f"model fields: {e}") from None
    d = mcfg.model_dim
    claimed = mcfg.vocab_size * d + mcfg.num_layers * d * (2 * d + 2 * d // mcfg.num_heads * mcfg.num_kv_heads
                                                           + 2 * int(mcfg.mlp_mult * d))
    held = sum(t.numel() for t in tensors.values())
    bad = [n for n, r in dict((meta.get("lora") or {}).get("ranks", {})).items()
           if tensors.get(f"{LORA_PREFIX}{n}.A_q", torch.empty(0)).shape[:1] != (r,)]
    if claimed > 4 * held + (1 << 16) or bad:
        raise _refuse(path, f"its model fields imply ~{claimed} weights (it holds {held}), lora ranks {bad} without "
                      "their factors")
    return mcfg


def model_from_state(cfg: Config, bos_id: int, state: dict[str, torch.Tensor], device: torch.device) -> GPT:
    """A fresh GPT holding exactly `state` (tied weights stay tied)."""
    model = GPT(cfg, bos_id).to(device)
    missing, unexpected = model.load_state_dict({k: v for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise ValueError(f"artifact does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return configure_runtime(model, cfg, device).eval()


def apply_lora(model: GPT, tensors: dict[str, torch.Tensor], lora: dict) -> None:
    """Attach the shipped LoRA factors, decoded from the artifact, as wrappers (an extra low-rank path per layer).

    load_shipped folds them into the weights; the wrappers are what the side path computes, kept for comparing the two."""
    ranks = {name: int(r) for name, r in lora["ranks"].items()}
    attach_lora(model, list(ranks), ranks, float(lora["alpha"]))
    device = next(model.parameters()).device
    for name, m in lora_modules(model).items():
        packed = {k: tensors[f"{LORA_PREFIX}{name}.{k}"] for k in ("A_q", "A_scale", "B_q", "B_scale")}
        A, B = dequantize_factors(packed)
        m.set_factors(B.to(device), A.to(device))
    model.requires_grad_(False)


def load_shipped(path: str, cfg: Config, device: torch.device, with_lora: bool = True) -> tuple[GPT, dict, Config]:
    """Decode the artifact at `path` into a fresh model (with its LoRA unless with_lora is False).

    The LoRA factors are folded into the decoded float weights for every merge mode (issue 8): side and fused ship the
    same int8 factors, the decoded base is float anyway, so W_hat + scale * B @ A scores what the side path scores (up
    to float rounding of the order of the sums) without a low-rank matmul in every adapted layer. meta["lora"]["merge"]
    still records how the artifact ships. The network shape comes from the artifact; everything else (data, eval knobs,
    backend) from `cfg`."""
    tensors, meta = artifact.load(path)
    if meta.get("format") != FORMAT:
        raise artifact.ArtifactError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}")
    model_cfg = model_config(path, meta, cfg, tensors)
    lora = meta.get("lora")
    base = {k: v for k, v in tensors.items() if group_of(k) == "model"}
    try:
        model = model_from_state(model_cfg, meta["bos_id"], dequantize_state(base, meta["qmeta"]), device)
    except (KeyError, TypeError, ValueError) as e:
        raise _refuse(path, f"its tensors do not make the model its meta describes ({type(e).__name__}: {e})") from None
    if with_lora and lora:
        apply_lora(model, tensors, lora)
        merge_lora(model)
    return model, meta, model_cfg


# A projection needs one finished chunk of each compressor; LCQ waits at most this long for it.
RATE_WAIT_SECONDS = 5.0
# Assembling, writing and fsyncing the artifact: a 16 MB file took 0.13 s on the 2-core CI machine; twice that.
WRITE_SECONDS = 0.25


def plan_serialize(run, lcq_seconds_left: float, lora_bytes: int) -> tuple[float, float]:
    """The seconds the serialize stage will be charged, projected from the compression rates the base section's job
    has measured in this run (not a constant): compressing the LoRA section after distillation, plus waiting for the
    base section if it is projected to finish after LCQ would (LCQ then gives that time back, so the threads that
    compress share the cores with less), or, for baked LCQ (the model is re-quantized after distillation), the whole
    base section again. Rank 0 projects; every rank gets its number. Logged and shown as the serialize budget in the
    ledger. Returns (serialize budget, projected seconds of the LoRA section)."""
    cfg, job = run.cfg, run.base_job
    budget, lora_s, note = 0.0, 0.0, ""
    if job is not None:
        left = job.seconds_left(RATE_WAIT_SECONDS)
        rates = job.rates()
        if left is None or rates is None:
            budget = cfg.serialize_reserve_seconds
            note = f"no chunk timed within {RATE_WAIT_SECONDS:g}s; SERIALIZE_RESERVE_SECONDS {budget:g}s kept"
        else:
            per_byte = sum(1 / r for c, r in rates.items() if c not in job.dropped)  # thread-seconds, every back-end
            lora_s = lora_bytes * per_byte / min(job.threads, len(rates))
            if cfg.lcq_merge == "baked":
                base_s = job.raw_bytes * per_byte / job.threads
                wait, what = base_s, f"the re-quantized base section again {base_s:.2f}s"
            else:
                wait = max(0.0, left - (lcq_seconds_left - lora_s - WRITE_SECONDS))
                what = f"base section projected done in {left:.2f}s, wait after LCQ {wait:.2f}s"
            budget = wait + lora_s + WRITE_SECONDS
            if wait > 0 and cfg.lcq_merge != "baked":
                run.log(f"warning: the base section is projected {wait:.2f}s past LCQ's end; LCQ gives that back. Fix: "
                        "more SERIALIZE_THREADS or TRAIN_RESERVE_SECONDS")
            note = (f"base section {job.raw_bytes} raw bytes, {job.threads} threads, measured "
                    + " ".join(f"{c} {r / 1e6:.2f}" for c, r in rates.items()) + " MB/s per thread; "
                    f"{what}; LoRA section ~{lora_bytes} raw bytes {lora_s:.2f}s; write {WRITE_SECONDS:g}s")
    budget, lora_s = (float(v) for v in D.all_reduce_max(
        torch.tensor([budget, lora_s], dtype=torch.float64, device=run.dinfo.device)).tolist())
    run.serialize_budget = budget
    if job is not None:
        run.log(f"serialize_plan: {note}; serialize budget {budget:.2f}s")
    return budget, lora_s


# ---- the fit (issue 25): the quantized model trimmed to the cap at the least error ------------------------------
# The record folder 2026-03-25_ValCalib_GPTQ_XSA_BigramHash3072 fitted its artifact by zeroing selected +-1 codes, a
# binary search on how many. Here the cost of zeroing an entry is the exact change of the Hessian-weighted error GPTQ
# minimises, tr(E H E^T) with E = W - W_hat, when that entry alone moves by its scale s: s^2 h_jj + 2 q s (E H)_ij
# (the h_jj s^2 plus the cross term with the error already there, which can make a prune cheaper than free:
# GPTQ's rounding pushed some entries past their float value).


class FitError(artifact.ArtifactError):
    """Pruning FIT_MAX_FRACTION of the +-1 codes does not bring the model under the cap."""
    status = 3  # the gate's exit status (lcq.pipeline.GATE_EXIT_CODE)


def prune_order(qtensors: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor],
                errors: dict[str, torch.Tensor] | None = None) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """The |q| = 1 entries of every code matrix, cheapest first: (matrix names, matrix index, flat index and cost of
    each entry). Costs in float64 on the host, ties in name then position order: the same on every rank. `errors`
    (W - W_hat by weight name) adds the cross term; without it the cost is s^2 h_jj (no Hessian: h_jj = 1)."""
    names = sorted(k[:-2] for k, t in qtensors.items() if k.endswith(".q") and t.dim() == 2)
    owner, flat, cost = [], [], []
    for i, n in enumerate(names):
        q = qtensors[n + ".q"].cpu().long()
        s = qtensors[n + ".scale"].cpu().double()[:, None]
        H = hessians[n].cpu().double() if n in hessians else None
        c = s * s * (torch.ones(q.shape[1], dtype=torch.float64) if H is None else H.diagonal())
        if errors is not None and n in errors:
            c = c + 2 * q * s * (errors[n].cpu().double() @ (H if H is not None else torch.eye(q.shape[1]).double()))
        idx = (q.abs() == 1).reshape(-1).nonzero().squeeze(1)
        owner.append(np.full(idx.numel(), i, np.int32))
        flat.append(idx.numpy())
        cost.append(c.reshape(-1)[idx].numpy())
    owner, flat, cost = (np.concatenate(a) if a else np.zeros(0) for a in (owner, flat, cost))
    order = np.argsort(cost, kind="stable")
    return names, owner[order], flat[order], cost[order]


def prune(qtensors: dict[str, torch.Tensor], order: tuple, n: int) -> dict[str, torch.Tensor]:
    """`qtensors` with the first n entries of prune_order zeroed (copies of the matrices it touches)."""
    names, owner, flat, _ = order
    out = dict(qtensors)
    for i in np.unique(owner[:n]):
        key = names[i] + ".q"
        q = qtensors[key].detach().cpu().clone()
        q.view(-1)[torch.from_numpy(flat[:n][owner[:n] == i])] = 0
        out[key] = q.to(qtensors[key].device)
    return out


def least_count(measure, over: int, target: int, most: int, guess: int,
                deadline: float = math.inf) -> tuple[int, dict[int, int]]:
    """The least n in 1..most with measure(n) <= target, given measure(0) = over > target: n fits and n - 1 does not,
    each checked by measure (the bytes are not monotone in n, so "least" is of the bracket searched). First probe at
    `guess`, then interpolation on the bracket (bisection after two moves of the same end). Raises FitError when
    measure(most) is over. Past `deadline` (time.perf_counter) it stops narrowing: n fits, n - 1 is not checked.
    Returns (n, {probed n: bytes})."""
    sizes, lo, hi, g, moved = {0: over}, 0, None, min(max(guess, 1), most), ""
    while hi is None or hi - lo > 1 and time.perf_counter() < deadline:
        if hi is not None:
            g = (lo + hi) // 2 if moved[-2:] in ("ll", "hh") else \
                lo + round((hi - lo) * (sizes[lo] - target) / max(sizes[lo] - sizes[hi], 1))
            g = min(max(g, lo + 1), hi - 1)
        sizes[g] = measure(g) if g else over
        if sizes[g] <= target:
            hi, moved = g, moved + "h"
        elif hi is None and g >= most:
            raise FitError(f"pruning {most} +-1 codes leaves {sizes[g]} model bytes, over the {target} the cap leaves: "
                           "raise FIT_MAX_FRACTION or lower MLP_MULT/MATRIX_BITS")
        elif hi is None:  # extrapolate from what is over until something fits
            lo, g = g, min(most, g + max(1, math.ceil(1.1 * (sizes[g] - target) * g / max(over - sizes[g], 1e-9))))
        else:
            lo, moved = g, moved + "l"
    return hi, sizes


def fit_to_cap(run) -> None:
    """The fit step, on the clock between GPTQ and the LoRA's room (LCQ_BYTES=auto reads the model's real bytes after
    it). Rank 0 waits for the base section (compressed on host threads since GPTQ, lcq.pipeline.start_base_section)
    unless its raw payload fits under the cap even stored; if code + model is over the cap, it zeroes the cheapest
    +-1 codes (prune_order), the count searched with the shipped compressor on every probe (least_count), and that
    job's sections are what ships. One broadcast of the count; every rank prunes the same entries. A LoRA of a fixed
    size (LCQ_RANK=n, LCQ_BYTES=n) is not made room for: its bytes are known after LCQ, at the gate."""
    cfg, log = run.cfg, run.log
    t0 = time.perf_counter()
    info = {}

    def search() -> int:
        raw = sum(t.numel() * t.element_size() for t in run.qtensors.values())
        code = len(run.script_job.result())
        target = cfg.artifact_cap_bytes - code
        # even stored it fits (brotli adds at most 4 bytes per 16 KiB; manifest, meta, section heads): no wait
        if artifact.HEADER_BYTES + raw + (raw >> 12) + 256 * len(run.qtensors) + (64 << 10) <= target:
            info["stored"] = raw
            return 0
        job = run.base_job
        over = artifact.HEADER_BYTES + sum(s.nbytes for s in job.sections())
        info.update(before=over, after=over, code=code)
        if over <= target:
            return 0
        order = prune_order(run.qtensors, run.hessians, quant_errors(run))
        meta = artifact_meta(cfg, run.bos_id, run.qmeta, None)
        comp = "brotli" if cfg.compressor == "auto" and "lzma" in job.dropped else cfg.compressor
        keep = tuple(c for c in grouping.backends() if c not in job.dropped)
        jobs, cache = {}, {}

        def measure(n: int) -> int:  # a probe recompresses only the chunks its count changed
            jobs[n] = grouping.model_job(prune(run.qtensors, order, n), meta, comp, job.threads, keep=keep,
                                         cache=cache)
            size = artifact.HEADER_BYTES + sum(s.nbytes for s in jobs[n].sections())
            log(f"fit_probe: {n} pruned -> {size} model bytes (room {target})")
            return size

        # first probe: 8 codes per byte over (a +-1 code zeroed saved 0.10-0.13 bytes on the tiny and demo models)
        # the clock: narrowing stops where LCQ_SAFETY and SERIALIZE_RESERVE begin (what fits so far ships)
        n, sizes = least_count(measure, over, target, int(cfg.fit_max_fraction * len(order[1])), 8 * (over - target),
                               t0 + run.clock_left - cfg.lcq_safety_seconds - cfg.serialize_reserve_seconds)
        run.base_job = jobs[n]
        info.update(after=sizes[n], probes=len(sizes) - 1, below=sizes.get(n - 1, "not checked (clock)"), order=order)
        return n

    mine = D.on_master(search, "fitting the model to the cap")
    n = int(D.all_reduce_max(torch.tensor(mine or 0, dtype=torch.int64, device=run.dinfo.device)).item())
    if n:
        order = info.get("order") or prune_order(run.qtensors, run.hessians, quant_errors(run))
        run.qtensors = prune(run.qtensors, order, n)
        run.gptq_state = dequantize_state(run.qtensors, run.qmeta)
        # the entries each rank zeroed, as one number: the LoRA every rank trains must sit on the codes that ship
        digest = int.from_bytes(hashlib.sha256(order[1][:n].tobytes() + order[2][:n].tobytes()).digest()[:7], "little")
        seen = D.all_reduce_max(torch.tensor([digest, -digest], dtype=torch.int64, device=run.dinfo.device)).tolist()
        if seen[0] != -seen[1]:
            raise artifact.ArtifactError("fit: the ranks pruned different entries")
        info.update(candidates=len(order[1]), cost=float(order[3][:n].sum()))
    seconds = time.perf_counter() - t0
    if "before" in info:
        log(f"fit: pruned {n} of {info.get('candidates', 0)} ±1 entries, model bytes {info['before']} -> "
            f"{info.get('after')}, estimated error cost {info.get('cost', 0.0):.6g}"
            + (f" ({info['probes']} probes; {n - 1} gave {info['below']})" if n else ""))
    elif "stored" in info:
        log(f"fit: pruned 0 of 0 ±1 entries: even uncompressed the codes fit ({info['stored']} raw bytes)")
    log.summary["fit"] = dict(pruned=n, candidates=info.get("candidates"), model_bytes_before=info.get("before"),
                              model_bytes_after=info.get("after"), error_cost=info.get("cost", 0.0),
                              probes=info.get("probes", 0), seconds=round(seconds, 3))
    run.charge("fit", seconds, pruned=n)


def quant_errors(run) -> dict[str, torch.Tensor]:
    """W - W_hat of every quantized matrix, from the float model and the GPTQ weights."""
    state = run.model.state_dict()
    return {n: state[n].detach().float() - w.float() for n, w in run.gptq_state.items() if n in state and w.dim() == 2}
