"""Sliding-window bits-per-byte evaluation that never lets a document see another.

Scored tokens: every token of a document except its first (the BOS, or the first token of a leading fragment before the
first BOS) is a target exactly once. Its context is the longest the window scheme allows inside its own document: the
first `window` targets of a document are scored from the document start; after that each window moves by `stride` and
scores only its last `stride` targets, so every later target sees between window - stride + 1 and window tokens (itself
included) of its own document. With stride == window this is plain non-overlapping evaluation.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import dist as D
from .data import doc_starts
from .tokenizer import token_bytes


@dataclass(frozen=True)
class EvalResult:
    val_loss: float
    val_bpb: float
    tokens: int
    bytes: int
    seconds: float


def plan_windows(starts: np.ndarray, n_tokens: int, window: int, stride: int) -> np.ndarray:
    """Windows as rows (begin, end, score_from) in token offsets: the model reads tokens[begin:end] and predicts
    tokens[begin+1:end+1]; the predictions for input positions [score_from, end) are scored."""
    if not 1 <= stride <= window:
        raise ValueError(f"eval stride {stride} must be in [1, window={window}]")
    ends_all = np.append(starts[1:], n_tokens)
    rows = []
    for s, e in zip(starts.tolist(), ends_all.tolist()):
        n = e - s - 1  # targets in this document
        if n <= 0:
            continue
        if n <= window:
            rows.append(np.array([[s, s + n, s]], dtype=np.int64))
            continue
        # Window k reads [k*stride, k*stride + window) (clipped to the document) and scores what the previous window did
        # not: with stride == window this is exactly plain non-overlapping evaluation.
        count = 1 + -(-(n - window) // stride)
        begins = np.arange(count, dtype=np.int64) * stride
        ends = np.minimum(begins + window, n)
        score_from = np.concatenate([[0], ends[:-1]])
        rows.append(np.stack([s + begins, s + ends, s + score_from], axis=1))
    return np.concatenate(rows) if rows else np.zeros((0, 3), dtype=np.int64)


def _batches(windows: np.ndarray, max_tokens: int):
    """Greedily pack consecutive windows into batches of at most max_tokens input tokens."""
    batch, used = [], 0
    for row in windows:
        length = int(row[1] - row[0])
        if batch and used + length > max_tokens:
            yield np.stack(batch)
            batch, used = [], 0
        batch.append(row)
        used += length
    if batch:
        yield np.stack(batch)


@torch.no_grad()
def evaluate(model: torch.nn.Module, val_tokens: np.ndarray, bos_id: int, tables, window: int, stride: int,
             batch_tokens: int, dinfo: D.DistInfo) -> EvalResult:
    """Score the val tokens with `model` (whatever it holds: float, dequantized, LoRA-wrapped). Ranks split the windows;
    sums are all-reduced in float64 so the result does not depend on the number of ranks beyond float rounding."""
    D.sync(dinfo.device)
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    device = dinfo.device
    windows = plan_windows(doc_starts(val_tokens, bos_id), val_tokens.size, window, stride)
    mine = windows[dinfo.rank::dinfo.world_size]
    tokens_t = torch.from_numpy(val_tokens.astype(np.int64))
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    n_scored = torch.zeros((), dtype=torch.float64, device=device)
    n_bytes = torch.zeros((), dtype=torch.float64, device=device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext())
    for batch in _batches(mine, batch_tokens):
        lengths = batch[:, 1] - batch[:, 0]
        idx = np.concatenate([np.arange(b, e) for b, e, _ in batch])
        score = np.concatenate([np.arange(b, e) >= f for b, e, f in batch])
        x = tokens_t[idx].to(device)
        y = tokens_t[idx + 1].to(device)
        keep = torch.from_numpy(score).to(device)
        cu = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)).to(device)
        with autocast:
            logits = model(x, cu, int(lengths.max()))
        nll = F.cross_entropy(logits.float(), y, reduction="none")
        nll_sum += nll[keep].double().sum()
        n_scored += keep.sum().double()
        n_bytes += token_bytes(y[keep], x[keep], tables).double().sum()
    stats = torch.stack([nll_sum, n_scored, n_bytes])
    D.all_reduce_sum(stats)
    nll_total, tokens, nbytes = (float(v) for v in stats.tolist())
    model.train(was_training)
    D.sync(device)
    if tokens == 0 or nbytes == 0:
        raise ValueError("evaluation scored no tokens: the val split is empty or holds only document starts")
    val_loss = nll_total / tokens
    val_bpb = nll_total / math.log(2) / nbytes
    return EvalResult(val_loss=val_loss, val_bpb=val_bpb, tokens=int(tokens), bytes=int(nbytes),
                      seconds=time.perf_counter() - t0)
