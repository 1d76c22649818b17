import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lcq.config import make_config
from lcq.data import doc_starts
from lcq.dist import DistInfo
from lcq.evaluate import evaluate, plan_windows
from lcq.model import GPT
from lcq.tokenizer import ByteTables

BOS, V = 1, 64
CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def synthetic_tables():
    ids = torch.arange(V)
    boundary = ids < 2
    base = torch.where(boundary, 0, ids % 3 + 1).to(torch.int16)
    return ByteTables(base, (ids % 2 == 0) & ~boundary, boundary)


def val_stream(lengths, seed=0):
    g = np.random.default_rng(seed)
    docs = [np.concatenate([[BOS], g.integers(2, V, n - 1)]) for n in lengths]
    return np.concatenate(docs).astype(np.uint16)


def model():
    torch.manual_seed(0)
    m = GPT(make_config("tiny", vocab_size=V), bos_id=BOS)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


@pytest.mark.parametrize("lengths", [[1, 2, 5, 40, 17], [100], [33, 64, 65, 3]])
@pytest.mark.parametrize("window,stride", [(8, 8), (8, 3), (8, 1), (16, 5), (32, 32), (4, 4)])
def test_each_target_scored_exactly_once_inside_its_document(lengths, window, stride):
    toks = val_stream(lengths)
    starts = doc_starts(toks, BOS)
    plan = plan_windows(starts, toks.size, window, stride)
    counts = np.zeros(toks.size, dtype=int)
    doc_of = np.searchsorted(starts, np.arange(toks.size), side="right") - 1
    for begin, end, score_from in plan:
        assert 0 < end - begin <= window
        assert begin <= score_from < end
        assert doc_of[begin] == doc_of[end]  # input tokens and last target inside one document
        for p in range(score_from, end):
            counts[p + 1] += 1  # target of input position p
            ctx = p - begin + 1
            doc_start = starts[doc_of[p]]
            # longest available context: from the document start, or at least window - stride tokens
            assert begin == doc_start or ctx >= window - stride + 1
    expected = np.ones(toks.size, dtype=int)
    expected[starts] = 0  # a document's first token is never a target
    assert counts.tolist() == expected.tolist()


def test_stride_equals_window_is_plain_chunked_eval():
    m, tables = model(), synthetic_tables()
    toks = val_stream([30, 9, 50, 2])
    res = evaluate(m, toks, BOS, tables, window=16, stride=16, batch_tokens=40, dinfo=CPU)
    nll, n, nbytes = 0.0, 0, 0
    starts = doc_starts(toks, BOS).tolist() + [toks.size]
    t = torch.from_numpy(toks.astype(np.int64))
    with torch.no_grad():
        for s, e in zip(starts[:-1], starts[1:]):
            for c in range(s, e - 1, 16):  # plain eval: non-overlapping chunks of each document
                x, y = t[c:min(c + 16, e - 1)], t[c + 1:min(c + 17, e)]
                logits = m(x, torch.tensor([0, x.numel()], dtype=torch.int32), 16)
                nll += F.cross_entropy(logits, y, reduction="sum").item()
                n += y.numel()
                nbytes += int((tables.base_bytes[y].int() + (tables.has_leading_space[y] & ~tables.is_boundary[x]).int()).sum())
    assert res.tokens == n == toks.size - 4
    assert res.bytes == nbytes
    assert res.val_loss == pytest.approx(nll / n, rel=1e-5)
    assert res.val_bpb == pytest.approx(nll / math.log(2) / nbytes, rel=1e-5)


def test_sliding_scores_equal_brute_force_per_target_context():
    """Packing windows into batches must give each target exactly the logits of its context run alone."""
    m, tables = model(), synthetic_tables()
    toks = val_stream([23, 5, 30])
    window, stride = 8, 3
    res = evaluate(m, toks, BOS, tables, window=window, stride=stride, batch_tokens=20, dinfo=CPU)
    t = torch.from_numpy(toks.astype(np.int64))
    nll = 0.0
    with torch.no_grad():
        for begin, end, score_from in plan_windows(doc_starts(toks, BOS), toks.size, window, stride):
            for p in range(score_from, end):
                x = t[begin:p + 1]
                logits = m(x, torch.tensor([0, x.numel()], dtype=torch.int32), window)
                nll += F.cross_entropy(logits[-1:], t[p + 1:p + 2], reduction="sum").item()
    assert res.tokens == toks.size - 3
    assert res.val_loss * res.tokens == pytest.approx(nll, rel=1e-5)
