"""Sliding-window bits-per-byte evaluation that never lets a document see another.

Scored tokens (the leaderboard's convention, docs/scoring.md): every token of the val stream except its very first is a target
exactly once. Document d (from its BOS up to the next BOS) predicts its own tokens after the first and, as its last
target, the BOS that opens document d+1: that BOS is predicted from document d's tokens only, so no document ever reads
another (the records' `eval_val` counts every `y`; their TTT split extends each document by one token for the same BOS).
A BOS is worth 0 bytes but its loss counts. Context: the first `window` targets of a document are scored from the
document start; after that each window moves by `stride` and scores only its last `stride` targets, so every later target
sees between window - stride + 1 and window tokens (itself excluded, the token before it included) of its own document.
With stride == window this is plain non-overlapping evaluation.

`score_rows` is the one scoring loop: lcq/ttt.py scores its chunks through it, so both evals share the targets, the
contexts and the byte rule. With a Tilt (lcq/ngram.py) on the ValStream, every scored nll is the tilted one.
"""
from __future__ import annotations

import io
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import dist as D
from .data import doc_starts
from .model import eval_forward
from .ngram import Tilt
from .files import atomic_write
from .tokenizer import token_bytes


@dataclass(frozen=True)
class EvalResult:
    val_loss: float
    val_bpb: float
    tokens: int
    bytes: int
    seconds: float


def document_spans(starts: np.ndarray, n_tokens: int) -> np.ndarray:
    """Per document, (first input, end) in stream offsets: it reads tokens[first:end] and predicts tokens[first+1:end+1],
    so its last target is the next document's BOS (the stream's last token for the last document)."""
    ends = np.append(starts[1:], max(n_tokens - 1, 0)).astype(np.int64)
    return np.stack([starts.astype(np.int64), ends], axis=1) if starts.size else np.zeros((0, 2), dtype=np.int64)


def target_docs(starts: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Document index of each target position: the document whose tokens predict it (a BOS belongs to the one before)."""
    return (np.searchsorted(starts, np.asarray(positions) - 1, side="right") - 1).astype(np.int64)


def plan_doc(first: int, end: int, window: int, stride: int) -> np.ndarray:
    """Windows (begin, end, score_from) of one document whose inputs are tokens[first:end] (see plan_windows)."""
    n = end - first  # targets of this document
    if n <= 0:
        return np.zeros((0, 3), dtype=np.int64)
    if n <= window:
        return np.array([[first, end, first]], dtype=np.int64)
    # Window k reads [k*stride, k*stride + window) (clipped to the document) and scores what the previous window did not:
    # with stride == window this is exactly plain non-overlapping evaluation.
    count = 1 + -(-(n - window) // stride)
    begins = np.arange(count, dtype=np.int64) * stride
    ends = np.minimum(begins + window, n)
    score_from = np.concatenate([[0], ends[:-1]])
    return np.stack([first + begins, first + ends, first + score_from], axis=1)


def plan_windows(starts: np.ndarray, n_tokens: int, window: int, stride: int) -> np.ndarray:
    """Windows as rows (begin, end, score_from) in token offsets: the model reads tokens[begin:end] and predicts
    tokens[begin+1:end+1]; the predictions for input positions [score_from, end) are scored."""
    if not 1 <= stride <= window:
        raise ValueError(f"eval stride {stride} must be in [1, window={window}]")
    rows = [plan_doc(s, e, window, stride) for s, e in document_spans(starts, n_tokens).tolist()]
    rows = [r for r in rows if r.size]
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


class ValStream:
    """The val tokens on the device plus what scoring needs with them: BOS, document starts, byte tables and the optional
    per-target byte array (a sidecar, e.g. CaseOps data: bytes of token i when it is a target; it overrides the tables)."""

    def __init__(self, val_tokens: np.ndarray, bos_id: int, tables, device: torch.device,
                 val_bytes: np.ndarray | None = None, tilt: Tilt | None = None):
        if val_bytes is not None and np.asarray(val_bytes).shape != val_tokens.shape:
            raise ValueError(f"val_bytes has shape {np.asarray(val_bytes).shape} but the val tokens {val_tokens.shape}; "
                             "the byte sidecar must hold one entry per val token")
        self.np = val_tokens
        self.n = int(val_tokens.size)
        self.bos_id = bos_id
        self.starts = doc_starts(val_tokens, bos_id)
        self.tokens = torch.from_numpy(val_tokens.astype(np.int64)).to(device)
        self.tables = tables
        self.val_bytes = None if val_bytes is None else torch.from_numpy(np.asarray(val_bytes).astype(np.int64)).to(device)
        self.device = device
        self.tilt = tilt


@dataclass
class Scored:
    """Per-target results of one rank: stream position of each target, its nll (float32 from the model) and bytes."""
    pos: list
    nll: list
    nbytes: list

    @classmethod
    def empty(cls) -> "Scored":
        return cls([], [], [])

    def add(self, pos: torch.Tensor, nll: torch.Tensor, nbytes: torch.Tensor) -> None:
        self.pos.append(pos)
        self.nll.append(nll)
        self.nbytes.append(nbytes)


def forward_rows(model: torch.nn.Module, val: ValStream, batch: np.ndarray, scored: bool = True):
    """One packed forward over window rows (begin, end, score_from): (target positions, nll of each, bytes of each) for
    the scored targets only, tilted when `scored` and the stream has a Tilt. The nll keeps its graph when grad is enabled
    (lcq/ttt.py's global phase trains on the untilted one: scored=False)."""
    lengths = batch[:, 1] - batch[:, 0]
    idx = np.concatenate([np.arange(b, e) for b, e, _ in batch])
    score = np.concatenate([np.arange(b, e) >= f for b, e, f in batch])
    idx_t = torch.from_numpy(idx).to(val.device)
    keep = torch.from_numpy(score).to(val.device)
    x, y = val.tokens[idx_t], val.tokens[idx_t + 1]
    cu = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)).to(val.device)
    logits = eval_forward(model, val.device)(x, cu, int(lengths.max()))  # autocast, compiled on CUDA (lcq/model.py)
    nll = F.cross_entropy(logits.float(), y, reduction="none")
    if scored and val.tilt is not None:
        nll = val.tilt.nll(nll, logits, y, idx_t + 1)
    nll = nll[keep]
    pos = idx_t[keep] + 1
    nbytes = val.val_bytes[pos] if val.val_bytes is not None else token_bytes(y[keep], x[keep], val.tables)
    return pos, nll, nbytes


