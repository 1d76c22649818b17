"""Score-first test-time training (TTT) at eval, started from what the artifact ships.

The records' eval (PRs #1626 -> #1736 -> #1855, docs/ttt.md) adapts a per-document LoRA while it scores, plus optional
global SGD phases on the base weights. Here, per document (inputs from its BOS up to the next BOS, which is its last
target, exactly as lcq/evaluate.py defines the targets):

1. Chunks: the document's sliding windows (lcq.evaluate.plan_doc; the pipeline passes stride = TTT_CHUNK_TOKENS, so a
   chunk is scored from its own document's last `window` tokens, #1855's rule) with their scored targets cut into
   pieces of at most TTT_CHUNK_TOKENS. Each chunk is scored first with the adapter as it stands; its nll and bytes are
   added at that moment.
2. Only then does the adapter take TTT_STEPS Adam steps on that chunk's targets (the first one reuses the scoring
   forward's loss). The last chunk of a document takes none: the adapter resets before anything could use it.
3. At every document start the adapter and its optimizer state reset to the start point: the LoRA shipped in the
   artifact (TTT_INIT=artifact) or a fresh adapter with B = 0 (TTT_INIT=zero). TTT_BATCH_DOCS documents run side by
   side, each with its own adapter (lcq/ttt_lora.py); a document's scores do not depend on which others share its batch.
4. With TTT_PHASES > 0, after the first documents (in scoring order: longest first) up to each phase boundary are
   scored, the base weights take SGD steps over all of them (gradients all-reduced over ranks), then scoring goes on.

Compliance (issue #1017's conditions): C1 the start point comes from the artifact (or zero) and the seed, never from a
training process; C3 a target's nll is fixed before any update that has seen it; C4 one left-to-right pass, nothing is
rescored. Ranks split the batches of each phase segment by estimated cost; the sums are all-reduced like the sliding
eval's.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import artifact
from . import dist as D
from .config import Config, replace
from .evaluate import EvalResult, Scored, ValStream, _batches, document_spans, finish_scores, forward_rows, plan_doc
from .lora import DEFAULT_TARGETS, LoRALinear, attach_lora, lora_modules, lora_parameters, match_targets, merge_lora
from .kvcache import KVCache
from .model import Attention, autocast_for
from .ngram import Tilt
from .shipping import apply_lora, load_shipped
from .tokenizer import token_bytes
from .ttt_lora import SlotAdapters


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
    batch_docs: int = 1
    eps: float = 1e-8
    warm_start_a: bool = False
    phase_momentum: float = 0.0
    phase_clip: float = 0.0
    phase_cosine: bool = False
    phase_tokens: int = 0
    context: str = "recompute"


def spec_from_config(cfg: Config) -> TTTSpec:
    """Each field from its TTT_ knob (TTTSpec.x is Config.ttt_x)."""
    return TTTSpec(**{f.name: getattr(cfg, f"ttt_{f.name}") for f in fields(TTTSpec)})


def stage_name(artifact_has_lora: bool) -> str:
    """The TTT stage is named after the as-shipped stage it starts from (what --eval_only calls it too)."""
    return "quantized_lcq_ttt" if artifact_has_lora else "quantized_ttt"


def resolve_init(cfg: Config, lora_meta: dict | None) -> str:
    """artifact or zero. A start from the artifact needs LoRA factors in it (side or fused; a baked LoRA ships none)."""
    if cfg.ttt_init == "auto":
        return "artifact" if lora_meta else "zero"
    if cfg.ttt_init == "artifact" and not lora_meta:
        raise ValueError("TTT_INIT=artifact: the artifact ships no LoRA. Fix: TTT_INIT=zero or auto")
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
            raise ValueError("TTT_INIT=artifact: the model ships no LoRA")
    else:
        merge_lora(model)
    names = adapter_names(model, cfg)
    if names:
        torch.manual_seed(cfg.seed)
        attach_lora(model, names, cfg.ttt_rank, cfg.ttt_alpha or cfg.lcq_alpha)
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
    """Scoring-order document counts after which a global phase runs (every document before it is scored by then)."""
    if not spec.phases:
        return []
    bounds = [min(n_docs, round(spec.phase_docs * (i + 1) / spec.phases)) for i in range(spec.phases)]
    return sorted({b for b in bounds if 0 < b < n_docs})


def doc_chunks(first: int, end: int, window: int, stride: int, chunk: int) -> np.ndarray:
    """A document's chunks as rows (begin, end, score_from), one forward each: every sliding window's scored targets
    (lcq.evaluate.plan_doc) cut into pieces of at most `chunk`, each read from the window's begin up to the piece's end
    (causal attention: cutting a window at its end changes none of the kept logits)."""
    out = []
    for b, e, f in plan_doc(first, end, window, stride).tolist():
        out += [(b, min(lo + chunk, e), lo) for lo in range(f, e, chunk)]
    return np.array(out, dtype=np.int64).reshape(-1, 3)


def bucket(n: int, window: int) -> int:
    """The padded row length of a chunk forward: a power of two up to window/8, then a multiple of window/8, so a whole
    eval runs about a dozen shapes (one compiled graph each) and pads a long row by at most an eighth of the window."""
    step = max(16, window // 8)
    b = max(16, 1 << (max(n, 1) - 1).bit_length()) if n <= step else -(-n // step) * step
    return min(b, window)


def buckets(window: int) -> list[int]:
    return sorted({bucket(n, window) for n in range(1, window + 1)})


def batch_cost(plans: list[np.ndarray], slots: int, window: int, reuse: bool = False) -> int:
    """Forward tokens of one batch (padding included): the work split's estimate of its time. reuse: only the chunks'
    new tokens run (TTT_CONTEXT=reuse)."""
    lens = [p[:, 1] - p[:, 2 if reuse else 0] for p in plans]
    return sum(slots * bucket(int(max(x[k] for x in lens if k < len(x))), window)
               for k in range(max(len(x) for x in lens)))


def split_batches(costs: list[int], world: int) -> list[int]:
    """Owner rank of each batch: longest first to the least loaded rank (ties to the lower rank, then the earlier
    batch). Deterministic from the costs and the world size alone, so every rank of every node computes the same split
    and an --eval_only on the same number of ranks scores each document on the same rank."""
    load, owner = [0] * world, [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i], load[r] = r, load[r] + costs[i]
    return owner


def make_cache(model: nn.Module, spec: TTTSpec, window: int, device: torch.device) -> KVCache | None:
    """TTT_CONTEXT=reuse's cache for TTT_BATCH_DOCS slots over `window` tokens, in the attention's dtype; else None."""
    if spec.context != "reuse":
        return None
    att = next(m for m in model.modules() if isinstance(m, Attention))
    bf16 = device.type == "cuda" or getattr(model, "autocast_cpu_bf16", False)
    return KVCache(model.rotary, len(model.layer_order()), spec.batch_docs, window, att.num_kv_heads, att.head_dim,
                   device, torch.bfloat16 if bf16 else torch.float32)


def ttt_forward(model: nn.Module, device: torch.device, backend: str | None = None):
    """The chunk forward: compiled with static shapes (dynamic=False; one graph per (slots, bucket) shape) when the
    model's compile_eval is set or a backend is given, eager otherwise; under autocast as the sliding eval."""
    backend = backend or getattr(model, "compile_eval", False)
    if backend:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    fwd = torch.compile(model, dynamic=False, backend=backend) if backend else model
    autocast = autocast_for(device, getattr(model, "autocast_cpu_bf16", False))

    def forward(x, cu, max_seqlen, kv=None):
        with autocast:
            return fwd(x, cu, max_seqlen, kv)
    return forward


