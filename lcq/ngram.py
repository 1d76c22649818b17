"""Token-only n-gram tilt at eval (#2130/#2135; the closed form of #1145, precedent merged #1514). docs/ngram-tilt.md.

State: over the val stream in stream order (across documents: the state never resets at a BOS, as #2135's), each
context of the previous ORDER-1 tokens counts the tokens that followed it. Hint h_t of target t (stream position t):
among the targets s < t with the same context, the token with the most followers, ties to the one that reached that
count first; hinted only when that count / their number >= NGRAM_THRESHOLD. So h_t reads tokens[:t] only.

Tilt: p'(a) = exp(beta [a = h_t]) p(a) / Z_t with Z_t = 1 + p(h_t) (e^beta - 1), so the scored target y pays
nll' = nll - beta [y = h_t] + log(1 + p(h_t) (e^beta - 1)); without a hint nll' = nll. TTT trains on the untilted
loss (#2135), so only scores change.

Computed with sorts (no sequential pass): group the targets by context, then by (context, token); the running pair
count and its running maximum per context give each target's state before it. Ranks split the work by the context's
last two tokens (`owners`): a context lives on one rank, which sees every earlier target with that context, so its
hints are exactly the one-process hints; the merge is a sum of disjoint parts (`hints`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from . import dist as D

MIX = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier of the context hash


def owners(tokens: np.ndarray, ctx: int, world: int) -> np.ndarray:
    """Rank owning the context of each target position ctx..n-1: a hash of its last two tokens (one at order 2), the
    same on every rank. Two tokens spread even a skewed vocabulary evenly (a single frequent token would load one rank)."""
    n = tokens.size
    key = tokens[ctx - 1:n - 1].astype(np.uint32)
    if ctx > 1:
        key |= tokens[ctx - 2:n - 2].astype(np.uint32) << np.uint32(16)
    return ((key * np.uint32(0x9E3779B1)) >> np.uint32(16)) % np.uint32(world)


def shard_hints(tokens: np.ndarray, order: int, threshold: float, rank: int = 0, world: int = 1,
                mix: np.uint64 = MIX) -> np.ndarray:
    """int32 per stream position: 1 + h_t at the hinted targets whose context `rank` owns, 0 elsewhere. A 64-bit hash
    sort keeps only the targets whose context hash repeats (most of a real stream's 15-token contexts are new); those
    are grouped exactly by their tokens, so a collision (`mix`: the hash multiplier; a degenerate one makes many) only
    costs time."""
    ctx, n = order - 1, int(tokens.size)
    out = np.zeros(n, dtype=np.int32)
    v = np.ascontiguousarray(tokens)
    pos = np.arange(ctx, n, dtype=np.int64) if world == 1 else np.flatnonzero(owners(v, ctx, world) == rank) + ctx
    h = np.zeros(pos.size, dtype=np.uint64)
    for k in range(ctx, 0, -1):
        h = h * mix + v[pos - k]
    o = np.argsort(h)
    eq = h[o[1:]] == h[o[:-1]]
    dup = np.zeros(pos.size, dtype=bool)
    dup[1:] = eq
    dup[:-1] |= eq
    sub = pos[o[dup]]
    if sub.size == 0:
        return out
    cols = [v[sub - k] for k in range(1, ctx + 1)]
    o = np.lexsort([sub, *cols])  # by context (exactly), then position
    sub, cols = sub[o], [c[o] for c in cols]
    m = sub.size
    idx = np.arange(m, dtype=np.int64)
    new = np.ones(m, dtype=bool)
    new[1:] = np.any([c[1:] != c[:-1] for c in cols], axis=0)
    gid = np.cumsum(new) - 1
    start = np.maximum.accumulate(np.where(new, idx, 0))
    y = v[sub].astype(np.int64)
    # pair count of (context, token), this target included: its rank among equal pairs in position order
    o2 = np.lexsort((sub, y, gid))
    g2, y2 = gid[o2], y[o2]
    pnew = np.ones(m, dtype=bool)
    pnew[1:] = (g2[1:] != g2[:-1]) | (y2[1:] != y2[:-1])
    pc = np.empty(m, dtype=np.int64)
    pc[o2] = idx - np.maximum.accumulate(np.where(pnew, idx, 0)) + 1
    # per context: running max of the pair count, and the target where it last rose (its token is the top: ties keep
    # the earlier leader, as #2135's strict `>` update)
    top = np.maximum.accumulate((gid << 32) | pc) & 0xFFFFFFFF
    rose = new.copy()
    rose[1:] |= top[1:] > top[:-1]
    lead = y[np.maximum.accumulate(np.where(rose, idx, 0))]
    # target k sees the state after k - 1 (same context): its hint, count and total
    seen = np.flatnonzero(~new)
    total = (seen - start[seen]).astype(np.float32)
    gate = top[seen - 1].astype(np.float32) / total >= np.float32(threshold)  # float32, as #2135's C
    hit = seen[gate]
    out[sub[hit]] = lead[hit - 1] + 1
    return out


def hints(tokens: np.ndarray, order: int, threshold: float, dinfo: D.DistInfo) -> torch.Tensor:
    """h_t for every stream position on the device (-1: no hint). Each rank computes the contexts it owns; every
    position is owned by one rank, so the all-reduced sum of the parts is the one-process answer."""
    part = torch.from_numpy(shard_hints(tokens, order, threshold, dinfo.rank, dinfo.world_size)).to(dinfo.device)
    return D.all_reduce_sum(part) - 1


@dataclass(frozen=True)
class Tilt:
    """What the scoring loops need: h_t of every stream position on the device and the boost (beta)."""
    hint: torch.Tensor
    boost: float
    seconds: float  # the hints' critical path: the slowest rank's share plus the merge

    def nll(self, nll: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Scored nll of targets y at stream positions pos (the one definition both evals call)."""
        return tilt_nll(nll, logits, y, self.hint[pos], self.boost)

    def describe(self, order: int, threshold: float, world: int) -> str:
        n = int(self.hint.numel())
        hinted = int((self.hint >= 0).sum())
        return (f"ngram_tilt: order {order} threshold {threshold:g} boost {self.boost:g} hinted {hinted}/{n - 1} "
                f"targets ({hinted / max(n - 1, 1):.2%}) in {self.seconds:.2f}s, split over {world} rank(s) by "
                "context; charged to every tilted stage")


def build_tilt(tokens: np.ndarray, order: int, threshold: float, boost: float, dinfo: D.DistInfo) -> Tilt:
    D.sync(dinfo.device)
    t0 = time.perf_counter()
    hint = hints(tokens, order, threshold, dinfo)
    D.sync(dinfo.device)
    return Tilt(hint, boost, time.perf_counter() - t0)


def tilt_nll(nll: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, hint: torch.Tensor, boost: float) -> torch.Tensor:
    """nll' of targets y under the tilted distribution; logits [m, V] are the rows nll [m] was computed from and
    hint [m] the targets' h_t (-1: none, nll unchanged). log p(h) = logit_h - logit_y - nll: no second softmax."""
    h = hint.long().clamp(min=0)
    g = logits.gather(1, torch.stack([y, h], 1)).to(nll.dtype)
    log_q = (g[:, 1] - g[:, 0] - nll).clamp(max=0.0)
    tilted = nll - boost * (y == h).to(nll.dtype) + torch.log1p(log_q.exp() * math.expm1(boost))
    return torch.where(hint >= 0, tilted, nll)
