"""Token-only n-gram tilt (issue 24 item 2, lcq/ngram.py): the hints are a brute-force counter's, on one rank or split
over ranks; the tilted distribution sums to 1; no score at or before a changed token moves (sliding and batched TTT,
across documents); boost 0 scores exactly as no tilt; a tiny run with the tilt on logs it and reproduces from the file."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lcq.config import ConfigError, make_config
from lcq.dist import DistInfo
from lcq.evaluate import evaluate
from lcq.ngram import Tilt, build_tilt, hints, owners, shard_hints, tilt_nll
from lcq.ttt import evaluate_ttt

from test_evaluate import BOS, V, model, synthetic_tables
from test_ttt import CPU, adapted_model, spec

WINDOW, STRIDE = 16, 8


def reference_hints(tokens: np.ndarray, order: int, threshold: float) -> np.ndarray:
    """One left-to-right pass with a dict per context, as #2135's C state (exact contexts): the hint is the context's
    top token (a new leader only on a strictly larger count), gated on its share of the context's count."""
    ctx, out, state = order - 1, np.full(tokens.size, -1), {}
    for t in range(max(ctx, 1), tokens.size):
        key = tuple(tokens[t - ctx:t].tolist())
        st = state.setdefault(key, [0, 0, -1, {}])  # total, top count, top token, follower counts
        if st[0] and np.float32(st[1]) / np.float32(st[0]) >= np.float32(threshold):
            out[t] = st[2]
        y = int(tokens[t])
        st[3][y] = st[3].get(y, 0) + 1
        st[0] += 1
        if st[3][y] > st[1]:
            st[1], st[2] = st[3][y], y
    return out


def phrase_stream(lengths, seed=0, vocab=V):
    """Documents of phrases drawn from a small shared bank, a noise token now and then, and copies of 20-token spans
    of the stream so far: contexts short and long repeat within and across documents, with competing followers, so
    hints fire, are gated off, and change leader."""
    g = np.random.default_rng(seed)
    bank = [g.integers(2, vocab, g.integers(3, 8)).tolist() for _ in range(6)]
    docs, seen = [], []
    for n in lengths:
        body = []
        while len(body) < n - 1:
            r = g.random()
            if r < 0.2 and len(seen) > 40:
                s = int(g.integers(len(seen) - 20))
                body += [t for t in seen[s:s + 20] if t != BOS]
            else:
                body += bank[g.integers(len(bank))] if r < 0.85 else [int(g.integers(2, vocab))]
        docs.append([BOS] + body[:n - 1])
        seen += docs[-1]
    return np.concatenate(docs).astype(np.uint16)


LENGTHS = [40, 25, 33, 18, 29, 12, 37, 22]


@pytest.mark.parametrize("order,threshold", [(2, 0.8), (4, 0.8), (4, 0.5), (16, 0.8), (3, 1.0)])
def test_hints_are_the_reference_counters_on_one_rank_and_split(order, threshold):
    toks = phrase_stream(LENGTHS * 3, seed=order)
    want = reference_hints(toks, order, threshold)
    assert (want >= 0).sum() > 10 and (want < 0).sum() > 10  # the stream exercises both outcomes
    one = shard_hints(toks, order, threshold) - 1
    assert np.array_equal(one, want)
    parts = [shard_hints(toks, order, threshold, r, 3) for r in range(3)]
    assert np.array_equal(sum(parts) - 1, want) and all(np.count_nonzero(p) for p in parts)  # disjoint, each works
    # a degenerate hash (every context collides with any sharing its last token) changes nothing: grouping is exact
    assert np.array_equal(shard_hints(toks, order, threshold, mix=np.uint64(0)) - 1, want)


def test_a_context_lives_on_one_rank():
    """The owner is a function of the context's last two tokens (so of the context), in [0, world), and every rank
    owns some."""
    toks = phrase_stream(LENGTHS * 4, seed=9)
    pos = np.arange(15, toks.size)
    own = owners(toks, 15, 4)
    by_pair = {}
    for t, r in zip(pos.tolist(), own.tolist()):
        assert by_pair.setdefault((int(toks[t - 2]), int(toks[t - 1])), r) == r
    assert set(own.tolist()) == {0, 1, 2, 3}


def test_tilted_distribution_sums_to_one_at_every_position():
    torch.manual_seed(0)
    logits = torch.randn(50, V, dtype=torch.float64) * 3
    hint = torch.randint(-1, V, (50,))
    for boost in (0.0, 2.625, 8.0):
        total = torch.zeros(50, dtype=torch.float64)
        for a in range(V):  # every token as the target: p'(a) = exp(-nll'(a))
            y = torch.full((50,), a)
            nll = F.cross_entropy(logits, y, reduction="none")
            total += torch.exp(-tilt_nll(nll, logits, y, hint, boost))
        assert (total - 1).abs().max() < 1e-6
    # the closed form is the renormalised boosted distribution
    y = torch.randint(0, V, (50,))
    h = hint.clamp(min=0)
    boosted = logits + 2.625 * F.one_hot(h, V) * (hint >= 0)[:, None]
    want = F.cross_entropy(boosted, y, reduction="none")
    got = tilt_nll(F.cross_entropy(logits, y, reduction="none"), logits, y, hint, 2.625)
    assert torch.allclose(got, want, atol=1e-12)


