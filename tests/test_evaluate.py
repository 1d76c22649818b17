import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lcq.config import make_config
from lcq.data import doc_starts
from lcq.dist import DistInfo
from lcq.evaluate import dump_path, evaluate, plan_windows
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
        assert doc_of[begin] == doc_of[end - 1]  # every input token inside one document
        for p in range(score_from, end):
            counts[p + 1] += 1  # target of input position p
            ctx = p - begin + 1
            doc_start = starts[doc_of[p]]
            # longest available context: from the document start, or at least window - stride tokens
            assert begin == doc_start or ctx >= window - stride + 1
    expected = np.ones(toks.size, dtype=int)
    expected[0] = 0  # every token but the stream's first is a target, each following BOS included
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
            last = min(e, toks.size - 1)  # a document's inputs run up to the next BOS, its last target
            for c in range(s, last, 16):  # plain eval: non-overlapping chunks of each document
                x, y = t[c:min(c + 16, last)], t[c + 1:min(c + 17, last + 1)]
                logits = m(x, torch.tensor([0, x.numel()], dtype=torch.int32), 16)
                nll += F.cross_entropy(logits, y, reduction="sum").item()
                n += y.numel()
                nbytes += int((tables.base_bytes[y].int() + (tables.has_leading_space[y] & ~tables.is_boundary[x]).int()).sum())
    assert res.tokens == n == toks.size - 1
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
    assert res.tokens == toks.size - 1
    assert res.val_loss * res.tokens == pytest.approx(nll, rel=1e-5)


def dump_of(tmp_path, m, toks, stage="s", **kw):
    tables = synthetic_tables()
    base = tmp_path / "dump.npz"
    res = evaluate(m, toks, BOS, tables, window=kw.pop("window", 8), stride=kw.pop("stride", 3), batch_tokens=40,
                   dinfo=CPU, dump=dump_path(str(base), stage), **kw)
    with np.load(tmp_path / f"dump.{stage}.npz") as z:
        return res, {k: z[k] for k in z.files}


def test_every_token_but_the_streams_first_is_a_target_once(tmp_path):
    toks = val_stream([7, 1, 12, 30, 2])  # a one-token document: its BOS predicts the next BOS
    res, d = dump_of(tmp_path, model(), toks)
    assert res.tokens == toks.size - 1 == d["pos"].size
    assert d["pos"].tolist() == list(range(1, toks.size))
    assert d["target"].tolist() == toks[1:].astype(int).tolist()
    starts = doc_starts(toks, BOS)
    # a following BOS belongs to the document before it; the BOS tokens cost loss but no bytes
    assert d["doc"][starts[1:] - 1].tolist() == list(range(len(starts) - 1))
    assert (d["bytes"][starts[1:] - 1] == 0).all() and (d["nll"][starts[1:] - 1] > 0).all()
    assert d["nll"].dtype == np.float64 and res.val_loss * res.tokens == pytest.approx(d["nll"].sum(), rel=1e-9)
    assert res.bytes == d["bytes"].sum()


def test_following_bos_is_predicted_from_its_own_document_only(tmp_path):
    """Document d's scores, the BOS that ends it included, do not move when document d+1 changes (after its BOS)."""
    toks = val_stream([20, 25, 9])
    other = toks.copy()
    starts = doc_starts(toks, BOS)
    other[starts[1] + 1:starts[2]] = (other[starts[1] + 1:starts[2]] - 2 + 5) % (V - 2) + 2  # every token differs
    assert (other[starts[1] + 1:starts[2]] != toks[starts[1] + 1:starts[2]]).all()
    m = model()
    _, a = dump_of(tmp_path, m, toks, "a")
    _, b = dump_of(tmp_path, m, other, "b")
    upto = starts[1]  # targets 1..starts[1]: document 0, its following BOS last
    assert np.array_equal(a["nll"][:upto], b["nll"][:upto])
    after = starts[2] - 1  # document 2 (and the BOS that opens it, predicted by document 1) is another matter
    assert np.array_equal(a["nll"][after + 1:], b["nll"][after + 1:])
    assert not np.array_equal(a["nll"][upto:after + 1], b["nll"][upto:after + 1])


def test_byte_sidecar_overrides_the_piece_tables(tmp_path):
    toks = val_stream([15, 22])
    m, tables = model(), synthetic_tables()
    plain = evaluate(m, toks, BOS, tables, window=8, stride=4, batch_tokens=40, dinfo=CPU)
    t = torch.from_numpy(toks.astype(np.int64))
    same = np.zeros(toks.size, dtype=np.int64)  # the tables' own bytes as a sidecar: identical result
    space = tables.has_leading_space[t[1:]] & ~tables.is_boundary[t[:-1]]
    same[1:] = (tables.base_bytes[t[1:]].int() + space.int()).numpy()
    res_same = evaluate(m, toks, BOS, tables, 8, 4, 40, CPU, val_bytes=same)
    assert (res_same.bytes, res_same.val_bpb) == (plain.bytes, pytest.approx(plain.val_bpb, rel=1e-12))
    three = np.full(toks.size, 3, dtype=np.int64)
    res3 = evaluate(m, toks, BOS, tables, 8, 4, 40, CPU, val_bytes=three)
    assert res3.bytes == 3 * (toks.size - 1)  # the stream's first token is never a target
    assert res3.val_bpb == pytest.approx(plain.val_loss * plain.tokens / math.log(2) / res3.bytes, rel=1e-9)
    with pytest.raises(ValueError, match="val_bytes"):
        evaluate(m, toks, BOS, tables, 8, 4, 40, CPU, val_bytes=three[:-1])
