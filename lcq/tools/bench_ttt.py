"""`python -m lcq.bench ttt`: batched score-first TTT (issue 15), measured side by side, and projected to the record.

Rows: the preset's trained model (demo by default) scored with TTT at TTT_BATCH_DOCS 1, 8, 32, 64 on its val split,
each from a fresh copy with a zero-started adapter: targets per second, forward tokens processed per scored target
(padding included: the recompute factor), chunk forwards and optimizer steps per 1,000 targets, and the largest per-target
nll difference from batch 1 (float rounding only: the scoring order, windows and phases do not depend on the batch).

Each row also runs the preflight's TTT projection (lcq.preflight.ttt_projection: timed pieces of real batches scaled by
the schedule) for the same TTT_BATCH_DOCS, before the measured pass, and prints projected / measured seconds.

Record projection: #1855's val split rebuilt from the `ttp:` lines of its train_seed42.log (records/track_10min_16mb/
2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611 in openai/parameter-golf): 82 of its 782 batches of 64
documents print their length range `dl:lo-hi`; the other batches' ranges are interpolated in log length between the
printed ones, each batch's 64 lengths spread evenly over its range. On that split, the forward tokens and steps of our
algorithm (lcq/ttt.py: windows, chunk plans and padded shapes) beside #1855's (chunk k of a batch is one
[64, min((k+1)*48, 2048)] forward). A ratio of work, not a time.

`--context` (issue 26, bench_context): TTT_CONTEXT recompute vs reuse at equal seconds on record-length documents, 2
seeds, and the reuse cache's bytes at the record's shapes (docs/ttt-context.md).
"""
from __future__ import annotations

import copy
import dataclasses
import os
import tempfile
import time
import types

import numpy as np

from .. import ttt as T
from ..config import Config, replace

# (batch, shortest, longest document) from the `ttp: bN/782 ... dl:lo-hi` lines of #1855's train_seed42.log
RECORD_BATCHES = 782
RECORD_SLOTS = 64
RECORD_TTP = (
    (9, 105, 107), (24, 127, 128), (34, 137, 138), (47, 150, 151), (58, 161, 162), (71, 173, 173), (82, 183, 183),
    (94, 193, 194), (108, 206, 207), (116, 213, 214), (131, 227, 228), (146, 241, 242), (154, 249, 250),
    (169, 263, 264), (177, 271, 272), (192, 286, 288), (200, 296, 297), (208, 304, 305), (223, 321, 322),
    (231, 330, 331), (243, 345, 346), (254, 358, 360), (262, 369, 370), (277, 388, 389), (285, 399, 400),
    (293, 410, 412), (305, 429, 430), (316, 445, 446), (324, 458, 459), (332, 469, 471), (340, 482, 483),
    (355, 504, 506), (363, 518, 521), (371, 532, 533), (379, 545, 547), (387, 559, 561), (400, 582, 584),
    (410, 601, 603), (418, 617, 618), (426, 632, 634), (434, 647, 648), (442, 664, 666), (450, 680, 682),
    (459, 700, 701), (470, 724, 726), (481, 749, 752), (488, 766, 769), (497, 788, 791), (505, 809, 812),
    (513, 832, 835), (521, 854, 858), (529, 878, 882), (537, 902, 905), (545, 927, 930), (552, 949, 952),
    (559, 972, 975), (567, 1001, 1004), (574, 1025, 1029), (581, 1052, 1056), (588, 1081, 1086), (596, 1115, 1119),
    (603, 1146, 1150), (611, 1182, 1186), (618, 1216, 1221), (626, 1260, 1265), (634, 1302, 1308), (642, 1349, 1356),
    (650, 1398, 1406), (658, 1452, 1459), (666, 1507, 1514), (675, 1578, 1586), (682, 1638, 1646), (688, 1696, 1706),
    (696, 1779, 1790), (704, 1872, 1885), (716, 2054, 2069), (726, 2254, 2276), (728, 2306, 2324), (740, 2653, 2686),
    (741, 2686, 2730), (754, 3345, 3397), (782, 30339, 97114),)


