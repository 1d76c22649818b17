"""Batched score-first TTT (issue 15): TTT_BATCH_DOCS changes how many documents run side by side, never a score; no
document of a batch reads another (padding, empty slots and finished documents add no score and no gradient); the
chunk forward compiles to one graph per padded shape; the rank split is deterministic and balanced."""

import numpy as np
import pytest
import torch

from lcq.config import make_config
from lcq.data import doc_starts
from lcq.lora import attach_lora, lora_modules
from lcq.model import GPT
from lcq.ttt import bucket, buckets, evaluate_ttt, prepare_adapter, split_batches

from test_evaluate import BOS, V, synthetic_tables, val_stream
from test_ttt import CPU, spec

WINDOW, STRIDE = 16, 8
LENGTHS = [13, 7, 21, 12, 2, 30, 18, 9, 17, 5, 23, 11, 3, 14, 6, 8, 10, 4]  # 18 documents: batches of 16 and 2


RECORD_TARGETS = make_config("record").ttt_targets  # #2135's: q, v, o and MLP (whole branches), lm_head (#1855: k too)


def model(init, targets="", **over):
    torch.manual_seed(0)
    cfg = make_config("tiny", vocab_size=V, ttt_rank=2, ttt_targets=targets, **over)
    m = GPT(cfg, bos_id=BOS)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    if init == "artifact":  # stands for the shipped LCQ LoRA: trained factors, B != 0
        attach_lora(m, ["blocks.*.attn.c_v"], 2, 4.0)
        for w in lora_modules(m).values():
            torch.nn.init.normal_(w.lora_B, std=0.1)
    return prepare_adapter(m, init, cfg)


def scores(tmp_path, toks, batch_docs, init="zero", name="s", targets="", **kw):
    """Per-target dump (stream order) of one TTT run."""
    path = tmp_path / f"{name}.npz"
    res = evaluate_ttt(model(init, targets), toks, BOS, synthetic_tables(), WINDOW, STRIDE, 64, CPU,
                       spec(**{**dict(batch_docs=batch_docs, chunk_tokens=8, beta1=0.0, beta2=0.99), **kw}), dump=str(path))
    with np.load(path) as z:
        return {k: z[k] for k in z.files}, res


@pytest.mark.parametrize("init,phases,targets", [("zero", 0, ""), ("zero", 2, ""), ("artifact", 2, ""),
                                                ("artifact", 0, RECORD_TARGETS)])
def test_batch_of_16_scores_every_target_as_one_at_a_time(tmp_path, init, phases, targets):
    toks = val_stream(LENGTHS, seed=4)
    kw = dict(phases=phases, phase_docs=12 if phases else 0, phase_momentum=0.9, phase_clip=1.0, phase_cosine=True,
              phase_tokens=48, targets=targets)
    one, r1 = scores(tmp_path, toks, 1, init, "one", **kw)
    many, r16 = scores(tmp_path, toks, 16, init, "many", **kw)
    assert one["pos"].tolist() == list(range(1, toks.size)) and np.array_equal(one["pos"], many["pos"])
    assert r1.bytes == r16.bytes
    # The same arithmetic on differently padded shapes: float32 rounding (~1e-7 relative per op) carried through a
    # document's few dozen Adam steps and the phases' SGD; 1e-4 relative is ~100x the spread seen on x86-64 and far
    # below what one step of the adapter moves a score (test_ttt: TTT learns inside a document).
    np.testing.assert_allclose(many["nll"], one["nll"], rtol=1e-4, atol=1e-5)
    assert np.abs(many["nll"] - one["nll"]).max() < np.abs(one["nll"] - one["nll"].mean()).max() * 1e-3


def test_no_document_of_a_batch_reads_another(tmp_path):
    """Perturb every token of one document: in a batch of 16 no score of any other document moves, bit for bit (rows
    are separate segments, a slot's factors only see its row, pads and finished slots are masked)."""
    toks = val_stream(LENGTHS, seed=5)
    starts = doc_starts(toks, BOS)
    d = 5  # the longest document: every other one finishes while it still runs
    other = toks.copy()
    other[starts[d] + 1:starts[d + 1]] = (toks[starts[d] + 1:starts[d + 1]].astype(int) - 2 + 3) % (V - 2) + 2
    a, _ = scores(tmp_path, toks, 16, name="a")
    b, _ = scores(tmp_path, other, 16, name="b")
    assert np.array_equal(a["nll"][a["doc"] != d], b["nll"][b["doc"] != d])
    assert not np.array_equal(a["nll"][a["doc"] == d], b["nll"][b["doc"] == d])


def test_chunk_forward_compiles_one_graph_per_padded_shape(tmp_path):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    toks = val_stream([40, 9, 25], seed=6)
    window = 48
    m = model("zero")
    logs = []
    evaluate_ttt(m, toks, BOS, synthetic_tables(), window, STRIDE, 256, CPU, spec(batch_docs=2), log=logs.append,
                 backend="eager")
    shapes = buckets(window)
    assert shapes == [16, 32, 48] and any(line.startswith("ttt_warmup: 3 shapes") for line in logs)
    # one graph per padded shape, all compiled by the warm-up: the scored pass itself compiles nothing new
    assert counters["stats"]["unique_graphs"] <= len(shapes)
    torch._dynamo.reset()