def warm_up(fwd, ad: SlotAdapters, window: int, vocab: int, device: torch.device, learn: bool,
            kv: KVCache | None = None, chunk: int = 0) -> int:
    """Compile every chunk shape on synthetic tokens (never val tokens) before the eval clock; the adapters take no step
    and their gradients are dropped, so the start point is unchanged (a cache is emptied after). Returns the number of
    shapes: with a cache, the new-token rows of up to `chunk` tokens, each as a scoring and as a training forward."""
    shapes = buckets(window) if kv is None else sorted({bucket(n, window) for n in range(1, chunk + 1)})
    for L in shapes:
        x = torch.randint(0, vocab, (ad.slots * L,), device=device)
        cu = torch.arange(0, ad.slots * L + 1, L, dtype=torch.int32, device=device)
        if kv is not None:
            kv.plan(np.tile([0, L, 0], (ad.slots, 1)), x, L)
        for write in (True, False) if kv is not None and learn else (True,):
            if kv is not None:
                kv.write = write
            with torch.set_grad_enabled(learn):
                loss = fwd(x, cu, L, kv).float().logsumexp(-1).mean()
            if learn:
                loss.backward()
            for p in ad.params:
                p.grad = None
    if kv is not None:
        kv.reset()
    return len(shapes)


def synthetic_stream(val: ValStream, window: int, vocab: int) -> tuple[ValStream, np.ndarray]:
    """4 documents of `window` random tokens and their spans, for a warm-up phase step (at lr 0: no weight moves)."""
    toks = np.random.default_rng(0).integers(0, vocab, 4 * window + 1)
    toks[::window] = val.bos_id
    syn = ValStream(toks, val.bos_id, val.tables, val.device)
    return syn, document_spans(syn.starts, syn.n)


