"""TTT_CONTEXT=reuse (issue 26): chunks run only their new tokens and read their window's keys and values from the KV
cache (lcq/kvcache.py). Known answers: with the adapters frozen it scores every target as recompute does (documents
that fit the window: the same computation) and as one whole-document forward whose queries see exactly recompute's
window (longer documents); score-first holds; batch 1 == batch 16; the cache's bytes are its buffers'."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lcq.model
from lcq.tools.bench_ttt import cache_bytes
from lcq.config import make_config
from lcq.data import doc_starts
from lcq.evaluate import document_spans
from lcq.lora import attach_lora, lora_modules
from lcq.model import GPT
from lcq.ttt import doc_chunks, evaluate_ttt, make_cache, prepare_adapter

from test_evaluate import BOS, V, synthetic_tables, val_stream
from test_ttt import CPU, spec
from test_ttt_batched import RECORD_TARGETS

WINDOW, CHUNK = 32, 8
# every record-preset model feature reuse must carry: XSA, looped layers (one ring per pass), parallel lanes, #1855's
# input SmearGate, the sparse attention gate, partial RoPE, resid_mix, gated U-Net skips, LN scale, softcap
FEATURES = dict(num_layers=4, xsa_last_n=4, recur_passes=2, recur_start_layer=1, recur_end_layer=2,
                parallel_start_layer=3, attn_gate_window=8, smear_gate="input", resid_mix=True, skip_gates=True,
                ln_scale=True, rope_dims=8)


def model(smear="input"):
    """A record-shaped tiny GPT with random weights (the SmearGate open), a shipped-like LoRA (B != 0) on c_v and the
    record's TTT targets around it."""
    torch.manual_seed(0)
    cfg = make_config("tiny", vocab_size=V, ttt_rank=2, ttt_targets=RECORD_TARGETS, **{**FEATURES, "smear_gate": smear})
    m = GPT(cfg, bos_id=BOS)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        if smear == "input":
            m.smear.lam.fill_(0.7)
    attach_lora(m, ["blocks.*.attn.c_v"], 2, 4.0)
    for w in lora_modules(m).values():
        torch.nn.init.normal_(w.lora_B, std=0.1)
    return prepare_adapter(m, "artifact", cfg)


def run(tmp_path, toks, context, name, val_bytes=None, smear="input", **kw):
    path = tmp_path / f"{name}.npz"
    res = evaluate_ttt(model(smear), toks, BOS, synthetic_tables(), WINDOW, CHUNK, 64, CPU,
                       spec(**{**dict(batch_docs=4, chunk_tokens=CHUNK, beta1=0.0, beta2=0.99, context=context), **kw}),
                       val_bytes=val_bytes, dump=str(path))
    with np.load(path) as z:
        return {k: z[k] for k in z.files}, res


FROZEN = dict(lr=0.0, steps=1)  # the adapters never move (TTT LR 0, no phases); the training step still runs
# float32 rounding only: the two paths sum the same attention terms in another order (~1e-7 relative per op)
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("smear", ["input", "blend"])
def test_frozen_reuse_scores_every_target_as_recompute(tmp_path, smear):
    """Documents that fit the window (recompute's windows all start at the document start) in batches of 4 of
    different lengths, with a CaseOps-style byte sidecar: the same targets, bytes and nll."""
    toks = val_stream([13, 7, 30, 12, 2, 32, 18, 9, 25], seed=4)
    side = np.random.default_rng(0).integers(0, 5, toks.size).astype(np.int16)
    a, ra = run(tmp_path, toks, "recompute", "a", side, smear, **FROZEN)
    b, rb = run(tmp_path, toks, "reuse", "b", side, smear, **FROZEN)
    assert a["pos"].tolist() == list(range(1, toks.size)) and np.array_equal(a["pos"], b["pos"])
    assert ra.bytes == rb.bytes == int(side[1:].sum())
    np.testing.assert_allclose(b["nll"], a["nll"], **TOL)


