"""Score-first TTT (lcq/ttt.py): the targets are the sliding eval's, no target's nll depends on a token after it
(per-document reset, and with global phases), documents stay isolated without phases, and the stage reproduces from the
artifact alone."""

import re

import numpy as np
import pytest
import torch

from lcq.config import ConfigError, make_config
from lcq.data import doc_starts
from lcq.dist import DistInfo
from lcq.evaluate import dump_path, evaluate
from lcq.model import GPT
from lcq.ttt import TTTSpec, evaluate_ttt, prepare_adapter, resolve_init

from test_evaluate import BOS, V, synthetic_tables, val_stream

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
WINDOW, STRIDE = 16, 8


def spec(**kw):
    base = dict(chunk_tokens=6, steps=1, lr=3e-2, beta1=0.9, beta2=0.999, weight_decay=0.0, phases=0, phase_docs=0,
                phase_lr=3e-2)
    return TTTSpec(**{**base, **kw})


def adapted_model(rank=2):
    torch.manual_seed(0)
    cfg = make_config("tiny", vocab_size=V, ttt_rank=rank)
    m = GPT(cfg, bos_id=BOS)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return prepare_adapter(m, "zero", cfg)


def run_ttt(tmp_path, toks, name, model=None, **kw):
    m = model or adapted_model()
    res = evaluate_ttt(m, toks, BOS, synthetic_tables(), WINDOW, STRIDE, 64, CPU, spec(**kw),
                       dump=dump_path(str(tmp_path / "d.npz"), name))
    with np.load(tmp_path / f"d.{name}.npz") as z:
        return res, {k: z[k] for k in z.files}