def adapt_batch(fwd, ad: SlotAdapters, val: ValStream, plans: list[np.ndarray], spec: TTTSpec, window: int,
                out: Scored, kv: KVCache | None = None) -> None:
    """Score a batch of documents chunk by chunk, slot s holding document s, and step each slot's adapter after its
    chunk is scored. Chunk k of every document runs as one [slots, L] forward: rows are padded at their end (causal:
    nothing real reads a pad) and each row is its own segment. Pads, empty slots and finished documents are masked out
    of the scores and the loss, and a slot only steps when its own document learns, so no document reads another.
    With a KV cache (TTT_CONTEXT=reuse) a row holds only the chunk's new tokens; the rest of its window is read from
    the cache, written by the scoring forward and read detached by the training steps."""
    S, dev = ad.slots, val.device
    n = np.array([len(p) for p in plans] + [0] * (S - len(plans)))
    ad.reset(spec.warm_start_a)
    if kv is not None:
        kv.reset()
    for k in range(int(n.max())):
        rows = np.array([p[k] if k < len(p) else (0, 0, 0) for p in plans] + [(0, 0, 0)] * (S - len(plans)))
        first = rows[:, 2 if kv is not None else 0]  # the row's first input token
        L = bucket(int((rows[:, 1] - first).max()), window)
        off = np.arange(L)
        idx = first[:, None] + off
        real = off < (rows[:, 1] - first)[:, None]
        keep = real & (idx >= rows[:, 2:])
        learn = (spec.steps > 0) & (k + 1 < n)  # a document's last chunk takes no step: its slot resets next
        w = keep * learn[:, None] / np.maximum(keep.sum(1, keepdims=True), 1)  # each document's mean chunk loss
        idx_t = torch.from_numpy(np.where(real, idx, 0).ravel()).to(dev)
        kept = torch.from_numpy(np.flatnonzero(keep)).to(dev)
        x, y = val.tokens[idx_t], val.tokens[idx_t + 1]
        pos = idx_t[kept] + 1
        nbytes = val.val_bytes[pos] if val.val_bytes is not None else token_bytes(y[kept], x[kept], val.tables)
        cu = torch.arange(0, S * L + 1, L, dtype=torch.int32, device=dev)
        w_t = torch.from_numpy(w.ravel().astype(np.float32)).to(dev)
        learn_t = torch.from_numpy(learn)
        if kv is not None:
            kv.plan(rows, val.tokens, L)
        for step in range(spec.steps if learn.any() else 1):
            with torch.set_grad_enabled(spec.steps > 0):  # one graph per shape: the last chunks run it too
                logits = fwd(x, cu, L, kv)
                nll = F.cross_entropy(logits.float(), y, reduction="none")
            if kv is not None:
                kv.write = False  # the chunk's training steps re-read the cache its scoring forward wrote
            if step == 0:  # the score is fixed here, before any update sees it (C3); tilted if asked, trained untilted
                score = nll.detach() if val.tilt is None else val.tilt.nll(nll.detach(), logits.detach(), y, idx_t + 1)
                out.add(pos, score[kept], nbytes)
            if learn.any():
                (nll * w_t).sum().backward()
                ad.step(learn_t)