def test_ttt_phase_compiles_before_the_eval_clock(tmp_path):
    """Issue 27: a global phase trains the base weights through eval_forward (torch.compile(model, dynamic=True)) with
    gradients on and the LoRA wrappers in place, a graph the chunk forward never builds. The warm-up runs one phase step
    on synthetic tokens at lr 0, so no Dynamo frame is compiled after the ttt_warmup line, and the scores equal those
    of an uncompiled run (the warm-up moved no weight)."""
    from torch._dynamo.utils import counters

    toks = val_stream([13, 7, 21, 12, 9, 5], seed=7)
    kw = dict(batch_docs=2, chunk_tokens=8, phases=1, phase_docs=3, phase_tokens=48, phase_momentum=0.9, phase_clip=1.0,
              phase_cosine=True)
    eager = {}
    for name, compile_eval in (("eager", False), ("compiled", "eager")):  # "eager": dynamo's capture, no codegen
        torch._dynamo.reset()
        counters.clear()
        m = model("zero", num_layers=1)  # one block: Dynamo's capture is most of this test's time
        m.compile_eval = compile_eval  # configure_runtime sets "inductor" on CUDA with COMPILE=1
        frames, lines = [], []

        def log(line):
            lines.append(line)
            frames.append(counters["frames"]["total"])

        path = tmp_path / f"{name}.npz"
        evaluate_ttt(m, toks, BOS, synthetic_tables(), WINDOW, STRIDE, 64, CPU, spec(**kw), log=log, dump=str(path))
        with np.load(path) as z:
            eager[name] = z["nll"]
    warm = next(i for i, line in enumerate(lines) if line.startswith("ttt_warmup:"))
    assert any(line.startswith("ttt_phase:1/1") for line in lines[warm:]), lines
    assert frames[warm] > len(buckets(WINDOW)) and counters["frames"]["total"] == frames[warm], (frames, lines)
    torch._dynamo.reset()
    np.testing.assert_allclose(eager["compiled"], eager["eager"], rtol=1e-6, atol=1e-7)


def test_buckets_and_rank_split():
    assert [bucket(n, 2048) for n in (1, 17, 48, 256, 257, 2000, 2048)] == [16, 32, 64, 256, 512, 2048, 2048]
    assert len(buckets(2048)) <= 12
    costs = [9, 7, 7, 5, 3, 3, 1]
    owner = split_batches(costs, 3)
    assert owner == split_batches(costs, 3)
    load = [sum(c for c, o in zip(costs, owner) if o == r) for r in range(3)]
    assert max(load) - min(load) <= max(costs) and sorted(set(owner)) == [0, 1, 2]


