"""`python -m lcq.bench ngram`: the n-gram tilt's hint rate on this CPU, projected to the record's val split (issue 24).

Streams: the preset's own val tokens (demo by default: real text, its hint rate) and a synthetic record-like stream of
--ngram-tokens ids (`zipf_stream`: i.i.d. Zipf(1.1) over the record's 8192 ids with 3% copied spans: most 15-token
contexts are new, as in FineWeb, where #2135 hinted 628,130 of 47,851,520 targets). Times are CPU seconds of this
process (single-threaded numpy: what an idle core takes; the wall time of a shared box is printed beside). On the
synthetic stream, side by side:
- one process (lcq.ngram.shard_hints with world 1): seconds per token, projected to 47,851,520 tokens as
  t x (N / n) x log N / log n (two sorts dominate: n log n). #2135's single-threaded C pass took 200.9 s there (its
  seed-42 log, another CPU);
- the 8-rank split the pipeline runs (lcq.ngram.hints): each rank's share timed in turn on this process; the slowest,
  projected the same way, is `critical_path_seconds`: what the hints add before the first tilted score. The merge (one
  all-reduce of 4 bytes per token on the device) is not measured here (no GPU). The shards' union is checked against
  the one-process hints.
"""
from __future__ import annotations

import math
import time

import numpy as np

from ..config import Config
from ..data import load_val_tokens
from ..ngram import shard_hints

RECORD_TOKENS = 47_851_520  # #2135's val split (its seed-42 log: ngram_tilt:hints total=47851520)
RECORD_VOCAB = 8192
RECORD_2135_SECONDS = 200.9  # its precompute_done elapsed, single-threaded C


def projected(seconds: float, n: int, total: int = RECORD_TOKENS) -> float:
    return seconds * total / n * math.log(total) / math.log(n)


def zipf_stream(n: int, seed: int, copied: float = 0.03, span: int = 64) -> np.ndarray:
    """i.i.d. Zipf(1.1) ids, then `copied` of the stream overwritten by copies of earlier `span`-token spans (the
    repeated passages web text has), so some long contexts repeat and get hints."""
    g = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, RECORD_VOCAB + 1) ** 1.1
    out = g.choice(RECORD_VOCAB, size=n, p=p / p.sum()).astype(np.uint16)
    for dst in np.sort(g.integers(2 * span, n - span, int(n * copied / span))):
        src = int(g.integers(0, dst - span))
        out[dst:dst + span] = out[src:src + span]
    return out


def timed(fn):
    """(result, CPU seconds, wall seconds): CPU time is what one idle core takes for these single-threaded numpy passes;
    the wall time on a shared box also holds other jobs' time."""
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c0, time.perf_counter() - t0


def bench_ngram(cfg: Config, tokens: int, world: int) -> dict:
    order, thr = cfg.ngram_order, cfg.ngram_threshold
    if cfg.auto_build_demo:
        from .corpus import ensure_demo
        ensure_demo(cfg.data_path, cfg.tokenizer_path)
    val = load_val_tokens(cfg.data_path, cfg.val_max_tokens)
    real, real_s, _ = timed(lambda: shard_hints(val, order, thr))
    stream = zipf_stream(tokens, cfg.seed)
    one, one_s, one_wall = timed(lambda: shard_hints(stream, order, thr))
    parts, rank_s = [], []
    for r in range(world):
        part, s, _ = timed(lambda: shard_hints(stream, order, thr, r, world))
        parts.append(part)
        rank_s.append(s)
    same = bool(np.array_equal(sum(parts), one))
    out = dict(order=order, threshold=thr, record_tokens=RECORD_TOKENS, tokens_measured=tokens, world=world,
               one_process_s=one_s, one_process_wall_s=one_wall, tokens_per_s=tokens / one_s,
               rank_s=[round(s, 3) for s in rank_s],
               hint_seconds_projected=projected(one_s, tokens), critical_path_seconds=projected(max(rank_s), tokens),
               split_equals_one_process=same, val_tokens=int(val.size), val_hinted=int(np.count_nonzero(real)),
               val_seconds=real_s, synthetic_hinted=int(np.count_nonzero(one)), pr2135_seconds=RECORD_2135_SECONDS)
    print(f"n-gram hints, order {order} threshold {thr:g} (lcq/ngram.py), this CPU, one thread, CPU seconds")
    print(f"  {cfg.data_path} val: {val.size:,} tokens, {out['val_hinted']:,} hinted "
          f"({out['val_hinted'] / max(val.size - 1, 1):.2%}), {real_s:.2f}s")
    print(f"  synthetic stream: {tokens:,} tokens, {out['synthetic_hinted']:,} hinted; one process {one_wall:.2f}s wall")
    print(f"  {'arm':<28} {'measured s':>11} {'projected s':>12}  (to {RECORD_TOKENS:,} tokens, n log n)")
    print(f"  {'one process':<28} {one_s:11.2f} {out['hint_seconds_projected']:12.2f}  "
          f"(#2135's C pass: {RECORD_2135_SECONDS} s, its CPU)")
    print(f"  {f'slowest of {world} ranks':<28} {max(rank_s):11.2f} {out['critical_path_seconds']:12.2f}  "
          f"(ratio to one process {max(rank_s) / one_s:.3f}; shards' union equals it: {same})")
    return out
