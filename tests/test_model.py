import pytest
import torch

from lcq.config import make_config
from lcq.data import segment_bounds
from lcq.model import GPT, gptq_targets

BOS = 1


def randomised_model(cfg=None, **overrides):
    """A tiny model (or one of `cfg`) whose zero-initialised projections are filled in, so every path carries signal."""
    torch.manual_seed(0)
    model = GPT(cfg or make_config("tiny", vocab_size=128, **overrides), bos_id=BOS)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def packed_docs():
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(2, 128, (n,), generator=g) for n in (12, 30, 7, 25)]
    for d in docs:
        d[0] = BOS
    return docs, torch.cat(docs)


# The record stack (issue 11) at 4 layers: XSA, LN scale, QK gain 5, gated skips, layers 1-2 looped 3 times, lanes
# from layer 3, sparse attention gate; SmearGate stays BOS-masked under all of them.
RECORD_STACK = {"num_layers": 4, "xsa_last_n": 4, "ln_scale": True, "skip_gates": True, "qk_gain_init": 5.0,
                "recur_passes": 3, "recur_start_layer": 1, "recur_end_layer": 2, "parallel_start_layer": 3,
                "attn_gate_window": 12, "attn_gate_scale": 0.5}
# ... and on #1855's own SmearGate, resid_mix and init (issue 19), as the record preset runs them.
RECORD_VARIANTS = {**RECORD_STACK, "smear_gate": "input", "resid_mix": True, "init": "orthogonal"}


@pytest.mark.parametrize("flags", [{}, {"smear_gate": False, "unet_skips": False, "qk_norm": False, "mlp_act": "relu2"},
                                   RECORD_STACK, RECORD_VARIANTS])
def test_document_isolation_and_causality_through_full_model(flags):
    model = randomised_model(**flags)
    docs, ids = packed_docs()
    cu = segment_bounds(ids, BOS, 128)
    assert cu.tolist() == [0, 12, 42, 49, 74]
    with torch.no_grad():
        base = model(ids, cu, 128)
        # Changing a token of document 1 (positions 12..41) changes no score of any other document.
        changed = ids.clone()
        changed[20] = (changed[20] + 5) % 128
        out = model(changed, cu, 128)
        assert torch.equal(out[:12], base[:12]) and torch.equal(out[42:], base[42:])
        assert not torch.allclose(out[20:42], base[20:42])
        # Changing a later token changes no earlier score (causality), including inside its own document.
        assert torch.equal(out[:20], base[:20])
        # The last token of document 1 must not leak into document 2's BOS (the SmearGate leak).
        changed2 = ids.clone()
        changed2[41] = (changed2[41] + 7) % 128
        out2 = model(changed2, cu, 128)
        assert torch.equal(out2[42:], base[42:])


@pytest.mark.parametrize("flags", [{}, RECORD_STACK, RECORD_VARIANTS])
def test_each_document_alone_equals_packed(flags):
    model = randomised_model(**flags)
    docs, ids = packed_docs()
    cu = segment_bounds(ids, BOS, 128)
    with torch.no_grad():
        packed = model(ids, cu, 128)
        alone = torch.cat([model(d, torch.tensor([0, d.numel()], dtype=torch.int32), 128) for d in docs])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


def test_tied_embedding_and_stable_names():
    model = randomised_model()
    assert model.lm_head.weight is model.tok_emb.weight
    targets = gptq_targets(model)
    assert targets["tok_emb.weight"] == "lm_head"
    assert targets["blocks.0.attn.c_q.weight"] == "blocks.0.attn.c_q"
    names = {n.split(".", 2)[2] for n in targets if n.startswith("blocks.1.")}
    assert names == {"attn.c_q.weight", "attn.c_k.weight", "attn.c_v.weight", "attn.proj.weight", "mlp.fc.weight", "mlp.proj.weight"}


def test_softcap_bounds_logits():
    model = randomised_model(logit_softcap=2.0)
    _, ids = packed_docs()
    with torch.no_grad():
        logits = model(ids, segment_bounds(ids, BOS, 128), 128)
    assert logits.abs().max() <= 2.0


def test_segment_bounds_split_long_documents():
    ids = torch.tensor([BOS] + [5] * 9 + [BOS] + [6] * 3)
    assert segment_bounds(ids, BOS, 4).tolist() == [0, 4, 8, 10, 12, 14]
    assert segment_bounds(ids, BOS, 100).tolist() == [0, 10, 14]


def test_q_k_v_share_one_hessian_equal_to_their_own_inputs():
    """c_k and c_v are calibrated at c_q's hook: the sum a hook on each of them would collect is the same one."""
    from lcq.gptq import collect_hessians

    model = randomised_model()
    _, ids = packed_docs()
    cu = segment_bounds(ids, BOS, 128)
    targets = gptq_targets(model)
    assert targets["blocks.1.attn.c_k.weight"] == targets["blocks.1.attn.c_v.weight"] == "blocks.1.attn.c_q"
    own = {w: w[:-len(".weight")] for w in ("blocks.1.attn.c_q.weight", "blocks.1.attn.c_k.weight",
                                           "blocks.1.attn.c_v.weight")}
    with torch.no_grad():
        shared = collect_hessians(model, targets, lambda: model(ids, cu, 128))
        separate = collect_hessians(model, own, lambda: model(ids, cu, 128))
    for w in own:
        assert torch.equal(shared[w], separate[w])
