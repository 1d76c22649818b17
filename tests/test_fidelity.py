"""`bench fidelity`'s config (lcq/bench_fidelity.py): the record preset laid over the demo, scaled to its dimensions.
Known answers from the preset itself, so the test holds after the record preset changes."""
from lcq import config as C
from lcq.tools.bench import scaled_features
from lcq.tools.bench_fidelity import FIDELITY_KEEP, FIDELITY_MLP_MULT, RECORD_VAL_DOCS, fidelity_config


def demo():
    cfg, _ = C.resolve(["--preset", "demo"], env={})
    return cfg


def test_record_values_over_the_demo_dims():
    cfg = demo()
    out = fidelity_config(cfg, 80, 9, 4000)
    feats = {k: v for g in scaled_features(cfg).values() for k, v in g.items()}
    scaled = {"eval_seq_len", "ttt_phase_docs", "lcq_bytes"}
    for k, v in C.PRESETS["record"].items():
        if k in FIDELITY_KEEP or k in scaled:
            continue
        assert getattr(out, k) == feats.get(k, v), k  # the record's value, or its layer index scaled to 4 layers
    for k in ("num_layers", "model_dim", "vocab_size", "data_path", "train_seq_len", "train_batch_tokens"):
        assert getattr(out, k) == getattr(cfg, k), k
    assert (out.recur_start_layer, out.recur_end_layer, out.parallel_start_layer, out.xsa_last_n) == (1, 2, 3, 4)
    assert out.mlp_mult == FIDELITY_MLP_MULT and out.iterations == 80 and out.lcq_max_steps == 0
    assert out.lcq_bytes == "4000" and out.seed == cfg.seed


def test_lengths_and_document_counts_scale(monkeypatch):
    # #2135's eval context 2560 at train 2048 -> 320 at the demo's 256; 2,500 of 50,000 documents -> 5% of the split
    monkeypatch.setitem(C.PRESETS, "record", {**C.PRESETS["record"], "eval_seq_len": 2560, "ttt_phases": 1,
                                              "ttt_phase_docs": 2500})
    out = fidelity_config(demo(), 300, 1000, 4000)
    assert out.eval_seq_len == 320 and out.window == 320
    assert out.ttt_phase_docs == round(2500 * 1000 / RECORD_VAL_DOCS) == 50
    # never fewer prefix documents than phases (TTT_PHASE_DOCS >= TTT_PHASES)
    assert fidelity_config(demo(), 300, 9, 4000).ttt_phase_docs == 1