def test_ttt_scores_the_sliding_targets_and_equals_sliding_at_lr_zero(tmp_path):
    toks = val_stream([30, 1, 45, 12])
    m = adapted_model()
    res, d = run_ttt(tmp_path, toks, "ttt", model=m, lr=0.0, phases=1, phase_docs=2, phase_lr=0.0)
    assert d["pos"].tolist() == list(range(1, toks.size)) and res.tokens == toks.size - 1
    slide = evaluate(m, toks, BOS, synthetic_tables(), WINDOW, STRIDE, 64, CPU,
                     dump=dump_path(str(tmp_path / "d.npz"), "s"))
    with np.load(tmp_path / "d.s.npz") as z:
        s_nll = z["nll"]
    assert res.bytes == slide.bytes
    # same contexts: a chunk cuts a window at its end, which causal attention makes invisible up to float rounding
    # (float32 logits of a 64-dim model: 1e-5 relative is ~100x the observed spread)
    np.testing.assert_allclose(d["nll"], s_nll, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("phases", [0, 2])
def test_perturbing_a_token_changes_no_score_at_or_before_it(tmp_path, phases):
    # Documents are scored longest first (then by index, #1855's order); these lengths make the stream order the scoring
    # order, so "before t" in the stream is also "scored before t"
    toks = val_stream([33, 25, 20, 18, 9], seed=1)
    starts = doc_starts(toks, BOS)
    t = int(starts[1] + 14)  # inside the second document, past its first chunk
    other = toks.copy()
    other[t] = (int(toks[t]) - 2 + 7) % (V - 2) + 2
    kw = dict(phases=phases, phase_docs=4 if phases else 0)
    _, a = run_ttt(tmp_path, toks, "a", **kw)
    _, b = run_ttt(tmp_path, other, "b", **kw)
    # nll index i is the target at stream position i + 1. Targets before t keep their nll bit for bit; target t itself
    # is the changed token (its nll reads the new id from a distribution computed without it).
    assert np.array_equal(a["nll"][:t - 1], b["nll"][:t - 1])
    assert not np.array_equal(a["nll"][t - 1:], b["nll"][t - 1:])
    later = starts[2]  # the documents after it: untouched by per-document reset, moved by a global phase after it
    assert np.array_equal(a["nll"][later:], b["nll"][later:]) == (phases == 0)


def test_without_phases_one_document_changes_no_score_of_another(tmp_path):
    toks = val_stream([25, 30, 22], seed=2)
    starts = doc_starts(toks, BOS)
    other = toks.copy()
    other[starts[1] + 1:starts[2]] = (toks[starts[1] + 1:starts[2]].astype(int) - 2 + 3) % (V - 2) + 2
    _, a = run_ttt(tmp_path, toks, "a")
    _, b = run_ttt(tmp_path, other, "b")
    doc = a["doc"]
    assert np.array_equal(a["nll"][doc != 1], b["nll"][doc != 1])
    assert not np.array_equal(a["nll"][doc == 1], b["nll"][doc == 1])


def test_ttt_learns_inside_a_document(tmp_path):
    """A document that repeats one random 8-token phrase: after a few chunks the adapted model predicts it better than
    the frozen one does (the sliding eval sees the same contexts)."""
    g = np.random.default_rng(3)
    phrase = g.integers(2, V, 8)
    toks = np.concatenate([[BOS], np.tile(phrase, 20)]).astype(np.uint16)
    m = adapted_model()
    frozen = evaluate(m, toks, BOS, synthetic_tables(), WINDOW, STRIDE, 64, CPU)
    res, _ = run_ttt(tmp_path, toks, "t", model=m)
    assert res.val_loss < frozen.val_loss


def test_ttt_knobs_are_validated():
    with pytest.raises(ConfigError, match="TTT_INIT"):
        make_config("tiny", ttt_enabled=True, ttt_init="artifact", lcq_rank="0")
    with pytest.raises(ConfigError, match="TTT_PHASE_DOCS"):
        make_config("tiny", ttt_phases=3, ttt_phase_docs=2)
    cfg = make_config("tiny", ttt_init="artifact")
    with pytest.raises(ValueError, match="TTT_INIT=artifact"):
        resolve_init(cfg, None)
    assert resolve_init(make_config("tiny"), {"merge": "side"}) == "artifact"
    assert resolve_init(make_config("tiny"), None) == "zero"


def test_tiny_run_logs_the_ttt_stage_and_eval_only_reproduces_it(tmp_path, demo_data):
    """In-run TTT (started from the shipped LoRA, with a global phase) and --eval_only on the artifact give the same
    _exact line: the adapter's start comes from the file alone (C1). With the asymmetric softcap on: its caps ship in
    the artifact and the phase adapts them (issue 24)."""
    from lcq import artifact
    from test_pipeline import REPO, exact, run_entry

    knobs = {"TTT_ENABLED": "1", "TTT_PHASES": "1", "TTT_PHASE_DOCS": "2", "EVAL_DUMP": str(tmp_path / "dump.npz"),
             "LOGIT_SOFTCAP_ASYM": "1"}
    proc = run_entry(tmp_path, demo_data, "ttt", extra_env=knobs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "logs" / "ttt.txt").read_text()
    assert "ttt: stage quantized_lcq_ttt init artifact" in log and "ttt_phase:1/1" in log
    assert "stage:eval_quantized_lcq_ttt" in log and "within_eval_budget:yes" in log
    in_run = exact(log, "quantized_lcq_ttt")
    tensors, _ = artifact.load(str(tmp_path / "logs" / "ttt.lcq"))
    assert tensors["softcap_pos"].item() == tensors["softcap_neg"].item() == 30.0  # training left them at the cap
    proc = run_entry(tmp_path, demo_data, "ttt_eval", "--eval_only", "--artifact", str(tmp_path / "logs" / "ttt.lcq"),
                     extra_env=dict(knobs, EVAL_DUMP=str(tmp_path / "again.npz")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert exact((tmp_path / "logs" / "ttt_eval.txt").read_text(), "quantized_lcq_ttt") == in_run
    with np.load(tmp_path / "dump.quantized_lcq_ttt.npz") as a, np.load(tmp_path / "again.quantized_lcq_ttt.npz") as b:
        assert all(np.array_equal(a[k], b[k]) for k in ("doc", "pos", "target", "nll", "bytes"))
    with np.load(tmp_path / "dump.quantized_lcq.npz") as z:  # every scored stage dumps; val_tokens = length - 1
        n = int(re.search(r"val_tokens:(\d+)", log).group(1))
        assert z["pos"].tolist() == list(range(1, n + 1))


def test_artifact_start_keeps_the_shipped_factors_and_adds_zero_adapters_elsewhere():
    from lcq.lora import attach_lora, lora_modules

    torch.manual_seed(0)
    cfg = make_config("tiny", vocab_size=V, ttt_rank=3)
    m = GPT(cfg, bos_id=BOS)
    attach_lora(m, ["blocks.*.attn.c_q"], 2, 4.0)  # stands for the shipped LoRA: trained factors, B != 0
    for w in lora_modules(m).values():
        torch.nn.init.normal_(w.lora_B)
    shipped = {n: (w.lora_A.detach().clone(), w.lora_B.detach().clone()) for n, w in lora_modules(m).items()}
    prepare_adapter(m, "artifact", cfg)
    mods = lora_modules(m)
    assert "lm_head" in mods and "blocks.0.mlp.fc" in mods and set(shipped) < set(mods)
    for n, (A, B) in shipped.items():
        assert mods[n].rank == 2 and torch.equal(mods[n].lora_A, A) and torch.equal(mods[n].lora_B, B)
    assert all(mods[n].rank == 3 and not mods[n].lora_B.any() for n in mods if n not in shipped)
    assert all(p.requires_grad == (".lora_" in n) for n, p in m.named_parameters())


def test_asymmetric_caps_move_in_the_global_phase_only(tmp_path):
    """#2135 adapts softcap_pos/neg in TTT's global phase alone: per-document TTT leaves them where the artifact put
    them; a phase moves them (a small cap, so the logits bend and the caps get a gradient)."""
    def caps(**kw):
        torch.manual_seed(0)
        cfg = make_config("tiny", vocab_size=V, ttt_rank=2, logit_softcap=1.0, logit_softcap_asym=True)
        m = GPT(cfg, bos_id=BOS)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        m = prepare_adapter(m, "zero", cfg)
        start = (m.softcap_pos.item(), m.softcap_neg.item())
        run_ttt(tmp_path, val_stream([30, 20, 25, 12]), "c", model=m, **kw)
        return start, (m.softcap_pos.item(), m.softcap_neg.item())

    start, after = caps()
    assert after == start
    start, after = caps(phases=1, phase_docs=2)
    assert after[0] != start[0] and after[1] != start[1]