def score_rows(model: torch.nn.Module, val: ValStream, rows: np.ndarray, batch_tokens: int, out: Scored) -> None:
    """Score the targets of window rows (begin, end, score_from) with `model` as it stands; results go to `out`."""
    with torch.no_grad():
        for batch in _batches(rows, batch_tokens):
            out.add(*forward_rows(model, val, batch))


def dump_path(base: str, stage: str) -> str:
    """EVAL_DUMP=PATH -> PATH with the stage name inserted before the suffix: dump.npz -> dump.quantized_lcq_ttt.npz."""
    root, ext = os.path.splitext(base)
    return f"{root}.{stage}{ext or '.npz'}"


def finish_scores(scored: Scored, val: ValStream, dinfo: D.DistInfo, t0: float, dump: str | None = None) -> EvalResult:
    """All-reduce the sums (float64: the result does not depend on the number of ranks beyond float rounding) and, when
    asked, write every target's record to `dump` (rank 0, atomically)."""
    device = val.device
    if scored.pos:
        pos = torch.cat(scored.pos)
        nll = torch.cat(scored.nll).double()
        nbytes = torch.cat(scored.nbytes).double()
    else:
        pos = torch.zeros(0, dtype=torch.long, device=device)
        nll = nbytes = torch.zeros(0, dtype=torch.float64, device=device)
    stats = torch.stack([nll.sum(), torch.tensor(float(pos.numel()), dtype=torch.float64, device=device), nbytes.sum()])
    D.all_reduce_sum(stats)
    nll_total, tokens, total_bytes = (float(v) for v in stats.tolist())
    if dump:
        write_dump(dump, pos, nll, nbytes, val, dinfo)
    D.sync(device)
    if tokens == 0 or total_bytes == 0:
        raise ValueError("evaluation scored no tokens or no bytes: the val split is empty or holds only document starts")
    return EvalResult(val_loss=nll_total / tokens, val_bpb=nll_total / math.log(2) / total_bytes, tokens=int(tokens),
                      bytes=int(total_bytes), seconds=time.perf_counter() - t0)


def write_dump(path: str, pos: torch.Tensor, nll: torch.Tensor, nbytes: torch.Tensor, val: ValStream,
               dinfo: D.DistInfo) -> None:
    """Every target's record (doc, pos, target, nll, bytes), sorted by position. Ranks fill a dense array over the stream
    (each target is scored by exactly one rank) that one all-reduce gathers."""
    dense = torch.zeros(3, val.n, dtype=torch.float64, device=val.device)
    dense[0, pos] = nll
    dense[1, pos] = nbytes
    dense[2, pos] = 1.0
    D.all_reduce_sum(dense)
    if not dinfo.is_master:
        return
    dense = dense.cpu().numpy()
    where = np.flatnonzero(dense[2] > 0)
    buf = io.BytesIO()
    np.savez(buf, doc=target_docs(val.starts, where), pos=where.astype(np.int64), target=val.np[where].astype(np.int64),
             nll=dense[0, where], bytes=dense[1, where].astype(np.int64))
    atomic_write(path, buf.getvalue())


def evaluate(model: torch.nn.Module, val_tokens: np.ndarray, bos_id: int, tables, window: int, stride: int,
             batch_tokens: int, dinfo: D.DistInfo, val_bytes: np.ndarray | None = None,
             dump: str | None = None, tilt: Tilt | None = None) -> EvalResult:
    """Score the val tokens with `model` (whatever it holds: float, dequantized, LoRA-wrapped). Ranks split the windows.
    `val_bytes` (optional, one entry per val token) overrides the byte tables; `dump` writes per-target records; `tilt`
    tilts every score (lcq/ngram.py)."""
    D.sync(dinfo.device)
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    val = ValStream(val_tokens, bos_id, tables, dinfo.device, val_bytes, tilt)
    windows = plan_windows(val.starts, val.n, window, stride)
    scored = Scored.empty()
    score_rows(model, val, windows[dinfo.rank::dinfo.world_size], batch_tokens, scored)
    model.train(was_training)
    return finish_scores(scored, val, dinfo, t0, dump)