def _tilt(toks, order=4, threshold=0.8, boost=2.625):
    return build_tilt(toks, order, threshold, boost, CPU)


def _dump(tmp_path, name, fn):
    path = tmp_path / f"{name}.npz"
    fn(str(path))
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def sliding(tmp_path, toks, name, tilt):
    return _dump(tmp_path, name, lambda p: evaluate(model(), toks, BOS, synthetic_tables(), WINDOW, STRIDE, 64, CPU,
                                                    dump=p, tilt=tilt))


def ttt(tmp_path, toks, name, tilt, batch_docs=8):
    return _dump(tmp_path, name, lambda p: evaluate_ttt(adapted_model(), toks, BOS, synthetic_tables(), WINDOW, STRIDE,
                                                        64, CPU, spec(batch_docs=batch_docs, chunk_tokens=8), dump=p,
                                                        tilt=tilt))


@pytest.mark.parametrize("scorer", [sliding, ttt])
def test_changing_a_token_moves_no_score_at_or_before_it(tmp_path, scorer):
    """Token j inside the third document: every score before it (documents before it, its own document's earlier
    targets, batch-mates scored beside it) stays bit for bit, and so does the hint of target j itself; hints and scores
    after it, in later documents too, may move."""
    toks = phrase_stream(LENGTHS, seed=3)
    ta = _tilt(toks)
    ha = ta.hint.numpy()
    j = int(next(p for p in range(np.flatnonzero(toks == BOS)[2] + 5, toks.size) if ha[p + 1] >= 0))  # ends a context
    other = toks.copy()
    other[j] = (int(toks[j]) - 2 + 5) % (V - 2) + 2
    tb = _tilt(other)
    hb = tb.hint.numpy()
    assert np.array_equal(ha[:j + 1], hb[:j + 1]) and not np.array_equal(ha[j + 1:], hb[j + 1:])
    a, b = scorer(tmp_path, toks, "a", ta), scorer(tmp_path, other, "b", tb)
    assert np.array_equal(a["pos"], b["pos"]) and a["pos"].tolist() == list(range(1, toks.size))
    assert np.array_equal(a["nll"][:j - 1], b["nll"][:j - 1])  # nll index i is the target at position i + 1
    plain = scorer(tmp_path, toks, "plain", None)
    assert np.count_nonzero(plain["nll"] != a["nll"]) == np.count_nonzero(ha[1:] >= 0) > 0  # tilted where hinted


@pytest.mark.parametrize("scorer", [sliding, ttt])
def test_boost_zero_scores_exactly_as_no_tilt(tmp_path, scorer):
    toks = phrase_stream(LENGTHS, seed=4)
    zero = scorer(tmp_path, toks, "zero", _tilt(toks, boost=0.0))
    none = scorer(tmp_path, toks, "none", None)
    assert all(np.array_equal(zero[k], none[k]) for k in ("pos", "nll", "bytes"))


def _hints_on_ranks(rank, world, port, toks, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        dinfo = DistInfo(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
        np.save(f"{out}{rank}.npy", hints(toks, 4, 0.8, dinfo).numpy())
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_merge_to_the_one_rank_hints(tmp_path, free_port):
    import torch.multiprocessing as mp

    toks = phrase_stream(LENGTHS * 2, seed=5)
    mp.spawn(_hints_on_ranks, args=(2, free_port, toks, str(tmp_path / "h")), nprocs=2, join=True)
    want = reference_hints(toks, 4, 0.8)
    assert all(np.array_equal(np.load(tmp_path / f"h{r}.npy"), want) for r in range(2))


def test_ngram_knobs_are_validated_and_the_record_preset_runs_2135s():
    cfg = make_config("record")
    assert (cfg.ngram_tilt, cfg.ngram_order, cfg.ngram_threshold, cfg.ngram_boost) == (True, 16, 0.8, 2.625)
    assert not make_config("demo").ngram_tilt and not make_config("tiny").ngram_tilt
    for bad in (dict(ngram_order=1), dict(ngram_threshold=0.0), dict(ngram_threshold=1.5), dict(ngram_boost=-1.0),
                dict(ngram_boost=math.inf)):
        with pytest.raises(ConfigError, match=next(iter(bad)).upper()):
            make_config("tiny", **bad)


def test_tiny_run_with_the_tilt_logs_it_and_charges_it(tmp_path, demo_data):
    """Order 2 on the tiny preset's val split: hints fire, and every scored stage, TTT too, is tilted and charged."""
    from test_pipeline import run_entry

    knobs = {"NGRAM_TILT": "1", "NGRAM_ORDER": "2", "NGRAM_THRESHOLD": "0.3", "TTT_ENABLED": "1"}
    proc = run_entry(tmp_path, demo_data, "tilt", extra_env=knobs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "logs" / "tilt.txt").read_text()
    lines = [x for x in log.splitlines() if x.startswith("ngram_tilt: order 2 threshold 0.3 boost 2.625 hinted ")]
    assert len(lines) == 1 and int(lines[0].split("hinted ")[1].split("/")[0]) > 0  # built once per run
    assert "stage:eval_quantized_lcq_ttt" in log and "within_eval_budget:yes" in log