def global_phase(model: nn.Module, val: ValStream, spans: np.ndarray, window: int, spec: TTTSpec, step_tokens: int,
                 dinfo: D.DistInfo) -> int:
    """SGD on the base weights over every document scored so far (#1855): their non-overlapping windows, each its own
    segment, packed into steps of `step_tokens` over all ranks (rank r takes rows r, r + world, ...: the same steps
    whatever TTT_BATCH_DOCS or the rank that scored them); momentum, cosine lr, gradients summed over ranks and clipped."""
    rows = [plan_doc(s, e, window, window) for s, e in spans.tolist()]
    rows = np.concatenate(rows) if rows else np.zeros((0, 3), dtype=np.int64)
    steps = list(_batches(rows, step_tokens)) if len(rows) else []
    base = [p for n, p in model.named_parameters() if ".lora_" not in n and p.is_floating_point()]
    model.requires_grad_(False)
    for p in base:
        p.requires_grad_(True)
    opt = torch.optim.SGD(base, lr=spec.phase_lr, momentum=spec.phase_momentum)
    for i, batch in enumerate(steps):
        if spec.phase_cosine:
            opt.param_groups[0]["lr"] = spec.phase_lr * 0.5 * (1 + math.cos(math.pi * i / len(steps)))
        mine = batch[dinfo.rank::dinfo.world_size]
        total = forward_rows(model, val, mine, scored=False)[1].sum() if len(mine) else sum(p.sum() * 0.0 for p in base)
        (total / float((batch[:, 1] - batch[:, 0]).sum())).backward()
        for p in base:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            D.all_reduce_sum(p.grad)
        if spec.phase_clip:
            torch.nn.utils.clip_grad_norm_(base, spec.phase_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.requires_grad_(False)
    return len(steps)


def schedule(val: ValStream, window: int, stride: int, spec: TTTSpec, world: int):
    """evaluate_ttt's plan, the same on every rank: (spans of the documents with a target, scoring order (longest
    first, then index), chunk plans, per phase segment (end, batches of TTT_BATCH_DOCS documents, owner rank of each))."""
    spans = document_spans(val.starts, val.n)
    spans = spans[spans[:, 1] > spans[:, 0]]  # documents with at least one target (an empty last BOS has none)
    order = np.lexsort((np.arange(len(spans)), spans[:, 0] - spans[:, 1]))
    plans = [doc_chunks(s, e, window, stride, spec.chunk_tokens) for s, e in spans.tolist()]
    S, edges, segs = spec.batch_docs, [0, *phase_bounds(len(spans), spec), len(spans)], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        batches = [order[i:min(i + S, hi)] for i in range(lo, hi, S)]  # never straddling a phase boundary
        costs = [batch_cost([plans[d] for d in b], S, window, spec.context == "reuse") for b in batches]
        segs.append((hi, batches, split_batches(costs, world)))
    return spans, order, plans, segs


def evaluate_ttt(model: nn.Module, val_tokens: np.ndarray, bos_id: int, tables, window: int, stride: int,
                 batch_tokens: int, dinfo: D.DistInfo, spec: TTTSpec, val_bytes: np.ndarray | None = None,
                 dump: str | None = None, log=None, backend: str | None = None, tilt: Tilt | None = None) -> EvalResult:
    """Score the val stream with score-first TTT. `model` carries its adapter at the start point (prepare_adapter); its
    base weights are trained in place by the phases, so pass a fresh copy. Documents are scored in `schedule`'s order,
    TTT_BATCH_DOCS at a time per rank. The compile warm-up runs before the clock this result's seconds start from.
    `tilt` (lcq/ngram.py) tilts every score, never the loss the adapters and phases train on (#2135)."""
    model.eval()  # no dropout in the GPT; eval mode only fixes the module flags
    val = ValStream(val_tokens, bos_id, tables, dinfo.device, val_bytes, tilt)
    spans, order, plans, segs = schedule(val, window, stride, spec, dinfo.world_size)
    ad = SlotAdapters(model, spec.batch_docs, spec.lr, (spec.beta1, spec.beta2), spec.eps, spec.weight_decay)
    fwd = ttt_forward(model, dinfo.device, backend)
    kv = make_cache(model, spec, window, dinfo.device)
    if backend or getattr(model, "compile_eval", False):
        tw = time.perf_counter()
        shapes = warm_up(fwd, ad, window, model.tok_emb.num_embeddings, dinfo.device, spec.steps > 0, kv,
                         spec.chunk_tokens)
        if len(segs) > 1:  # the phases' graph (issue 27)
            ad.install(back=True)
            global_phase(model, *synthetic_stream(val, window, model.tok_emb.num_embeddings), window,
                         replace(spec, phase_lr=0.0), spec.phase_tokens or batch_tokens, dinfo)
            ad.install()
        D.sync(dinfo.device)
        if log is not None:
            log(f"ttt_warmup: {shapes} shapes {time.perf_counter() - tw:.2f}s (synthetic tokens, before the eval clock)")
    D.sync(dinfo.device)
    t0 = time.perf_counter()
    scored = Scored.empty()
    for i, (hi, batches, owner) in enumerate(segs):
        for b, r in zip(batches, owner):
            if r == dinfo.rank:
                adapt_batch(fwd, ad, val, [plans[d] for d in b], spec, window, scored, kv)
        if hi < len(spans):  # a phase boundary
            ad.install(back=True)
            steps = global_phase(model, val, spans[order[:hi]], window, spec, spec.phase_tokens or batch_tokens, dinfo)
            ad.install()
            ad.reset()  # fresh adapters after a phase (A too)
            if log is not None:
                log(f"ttt_phase:{i + 1}/{len(segs) - 1} docs_scored:{hi} sgd_steps:{steps} "
                    f"elapsed:{time.perf_counter() - t0:.2f}s")
    ad.install(back=True)
    return finish_scores(scored, val, dinfo, t0, dump)