def _ttt_on_ranks(rank, world, port, out):
    import torch.distributed as dist

    from lcq.dist import DistInfo

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        dinfo = DistInfo(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
        for i in range(2):  # two passes, each from a fresh model, as a run and its --eval_only would
            evaluate_ttt(model("zero"), val_stream(LENGTHS, seed=7), BOS, synthetic_tables(), WINDOW, STRIDE, 64,
                         dinfo, spec(**RANK_SPEC), dump=f"{out}{i}.npz")
    finally:
        dist.destroy_process_group()


# 18 documents in batches of 4 with two global phases (after 3 and 6 documents): 6 batches, two of them alone in a
# phase segment, so the split hands one rank nothing there and each phase step's rows come from both ranks
RANK_SPEC = dict(batch_docs=4, chunk_tokens=8, beta1=0.0, beta2=0.99, phases=2, phase_docs=6, phase_momentum=0.9,
                 phase_clip=1.0, phase_cosine=True, phase_tokens=48)


def test_two_gloo_ranks_reproduce_themselves_and_match_one_rank(tmp_path, free_port):
    """What --eval_only on the same number of ranks relies on: the rank split is a pure function of the costs and the
    world size, so a second 2-rank pass from a fresh model scores every target bit for bit as the first; and 1 rank vs
    2 ranks differ by float rounding only (the phases' gradients are summed over ranks in another order)."""
    import torch.multiprocessing as mp

    from lcq.evaluate import ValStream
    from lcq.ttt import schedule

    toks = val_stream(LENGTHS, seed=7)
    plan = lambda: schedule(ValStream(toks, BOS, synthetic_tables(), CPU.device), WINDOW, STRIDE, spec(**RANK_SPEC), 2)
    owners = [[o for _, _, o in plan()[3]] for _ in range(2)]
    assert owners[0] == owners[1] and sorted({r for o in owners[0] for r in o}) == [0, 1]
    mp.spawn(_ttt_on_ranks, args=(2, free_port, str(tmp_path / "two")), nprocs=2, join=True)
    runs = []
    for i in range(2):
        with np.load(tmp_path / f"two{i}.npz") as z:
            runs.append({k: z[k] for k in z.files})
    one, _ = scores(tmp_path, toks, 4, name="one", **{k: v for k, v in RANK_SPEC.items() if k != "batch_docs"})
    assert runs[0]["pos"].tolist() == list(range(1, toks.size)) and np.array_equal(runs[0]["pos"], one["pos"])
    assert all(np.array_equal(runs[0][k], runs[1][k]) for k in ("doc", "pos", "target", "nll", "bytes"))
    np.testing.assert_allclose(runs[0]["nll"], one["nll"], rtol=1e-4, atol=1e-5)  # bound: see test_batch_of_16_...
    assert np.array_equal(runs[0]["bytes"], one["bytes"])


def test_warm_start_a_makes_a_score_depend_on_the_documents_before_it_in_its_slot(tmp_path):
    """TTT_WARM_START_A=1 (#1855's and #2135's default) keeps a slot's A from one document to the next: perturbing the
    first-scored document then moves the scores of the documents after it in that slot, which the reset of A (the
    record preset's) rules out (docs/record-stack.md)."""
    toks = val_stream([30, 12, 9], seed=5)
    starts = doc_starts(toks, BOS)
    d = 0  # the longest document: scored first
    other = toks.copy()
    other[starts[d] + 1:starts[d + 1]] = (toks[starts[d] + 1:starts[d + 1]].astype(int) - 2 + 3) % (V - 2) + 2
    for warm in (False, True):
        a, _ = scores(tmp_path, toks, 1, name="a", warm_start_a=warm)
        b, _ = scores(tmp_path, other, 1, name="b", warm_start_a=warm)
        assert np.array_equal(a["nll"][a["doc"] != d], b["nll"][b["doc"] != d]) == (not warm)


def test_record_adapters_are_1855s_o_and_mlp_read_the_blocks_normed_input():
    """#1855 (its forward_ttt): q, k, v adapters on the projections, the o adapter reads the attention's normed input
    and the MLP adapter the MLP's normed input, each added to its branch's output before the branch scale; lm_head's
    reads the final norm. The record's TTT_TARGETS give exactly that without k (#2135's TTT_K_LORA=0), over a shipped
    LoRA (artifact start) too."""
    from lcq.lora import low_rank

    m = model("artifact", RECORD_TARGETS)  # shipped factors on every block's c_v, zero-started adapters elsewhere
    mods = lora_modules(m)
    names = ("attn", "attn.base.c_q", "attn.base.c_v", "mlp")
    want = {f"blocks.{i}.{n}" for i in range(2) for n in names} | {"lm_head"}
    assert set(mods) == want  # fc, proj and attn.proj carry none: the MLP keeps its fused kernel
    for w in mods.values():
        torch.nn.init.normal_(w.lora_B, std=0.1)
    seen = {}

    def grab(name):
        def hook(mod, args, out):
            seen[name] = (args[0].detach(), out.detach())
        return hook
    hooks = [mods[n].register_forward_hook(grab(n)) for n in ("blocks.1.attn", "blocks.1.mlp")]
    hooks += [mods[n].base.register_forward_hook(grab(n + ".base")) for n in ("blocks.1.attn", "blocks.1.mlp")]
    hooks.append(mods["blocks.1.attn.base.c_q"].register_forward_hook(grab("q")))
    toks = torch.from_numpy(val_stream([20, 11], seed=8).astype(np.int64))
    cu = torch.tensor([0, 12, toks.numel()], dtype=torch.int32)
    m(toks, cu, 12)
    for h in hooks:
        h.remove()
    scale = m.blocks[1].ln_scale  # the block's normed input: rms_norm(x) x its LN scale
    for n in ("blocks.1.attn", "blocks.1.mlp"):
        x, out = seen[n]
        w = mods[n]
        torch.testing.assert_close(x.pow(2).mean(-1).sqrt(), torch.full((x.shape[0],), scale), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out, seen[n + ".base"][1] + low_rank(x, w.lora_A, w.lora_B, w.scale))
    assert torch.equal(seen["blocks.1.attn"][0], seen["q"][0])  # o's input is what q reads


def test_bench_counts_what_reusing_the_context_would_save():
    """bench ttt's TTT_CONTEXT=reuse estimate on one 100-target document (window 64, chunks 16): 7 chunk forwards whose
    rows read 16, 32, 48, 64, 64, 64, 52 tokens (padded 16, 32, 48, 64, 64, 64, 64) for 16 x 6 + 4 new targets."""
    from lcq.tools.bench_ttt import projection

    p = projection(np.array([[100]]), window=64, chunk=16)
    assert p["ours_forward_tokens"] == 352 and p["reuse_forward_tokens"] == 16 * 7  # bucket(4) = 16
    n, new = np.array([16, 32, 48, 64, 64, 64, 52]), np.array([16] * 6 + [4])
    assert p["attention_pairs"] == int((n * (n + 1) // 2).sum()) == 9458
    assert p["reuse_attention_pairs"] == sum(sum(range(a - b + 1, a + 1)) for a, b in zip(n, new)) == 4090