def ttp_samples(log_text: str) -> list[tuple[int, int, int]]:
    """(batch, lo, hi) from a #1855-style log's `ttp:` lines."""
    out = []
    for line in log_text.splitlines():
        if line.startswith("ttp: b") and " dl:" in line:
            b = int(line.split()[1][1:].split("/")[0])
            lo, hi = line.split(" dl:")[1].split()[0].split("-")
            out.append((b, int(lo), int(hi)))
    return sorted(set(out))


def record_lengths(samples) -> np.ndarray:
    """64 document lengths per batch for all 782 batches (longest batch last), interpolated from the samples."""
    b = np.array([s[0] for s in samples], dtype=np.float64)
    lo = np.interp(np.arange(1, RECORD_BATCHES + 1), b, np.log([s[1] for s in samples]))
    hi = np.interp(np.arange(1, RECORD_BATCHES + 1), b, np.log([s[2] for s in samples]))
    return np.exp(np.linspace(lo, hi, RECORD_SLOTS, axis=1)).round().astype(np.int64)


def projection(lengths: np.ndarray, window: int = 2048, chunk: int = 48) -> dict:
    """Forward tokens and chunk steps on batches of documents (rows of `lengths`), ours beside #1855's."""
    ours_tok = theirs_tok = ours_steps = theirs_steps = targets = reuse_tok = pairs = reuse_pairs = 0
    for row in lengths:
        plans = [T.doc_chunks(0, int(n), window, chunk, chunk) for n in row]
        ours_tok += T.batch_cost(plans, len(row), window)
        reuse_tok += T.batch_cost(plans, len(row), window, reuse=True)  # TTT_CONTEXT=reuse
        for p in plans:  # causal query-key pairs per layer, unpadded: the whole window vs only the new queries
            n, new = p[:, 1] - p[:, 0], p[:, 1] - p[:, 2]
            pairs += int((n * (n + 1) // 2).sum())
            reuse_pairs += int((new * n - new * (new - 1) // 2).sum())
        ours_steps += max(len(p) for p in plans)
        k = -(-int(row.max()) // chunk)
        theirs_tok += len(row) * int(np.minimum((np.arange(k) + 1) * chunk, window).sum())
        theirs_steps += k
        targets += int(row.sum())
    return dict(documents=int(lengths.size), targets=targets, ours_forward_tokens=ours_tok,
                ref_1855_forward_tokens=theirs_tok, ours_steps=ours_steps, ref_1855_steps=theirs_steps,
                work_ratio_vs_1855=ours_tok / theirs_tok, step_ratio_vs_1855=ours_steps / theirs_steps,
                reuse_forward_tokens=reuse_tok, reuse_over_recompute=reuse_tok / ours_tok, attention_pairs=pairs,
                reuse_attention_pairs=reuse_pairs, reuse_pairs_over_recompute=reuse_pairs / pairs)


def _row(model, run, cfg: Config, batch_docs: int, dump: str) -> dict:
    from .preflight import ttt_projection

    spec = dataclasses.replace(T.spec_from_config(cfg), batch_docs=batch_docs)
    proj = ttt_projection(types.SimpleNamespace(cfg=replace(cfg, ttt_batch_docs=batch_docs), dinfo=run.dinfo,
                                                model=model, val_tokens=run.val_tokens, bos_id=run.bos_id,
                                                tables=run.tables, val_bytes=run.val_bytes))
    m = T.prepare_adapter(copy.deepcopy(model), "zero", cfg)
    calls, tokens = [0], [0]

    def count(_mod, args, _out):
        calls[0] += 1
        tokens[0] += args[0].numel()
    steps = [0]
    step = T.SlotAdapters.step

    def counted(self, learn):
        steps[0] += 1
        return step(self, learn)
    hook = m.register_forward_hook(count)
    T.SlotAdapters.step = counted  # counts optimizer steps; the method itself runs unchanged
    try:
        t0 = time.perf_counter()
        res = T.evaluate_ttt(m, run.val_tokens, run.bos_id, run.tables, cfg.window, cfg.ttt_chunk_tokens,
                             cfg.eval_batch_tokens, run.dinfo, spec, val_bytes=run.val_bytes, dump=dump)
        wall = time.perf_counter() - t0
    finally:
        T.SlotAdapters.step = step
        hook.remove()
    n = res.tokens
    return dict(batch_docs=batch_docs, bpb=res.val_bpb, seconds=wall, preflight_projected_s=proj["ttt_projected_s"],
                projected_over_measured=proj["ttt_projected_s"] / res.seconds, targets=n, targets_per_s=n / wall,
                forward_tokens_per_target=tokens[0] / n, forward_calls_per_1k_targets=1000 * calls[0] / n,
                steps_per_1k_targets=1000 * steps[0] / n)


def bench_ttt(cfg: Config, dinfo, batch_list: list[int], log_path: str | None) -> dict:
    from .bench_run import trained_run
    run = trained_run(cfg, dinfo, "ttt")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for b in batch_list:
            rows.append(_row(run.model, run, cfg, b, os.path.join(tmp, f"b{b}.npz")))
            with np.load(os.path.join(tmp, f"b{rows[0]['batch_docs']}.npz")) as z0, \
                    np.load(os.path.join(tmp, f"b{b}.npz")) as z:
                assert np.array_equal(z0["pos"], z["pos"]), "batch size changed which targets are scored"
                rows[-1]["max_abs_nll_diff"] = float(np.abs(z0["nll"] - z["nll"]).max())
            r = rows[-1]
            print(f"batch_docs {b:>3}: {r['targets_per_s']:9.1f} targets/s  {r['forward_tokens_per_target']:7.2f} "
                  f"forward tokens/target  {r['forward_calls_per_1k_targets']:7.2f} forwards and "
                  f"{r['steps_per_1k_targets']:7.2f} steps per 1k targets  max |nll - batch 1| "
                  f"{r['max_abs_nll_diff']:.2e}  bpb {r['bpb']:.5f}  preflight projection {r['preflight_projected_s']:.1f}s "
                  f"vs {r['seconds']:.1f}s (x{r['projected_over_measured']:.2f})", flush=True)
    for r in rows:
        r["speedup_vs_first"] = r["targets_per_s"] / rows[0]["targets_per_s"]
    if log_path:
        with open(log_path) as f:
            samples, source = ttp_samples(f.read()), log_path
    else:
        samples, source = list(RECORD_TTP), f"the {len(RECORD_TTP)} ttp: lines of #1855's train_seed42.log"
    proj = projection(record_lengths(samples), cfg.window if cfg.window >= 2048 else 2048)
    proj.update(source=source, samples=len(samples))
    print(f"record projection ({proj['documents']:,} documents, {proj['targets']:,} targets; {source}): forward tokens "
          f"ours {proj['ours_forward_tokens']:,} vs #1855 {proj['ref_1855_forward_tokens']:,} "
          f"(x{proj['work_ratio_vs_1855']:.3f}), chunk steps ours {proj['ours_steps']:,} vs #1855 "
          f"{proj['ref_1855_steps']:,} (x{proj['step_ratio_vs_1855']:.3f}); with TTT_CONTEXT=reuse (issue 26) "
          f"the per-token layers run {proj['reuse_forward_tokens']:,} tokens "
          f"(x{proj['reuse_over_recompute']:.3f} of recompute) and attention x{proj['reuse_pairs_over_recompute']:.3f} "
          "of its query-key pairs")
    return dict(bench="ttt", preset=cfg.preset, rows=rows, record_projection=proj)


def long_doc_val(val_tokens: np.ndarray, bos_id: int, window: int, seed: int) -> np.ndarray:
    """The val split re-cut into documents whose lengths follow the record's (#1855's ttp: quantiles, record_lengths,
    scaled by window / 2048 so a document spans as many windows as it would at the record): the val text in order,
    BOS removed, cut into consecutive pieces of drawn lengths, each opened by a BOS. Held-out text only."""
    text = val_tokens[val_tokens != bos_id]
    pool = np.maximum(2, (record_lengths(list(RECORD_TTP)).ravel() * window / RECORD_WINDOW).round().astype(np.int64))
    g, out, i = np.random.default_rng(seed), [], 0
    while i < text.size:
        n = int(g.choice(pool)) - 1
        out += [np.array([bos_id], dtype=val_tokens.dtype), text[i:i + n]]
        i += n
    return np.concatenate(out)


RECORD_WINDOW = 2048  # #1855's TTT context


def cache_bytes(calls: int, slots: int, window: int, kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """Bytes of TTT_CONTEXT=reuse's rings (lcq/kvcache.py: keys and values, window + 1 entries per slot and per
    attention call)."""
    return 2 * calls * slots * (window + 1) * kv_heads * head_dim * dtype_bytes


def cache_bytes_at_record(cfg: Config) -> dict:
    """TTT_CONTEXT=reuse's cache per rank at the record preset's shapes (bf16 keys and values)."""
    from ..config import make_config
    from ..recurrence import layer_sequence

    rec = make_config("record")
    calls = len(layer_sequence(rec.num_layers, rec.recur_start_layer, rec.recur_end_layer, rec.recur_passes))
    head_dim = rec.model_dim // rec.num_heads
    out = dict(attention_calls=calls, slots=rec.ttt_batch_docs, kv_heads=rec.num_kv_heads, head_dim=head_dim)
    for w in sorted({rec.window, RECORD_WINDOW, 3072}):  # the preset's window, #1855's 2048, #2135's 3072
        out[f"window_{w}_bytes"] = cache_bytes(calls, rec.ttt_batch_docs, w, rec.num_kv_heads, head_dim, 2)
    return out


def _context_arm(model, run, cfg: Config, val: np.ndarray, spec, window: int) -> tuple[float, float]:
    """(bpb, CPU seconds) of one TTT pass over `val` from a fresh copy with a zero-started adapter. CPU seconds of this
    process, not wall seconds: on a box shared with other jobs they are what the pass itself cost (with
    OMP_NUM_THREADS=1, what an idle core's wall clock would read)."""
    m = T.prepare_adapter(copy.deepcopy(model), "zero", cfg)
    t0 = time.process_time()
    res = T.evaluate_ttt(m, val, run.bos_id, run.tables, window, spec.chunk_tokens, cfg.eval_batch_tokens, run.dinfo,
                         spec)
    return res.val_bpb, time.process_time() - t0


def bench_context(cfg: Config, dinfo, seeds: list[int], batch_docs: int, max_steps: int, chunk: int) -> dict:
    """recompute vs reuse at equal seconds (issue 26): per seed, the demo model trained, the val split re-cut to the
    record's document lengths (long_doc_val), chunks of `chunk` targets (12 at the demo's window 256: a reuse row pads
    to 16 tokens, the record's 48 -> 64 efficiency; the record's window/chunk ratio, 6, would pad 6 -> 16). Arms, each
    from the same zero start: recompute and reuse at the preset's TTT settings, then reuse spending the seconds it saves
    on more epochs per chunk (TTT_STEPS: one step's cost measured as reuse at 2 steps minus 1; as many steps as fit in
    recompute's seconds, at most max_steps)."""
    from .bench_run import trained_run

    window = cfg.window
    base = dataclasses.replace(T.spec_from_config(cfg), chunk_tokens=chunk, batch_docs=batch_docs, steps=1)
    rows = []
    for seed in seeds:
        run = trained_run(replace(cfg, seed=seed), dinfo, f"ttt_context_s{seed}")
        val = long_doc_val(run.val_tokens, run.bos_id, window, seed)
        arms = {}
        for name, ctx, steps in (("recompute", "recompute", 1), ("reuse", "reuse", 1), ("reuse_2_steps", "reuse", 2)):
            arms[name] = _context_arm(run.model, run, cfg, val, dataclasses.replace(base, context=ctx, steps=steps),
                                      window)
            print(f"seed {seed} {name:>14}: bpb {arms[name][0]:.5f}  {arms[name][1]:7.1f}s", flush=True)
        (t_rc, t1, t2) = (arms[k][1] for k in ("recompute", "reuse", "reuse_2_steps"))
        spent = int(min(max_steps, max(1, 1 + (t_rc - t1) // max(t2 - t1, 1e-9))))
        arms["reuse_spent"] = arms["reuse_2_steps"] if spent == 2 else arms["reuse"] if spent == 1 else _context_arm(
            run.model, run, cfg, val, dataclasses.replace(base, context="reuse", steps=spent), window)
        print(f"seed {seed} {'reuse_spent':>14}: bpb {arms['reuse_spent'][0]:.5f}  {arms['reuse_spent'][1]:7.1f}s "
              f"(TTT_STEPS={spent})", flush=True)
        docs = np.diff(np.append(np.flatnonzero(val == run.bos_id), val.size))
        plans = [T.doc_chunks(0, int(n), window, chunk, chunk) for n in docs]
        work = [sum(T.batch_cost(plans[i:i + batch_docs], batch_docs, window, r) for i in range(0, len(plans),
                                                                                                batch_docs))
                for r in (False, True)]
        rows.append(dict(seed=seed, documents=int(docs.size), targets=int(val.size - 1), spent_steps=spent,
                         work_ratio=work[1] / work[0], **{f"{k}_bpb": v[0] for k, v in arms.items()},
                         **{f"{k}_s": v[1] for k, v in arms.items()}))
    print(f"\nTTT context at equal seconds ({cfg.preset} model, window {window}, chunk {chunk}, TTT_BATCH_DOCS "
          f"{batch_docs}, val re-cut to the record's document lengths)")
    print(f"CPU seconds of each TTT pass; spent = reuse at TTT_STEPS=steps; work = reuse / recompute padded forward tokens")
    print(f"{'seed':>6} {'docs':>5} {'recompute':>10} {'reuse':>8} {'spent':>8} {'steps':>5} {'rc s':>7} {'reuse s':>7} "
          f"{'spent s':>7} {'work':>6}")
    for r in rows:
        print(f"{r['seed']:>6} {r['documents']:>5} {r['recompute_bpb']:>10.5f} {r['reuse_bpb']:>8.5f} "
              f"{r['reuse_spent_bpb']:>8.5f} {r['spent_steps']:>5} {r['recompute_s']:>7.1f} {r['reuse_s']:>7.1f} "
              f"{r['reuse_spent_s']:>7.1f} {r['work_ratio']:>6.3f}")
    mem = cache_bytes_at_record(cfg)
    print(f"reuse cache per rank at the record's shapes ({mem['attention_calls']} attention calls x "
          f"{mem['slots']} slots x (window + 1) x {mem['kv_heads']} KV heads x {mem['head_dim']} dims x 2 (K, V) x 2 bytes): "
          + ", ".join(f"window {k.split('_')[1]}: {v / 1e9:.2f} GB" for k, v in mem.items() if k.endswith("_bytes")))
    return dict(bench="ttt_context", preset=cfg.preset, window=window, chunk=chunk, batch_docs=batch_docs, rows=rows,
                recompute_bpb=[r["recompute_bpb"] for r in rows], reuse_bpb=[r["reuse_bpb"] for r in rows],
                reuse_spent_bpb=[r["reuse_spent_bpb"] for r in rows],
                seconds={k: [r[f"{k}_s"] for r in rows] for k in ("recompute", "reuse", "reuse_2_steps", "reuse_spent")},
                work_ratio=[r["work_ratio"] for r in rows], cache_bytes_record=mem)
