import pytest
import torch

from lcq.attention import resolve_backend, sdpa_varlen


def naive_per_document(q, k, v, cu):
    """Reference: plain causal softmax attention inside each document, one at a time."""
    h, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    out = torch.empty_like(q)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs = q[s:e].transpose(0, 1)
        ks = k[s:e].transpose(0, 1).repeat_interleave(h // hkv, 0)
        vs = v[s:e].transpose(0, 1).repeat_interleave(h // hkv, 0)
        scores = qs @ ks.transpose(1, 2) / d ** 0.5
        n = e - s
        scores = scores.masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool), 1), float("-inf"))
        out[s:e] = (scores.softmax(-1) @ vs).transpose(0, 1)
    return out


# Includes a max_seqlen above the packed length (all padding but one block) and one that is not a divisor of it.
@pytest.mark.parametrize("lengths,max_seqlen", [([5, 1, 17, 9], 17), ([32, 32, 32], 32), ([3, 40, 2, 61, 7], 64), ([1], 1),
                                                ([5, 3], 64), ([20, 20, 13], 21)])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)])
def test_sdpa_varlen_matches_naive(lengths, max_seqlen, heads):
    torch.manual_seed(0)
    h, hkv = heads
    n = sum(lengths)
    q, k, v = torch.randn(n, h, 8), torch.randn(n, hkv, 8), torch.randn(n, hkv, 8)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    got = sdpa_varlen(q, k, v, cu, max_seqlen)
    torch.testing.assert_close(got, naive_per_document(q, k, v, cu), atol=1e-5, rtol=1e-5)


def test_sdpa_varlen_no_cross_document_influence():
    torch.manual_seed(1)
    cu = torch.tensor([0, 10, 30, 45], dtype=torch.int32)
    q, k, v = torch.randn(45, 2, 4), torch.randn(45, 2, 4), torch.randn(45, 2, 4)
    base = sdpa_varlen(q, k, v, cu, 20)
    k2, v2 = k.clone(), v.clone()
    k2[10:30] += 5.0  # perturb only document 1
    v2[10:30] -= 3.0
    out = sdpa_varlen(q, k2, v2, cu, 20)
    assert torch.equal(out[:10], base[:10]) and torch.equal(out[30:], base[30:])
    assert not torch.allclose(out[10:30], base[10:30])


def test_flash_backends_refused_on_cpu():
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
    with pytest.raises(RuntimeError, match="ATTENTION_BACKEND=fa3"):
        resolve_backend("fa3", torch.device("cpu"))