def test_frozen_reuse_cuts_a_long_window_where_recompute_does(tmp_path, monkeypatch):
    """Documents up to 3.5 windows long: reuse == one forward over each whole document in which the query at t attends
    exactly to the keys of recompute's window for t ([begin of t's chunk, t]), keys computed once per token: the
    truncation, the positions (RoPE is relative) and the SmearGate's previous token are recompute's."""
    lengths = [112, 45, 70]
    toks = val_stream(lengths, seed=8)
    got, _ = run(tmp_path, toks, "reuse", "r", batch_docs=2, **FROZEN)
    m = model()
    ref = []
    for first, end in document_spans(doc_starts(toks, BOS), toks.size).tolist():
        n = end - first
        begin = np.zeros(n, dtype=np.int64)
        for b, e, lo in doc_chunks(first, end, WINDOW, CHUNK, CHUNK).tolist():
            begin[lo - first:e - first] = b - first
        t = torch.arange(n)
        mask = (t[None, :] >= torch.from_numpy(begin)[:, None]) & (t[None, :] <= t[:, None])

        def dense(q, k, v, cu, max_seqlen, backend="sdpa"):
            h = q.shape[1]
            k, v = (z.repeat_interleave(h // z.shape[1], 1).transpose(0, 1) for z in (k, v))
            return F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=mask).transpose(0, 1)
        monkeypatch.setattr(lcq.model, "varlen_attention", dense)
        x = torch.from_numpy(toks[first:end].astype(np.int64))
        y = torch.from_numpy(toks[first + 1:end + 1].astype(np.int64))
        with torch.no_grad():
            ref.append(F.cross_entropy(m(x, torch.tensor([0, n], dtype=torch.int32), n), y, reduction="none"))
    monkeypatch.undo()
    np.testing.assert_allclose(got["nll"], torch.cat(ref).numpy(), **TOL)
    # and the cut matters: recompute re-runs the context from the window start, so past the first window it differs
    rec, _ = run(tmp_path, toks, "recompute", "c", batch_docs=2, **FROZEN)
    assert np.abs(rec["nll"] - got["nll"]).max() > 1e-3


LEARN = dict(lr=3e-2, steps=2, phases=2, phase_docs=8, phase_lr=3e-2, phase_momentum=0.9, phase_clip=1.0,
             phase_cosine=True, phase_tokens=96)


def test_reuse_batch_of_16_scores_as_one_at_a_time(tmp_path):
    """Learning adapters (2 steps a chunk, the second re-reading the cache), two global phases, documents longer and
    shorter than the window: every target as one at a time, within float rounding (bound: test_ttt_batched)."""
    toks = val_stream([13, 7, 80, 12, 2, 45, 18, 9, 17, 5, 23, 11, 3, 14, 6, 70, 10, 4], seed=4)
    one, _ = run(tmp_path, toks, "reuse", "one", batch_docs=1, **LEARN)
    many, _ = run(tmp_path, toks, "reuse", "many", batch_docs=16, **LEARN)
    assert np.array_equal(one["pos"], many["pos"])
    np.testing.assert_allclose(many["nll"], one["nll"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("phases", [0, 2])
def test_reuse_perturbing_a_token_changes_no_score_at_or_before_it(tmp_path, phases):
    """Score-first (C3) under reuse: a token changed at stream offset t (past its document's first window, so it
    reaches later scores through the cache) leaves every target before it bit for bit (lengths: stream order = scoring
    order); later targets of its document move."""
    toks = val_stream([90, 50, 30, 20], seed=1)
    starts = doc_starts(toks, BOS)
    t = int(starts[1] + 40)
    other = toks.copy()
    other[t] = (int(toks[t]) - 2 + 7) % (V - 2) + 2
    kw = dict(batch_docs=1, lr=3e-2, steps=1, phases=phases, phase_docs=3 if phases else 0, phase_lr=3e-2)
    a, _ = run(tmp_path, toks, "reuse", "a", **kw)
    b, _ = run(tmp_path, other, "reuse", "b", **kw)
    assert np.array_equal(a["nll"][:t - 1], b["nll"][:t - 1])
    assert not np.array_equal(a["nll"][t:starts[2] - 1], b["nll"][t:starts[2] - 1])


def test_cache_reads_carry_no_gradient_and_its_bytes_are_its_buffers():
    m = model()
    kv = make_cache(m, spec(batch_docs=3, chunk_tokens=CHUNK, context="reuse"), WINDOW, CPU.device)
    assert len(kv.layers) == len(m.layer_order()) == 6  # 4 layers, layers 1-2 twice: one ring per pass
    att = m.blocks[0].attn.base if hasattr(m.blocks[0].attn, "base") else m.blocks[0].attn
    assert sum(t.nbytes for lay in kv.layers for t in (lay.k, lay.v)) == cache_bytes(
        6, 3, WINDOW, att.num_kv_heads, att.head_dim, 4)
    toks = torch.from_numpy(val_stream([40, 20, 9], seed=3).astype(np.int64))
    for rows in ([[0, 8, 0], [40, 48, 40], [0, 0, 0]], [[0, 16, 8], [40, 50, 48], [0, 0, 0]]):
        kv.plan(np.array(rows), toks, 8)
        x = toks[(torch.from_numpy(np.array(rows)[:, 2:]) + torch.arange(8)).clamp_max(toks.numel() - 1).ravel()]
        m(x, torch.arange(0, 25, 8, dtype=torch.int32), 8, kv).sum().backward()
        kv.write = False
        assert not any(t.requires_grad or t.grad_fn for lay in kv.layers for t in (lay.k, lay.v))
    assert kv.kpos[0].tolist().count(-1) == WINDOW + 1 - 16 and sorted(kv.kpos[1][kv.kpos[1] >= 0].tolist()) == \
        list(range(40, 50))  # slot 1's second chunk held only 2 real tokens: the pads went to the trash column


def _frozen_on_ranks(rank, world, port, out):
    import torch.distributed as dist

    from lcq.dist import DistInfo

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        dinfo = DistInfo(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
        for ctx in ("recompute", "reuse"):
            evaluate_ttt(model(), val_stream(RANK_LENGTHS, seed=7), BOS, synthetic_tables(), WINDOW, CHUNK, 64, dinfo,
                         spec(batch_docs=2, chunk_tokens=CHUNK, beta1=0.0, beta2=0.99, context=ctx, **FROZEN),
                         dump=f"{out}.{ctx}.npz")
    finally:
        dist.destroy_process_group()


RANK_LENGTHS = [13, 7, 30, 12, 2, 32, 18, 9]


def test_frozen_reuse_equals_recompute_on_two_gloo_ranks(tmp_path, free_port):
    import torch.multiprocessing as mp

    mp.spawn(_frozen_on_ranks, args=(2, free_port, str(tmp_path / "two")), nprocs=2, join=True)
    with np.load(tmp_path / "two.recompute.npz") as a, np.load(tmp_path / "two.reuse.npz") as b:
        assert a["pos"].tolist() == list(range(1, sum(RANK_LENGTHS))) and np.array_equal(a["pos"], b["pos"])
        np.testing.assert_allclose(b["nll"], a["nll"], **TOL)
