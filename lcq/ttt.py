"""Score-first test-time training (TTT) at eval, started from what the artifact ships.

The records' eval (PRs #1626 -> #1736 -> #1855, DESIGN.md) adapts a per-document LoRA while it scores, plus optional
global SGD phases on the base weights. Here, per document (inputs from its BOS up to the next BOS, which is its last
target, exactly as lcq/evaluate.py defines the targets):

1. The document's sliding windows (the README's window/stride rule, lcq.evaluate.plan_doc) are cut into chunks of
   TTT_CHUNK_TOKENS targets. Each chunk is scored first, through the same forward as the sliding eval, with the adapter
   as it stands; its nll and bytes are added at that moment.
2. Only then does the adapter take TTT_STEPS Adam steps on that chunk's targets (the first one reuses the scoring
   forward's loss). The last chunk of a document takes none: the adapter resets before anything could use it.
3. At every document start the adapter and its optimizer state reset to the start point: the LoRA shipped in the
   artifact (TTT_INIT=artifact) or a fresh adapter with B = 0 (TTT_INIT=zero).
4. With TTT_PHASES > 0, after the documents before each phase boundary are scored, the base weights take SGD steps
   over the documents scored since the previous boundary (gradients all-reduced over ranks), then scoring goes on.

Compliance (issue #1017's conditions): C1 the start point comes from the artifact (or zero) and the seed, never from a
training process; C3 a target's nll is fixed before any update that has seen it; C4 one left-to-right pass, nothing is
rescored. Ranks split the documents of each phase segment; the sums are all-reduced like the sliding eval's.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from . import artifact
from . import dist as D
from .config import Config, replace
from .evaluate import (EvalResult, Scored, ValStream, _batches, document_spans, finish_scores, forward_rows, plan_doc,
                       score_rows)
from .lora import (DEFAULT_TARGETS, LoRALinear, attach_lora, load_lora_state, lora_modules, lora_parameters, lora_state,
                   match_targets, merge_lora)
from .shipping import apply_lora, load_shipped


@dataclass(frozen=True)
class TTTSpec:
    chunk_tokens: int
    steps: int
    lr: float
    beta1: float
    beta2: float
    weight_decay: float
    phases: int
    phase_docs: int
    phase_lr: float


def spec_from_config(cfg: Config) -> TTTSpec:
    return TTTSpec(chunk_tokens=cfg.ttt_chunk_tokens, steps=cfg.ttt_steps, lr=cfg.ttt_lr, beta1=cfg.ttt_beta1,
                   beta2=cfg.ttt_beta2, weight_decay=cfg.ttt_weight_decay, phases=cfg.ttt_phases,
                   phase_docs=cfg.ttt_phase_docs, phase_lr=cfg.ttt_phase_lr)


def stage_name(artifact_has_lora: bool) -> str:
    """The TTT stage is named after the as-shipped stage it starts from (what --eval_only calls it too)."""
    return "quantized_lcq_ttt" if artifact_has_lora else "quantized_ttt"


def resolve_init(cfg: Config, lora_meta: dict | None) -> str:
    """artifact or zero. A start from the artifact needs LoRA factors in it (side or fused; a baked LoRA ships none)."""
    if cfg.ttt_init == "auto":
        return "artifact" if lora_meta else "zero"
    if cfg.ttt_init == "artifact" and not lora_meta:
        raise ValueError("TTT_INIT=artifact: the artifact carries no LoRA factors (LCQ off, or LCQ_MERGE=baked); ship "
                         "one with LCQ_MERGE=side or fused, or set TTT_INIT=zero (or auto)")
    return cfg.ttt_init


def zero_targets(cfg: Config) -> list[str]:
    patterns = [p.strip() for p in cfg.ttt_targets.split(",") if p.strip()]
    return patterns or [*DEFAULT_TARGETS, "lm_head"]


def adapter_names(model: nn.Module, cfg: Config) -> list[str]:
    """The linear layers TTT_TARGETS names that no LoRA wraps yet."""
    try:
        names = match_targets(model, zero_targets(cfg))
    except ValueError as e:
        raise ValueError(f"TTT_TARGETS: {e}") from None
    mods = dict(model.named_modules())
    wrapped = list(lora_modules(model))
    return [n for n in names if type(mods[n]) is not LoRALinear and not any(n.startswith(w + ".") for w in wrapped)]


def prepare_adapter(model: nn.Module, init: str, cfg: Config) -> nn.Module:
    """Give `model` the trainable adapter TTT starts from.

    artifact: `model` carries the shipped factors as LoRA wrappers and TTT trains them; the TTT_TARGETS they do not
    cover (lm_head by default: LCQ leaves it out) get zero-started rank-TTT_RANK adapters, so the two starts differ in
    where they start, not in what they can adapt. zero: any wrappers are folded into the weights (the shipped LoRA stays
    part of the model), then a fresh rank-TTT_RANK adapter on every TTT_TARGETS layer. Zero starts have B = 0 and A drawn
    from SEED, so every rank and every re-run starts from the same point."""
    if init == "artifact":
        if not lora_modules(model):
            raise ValueError("TTT_INIT=artifact: the model carries no LoRA factors to start from")
    else:
        merge_lora(model)
    names = adapter_names(model, cfg)
    if names:
        torch.manual_seed(cfg.seed)
        attach_lora(model, names, cfg.ttt_rank, cfg.lcq_alpha)
    model.requires_grad_(False)
    for p in lora_parameters(model):
        p.requires_grad_(True)
    return model


def load_for_ttt(path: str, cfg: Config, device: torch.device, init: str | None = None) -> tuple[nn.Module, dict, str]:
    """Decode the artifact into a fresh model holding the adapter TTT starts from: (model, meta, init used).
    load_shipped folds a LoRA into the weights, so the factors are re-attached here as wrappers to be trained."""
    model, meta, model_cfg = load_shipped(path, cfg, device, with_lora=False)
    lora = meta.get("lora")
    init = resolve_init(replace(cfg, ttt_init=init) if init else cfg, lora)
    if lora:
        tensors, _ = artifact.load(path)
        apply_lora(model, tensors, lora)
    return prepare_adapter(model, init, replace(model_cfg, seed=cfg.seed)), meta, init


def phase_bounds(n_docs: int, spec: TTTSpec) -> list[int]:
    """Document indices where a global phase runs (after every document before it is scored)."""
    if not spec.phases:
        return []
    bounds = [min(n_docs, round(spec.phase_docs * (i + 1) / spec.phases)) for i in range(spec.phases)]
    return sorted({b for b in bounds if 0 < b < n_docs})


def chunk_rows(rows: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """The sliding windows' rows restricted to targets whose input positions lie in [lo, hi): each window is cut at hi
    (causal attention: the kept logits do not depend on what is cut) and scores from max(score_from, lo)."""
    out = [(b, min(e, hi), max(f, lo)) for b, e, f in rows.tolist() if max(f, lo) < min(e, hi)]
    return np.array(out, dtype=np.int64).reshape(-1, 3)


def adapt_document(model: nn.Module, val: ValStream, first: int, end: int, window: int, stride: int, batch_tokens: int,
                   spec: TTTSpec, start: dict[str, torch.Tensor], out: Scored) -> None:
    """Score one document chunk by chunk, stepping the adapter after each chunk is scored; reset it first."""
    load_lora_state(model, start)
    params = lora_parameters(model)
    opt = torch.optim.AdamW(params, lr=spec.lr, betas=(spec.beta1, spec.beta2), weight_decay=spec.weight_decay)
    rows = plan_doc(first, end, window, stride)
    lows = list(range(first, end, spec.chunk_tokens))
    for k, lo in enumerate(lows):
        sub = chunk_rows(rows, lo, min(lo + spec.chunk_tokens, end))
        learn = spec.steps > 0 and k + 1 < len(lows)  # no step after the document's last chunk: it resets next
        if not learn:
            score_rows(model, val, sub, batch_tokens, out)
            continue
        for step in range(spec.steps):
            losses, count = [], 0
            for batch in _batches(sub, batch_tokens):
                pos, nll, nbytes = forward_rows(model, val, batch)
                if step == 0:
                    out.add(pos, nll.detach(), nbytes)  # the score is fixed here, before any update sees it (C3)
                losses.append(nll.sum())
                count += nll.numel()
            (torch.stack(losses).sum() / count).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)


def global_phase(model: nn.Module, val: ValStream, spans: np.ndarray, window: int, batch_tokens: int, lr: float,
                 dinfo: D.DistInfo) -> int:
    """SGD on the base weights over already-scored documents (this rank's share), non-overlapping windows of each, one
    step per batch; gradients and token counts summed over ranks (every rank takes the same number of steps)."""
    rows = [plan_doc(s, e, window, window) for s, e in spans.tolist()]
    rows = np.concatenate(rows) if rows else np.zeros((0, 3), dtype=np.int64)
    batches = list(_batches(rows, batch_tokens)) if len(rows) else []
    n_steps = int(D.all_reduce_max(torch.tensor(len(batches), device=val.device)).item())
    base = [p for n, p in model.named_parameters() if ".lora_" not in n and p.is_floating_point()]
    adapter = lora_parameters(model)
    model.requires_grad_(False)
    for p in base:
        p.requires_grad_(True)
    opt = torch.optim.SGD(base, lr=lr)
    for i in range(n_steps):
        if i < len(batches):
            _, nll, _ = forward_rows(model, val, batches[i])
            count = torch.tensor(float(nll.numel()), device=val.device)
            total = nll.sum()
        else:
            count = torch.zeros((), device=val.device)
            total = sum(p.sum() * 0.0 for p in base)  # no batch left here: a zero gradient, same all-reduces
        D.all_reduce_sum(count)
        (total / count.clamp_min(1.0)).backward()
        for p in base:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            D.all_reduce_sum(p.grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.requires_grad_(False)
    for p in adapter:
        p.requires_grad_(True)
    return n_steps


def evaluate_ttt(model: nn.Module, val_tokens: np.ndarray, bos_id: int, tables, window: int, stride: int,
                 batch_tokens: int, dinfo: D.DistInfo, spec: TTTSpec, val_bytes: np.ndarray | None = None,
                 dump: str | None = None, log=None) -> EvalResult:
    """Score the val stream with score-first TTT. `model` carries its adapter at the start point (prepare_adapter); it
    is trained in place (its base weights too, with phases), so pass a fresh copy."""
    D.sync(dinfo.device)
    t0 = time.perf_counter()
    model.eval()  # no dropout in the GPT; eval mode only fixes the module flags
    val = ValStream(val_tokens, bos_id, tables, dinfo.device, val_bytes)
    spans = document_spans(val.starts, val.n)
    spans = spans[spans[:, 1] > spans[:, 0]]  # documents with at least one target (an empty last BOS has none)
    start = lora_state(model)
    scored = Scored.empty()
    bounds = phase_bounds(len(spans), spec)
    edges = [0, *bounds, len(spans)]
    for lo, hi in zip(edges[:-1], edges[1:]):
        mine = spans[lo:hi][dinfo.rank::dinfo.world_size]  # ranks split the documents of each segment
        for first, end in mine.tolist():
            adapt_document(model, val, first, end, window, stride, batch_tokens, spec, start, scored)
        if hi in bounds:
            load_lora_state(model, start)
            steps = global_phase(model, val, mine, window, batch_tokens, spec.phase_lr, dinfo)
            if log is not None:
                log(f"ttt_phase:{bounds.index(hi) + 1}/{len(bounds)} docs_scored:{hi} sgd_steps:{steps} "
                    f"elapsed:{time.perf_counter() - t0:.2f}s")
    load_lora_state(model, start)
    return finish_scores(scored, val, dinfo, t0, dump)
