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


def test_asymmetric_softcap_at_the_scalar_cap_is_todays_logits_and_loss_bit_for_bit():
    """LOGIT_SOFTCAP_ASYM (#1923 -> #2130): both caps start at LOGIT_SOFTCAP, where the logits and the training loss are
    the scalar softcap's exactly; moved apart, each cap bends its own side, and the training loss (the fused CE's path)
    reads the same caps as the eval forward."""
    scalar = randomised_model(logit_softcap=2.0)  # a small cap, so the random logits bend
    asym = GPT(make_config("tiny", vocab_size=128, logit_softcap=2.0, logit_softcap_asym=True), bos_id=BOS).eval()
    assert asym.load_state_dict(scalar.state_dict(), strict=False).missing_keys == ["softcap_pos", "softcap_neg"]
    assert asym.softcap_pos.item() == asym.softcap_neg.item() == 2.0
    assert not asym.softcap_pos.requires_grad  # training leaves them at the cap (#2135): out of the optimizer
    _, ids = packed_docs()
    cu = segment_bounds(ids, BOS, 128)
    targets = torch.roll(ids, -1)
    with torch.no_grad():
        assert torch.equal(asym(ids, cu, 128), scalar(ids, cu, 128))
        assert torch.equal(asym.loss(ids, targets, cu, 128), scalar.loss(ids, targets, cu, 128))
        asym.softcap_pos.fill_(1.5)
        asym.softcap_neg.fill_(3.0)
        raw = asym.lm_head(asym.hidden(ids, cu, 128)).float()
        out = asym(ids, cu, 128)
        assert torch.equal(out, torch.where(raw >= 0, 1.5 * torch.tanh(raw / 1.5), 3.0 * torch.tanh(raw / 3.0)))
        assert out.max() < 1.5 and out.min() > -3.0
        torch.testing.assert_close(asym.loss(ids, targets, cu, 128), torch.nn.functional.cross_entropy(out, targets))


def test_asymmetric_caps_ship_as_raw_control_tensors():
    from lcq.gptq import QuantSpec, quantize_state, tensor_role

    model = GPT(make_config("tiny", vocab_size=128, logit_softcap_asym=True), bos_id=BOS)
    state = model.state_dict()
    assert [tensor_role(n, state[n]) for n in ("softcap_pos", "softcap_neg")] == ["raw", "raw"]
    tensors, _ = quantize_state(state, {}, QuantSpec(method="rtn"), {"lm_head.weight": "tok_emb.weight"})
    assert tensors["softcap_pos"].dtype == torch.float16 and tensors["softcap_pos"].item() == 30.0


# openai/parameter-golf #1855, train_gpt.py: GPT.__init__ splits the layer order (layers 3-5 three times once looping is
# on: encoder_indices/decoder_indices) at len(order) // 2 into encoder and decoder; _forward_hidden pushes every encoder
# output, and decoder step k (while k < num_skip_weights and the stack is not empty) pops the last one, scaled by
# skip_weights[k]. Rows: layer order, {decoder position: encoder position whose output it takes} (positions index the
# order); the last decoder position gets none. Lane 1 starts (layer 8) from the stream before lane 0 takes its skip.
SKIPS_1855 = {
    "plain": ([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], {5: 4, 6: 3, 7: 2, 8: 1, 9: 0}),
    "looped": ([0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10],
               {8: 7, 9: 6, 10: 5, 11: 4, 12: 3, 13: 2, 14: 1, 15: 0}),
}


@pytest.mark.parametrize("mode", sorted(SKIPS_1855))
def test_unet_skips_feed_the_decoder_positions_1855_feeds(mode):
    order, feeds = SKIPS_1855[mode]
    model = randomised_model(num_layers=11, skip_gates=True, recur_passes=3, recur_start_layer=3, recur_end_layer=5,
                             parallel_start_layer=8)
    model.recur_active = mode == "looped"
    assert model.layer_order() == order and model.skip_weights.shape[0] == 8  # #1855: num_skip_weights = 8
    calls, outputs, seen, lane_in = [0], {}, [], {}
    for block in model.blocks:
        block.attn.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))
        block.register_forward_hook(lambda m, a, out: outputs.__setitem__(calls[0] - 1, out))
    model.blocks[8].mlp.register_forward_pre_hook(lambda m, a: lane_in.setdefault("mlp", a[0]))
    add_skip = model._add_skip

    def spy(x, skip, k):
        seen.append((calls[0], k, next(e for e, out in outputs.items() if out is skip), x))
        return add_skip(x, skip, k)

    model._add_skip = spy
    _, ids = packed_docs()
    with torch.no_grad():
        model(ids, segment_bounds(ids, BOS, 128), 128)
    first = len(order) // 2
    assert {v: e for v, _, e, _ in seen} == feeds
    assert all(k == v - first for v, k, _, _ in seen)  # skip weight k at decoder step k
    v8 = order.index(8)
    pre = next(x for v, _, _, x in seen if v == v8)
    assert torch.equal(lane_in["mlp"], model.blocks[8].norm(pre))
