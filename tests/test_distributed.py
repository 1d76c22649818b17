"""Issue 18 across ranks: banked, sharded Muon against the per-matrix single-rank update it replaced
(reference_muon_step), the step bench, SERIALIZE_THREADS, and a failure on rank 0 ending every rank.


Shapes are chosen so that banks are smaller than, equal to and larger than the world (3, 8 and 9 matrices on 8 ranks:
padding, an exact split and two matrices per rank). All are far from square: a random square matrix has singular
values near 0, where 5 Newton-Schulz steps amplify the bf16 roundings of the sharded path beyond any fixed bound."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from lcq.tools.bench_step import reference_muon_step
from lcq.optim import GradSync, Muon, row_normalize

SHAPES = [(16, 8)] * 3 + [(8, 24)] * 8 + [(6, 14)] * 9
OTHER_SHAPES = [(10,), (4, 4)]
LR, MOM, WD, STEPS = 0.05, 0.95, 0.04, 2


def make_params():
    torch.manual_seed(0)
    return ([nn.Parameter(torch.randn(s) * 0.1) for s in SHAPES], [nn.Parameter(torch.randn(s)) for s in OTHER_SHAPES])


def rank_grads(rank: int, step: int):
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return [torch.randn(s, generator=gen) for s in SHAPES + OTHER_SHAPES]


def _worker(rank, world, port, out, row_norm):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        mats, others = make_params()
        muon = Muon(mats, lr=LR, momentum=MOM, backend_steps=5, weight_decay=WD, ns_coeffs="polar_express",
                    row_normalize=row_norm, world=world)
        sync = GradSync(muon, others, world)
        for step in range(STEPS):
            sync.armed = True
            # d loss / d p = this rank's gradient for p: backward fires the gradient hooks that send the buckets
            sum((p * g).sum() for p, g in zip(mats + others, rank_grads(rank, step))).backward()
            sync.finish()
            averaged = [p.grad.clone() for p in others]
            muon.step()
            sync.zero()
        if rank == 0:
            torch.save({"mats": [p.detach() for p in mats], "others": averaged}, out)
    finally:
        dist.destroy_process_group()


def reference(row_norm: bool):
    mats, _ = make_params()
    bufs = [torch.zeros_like(p) for p in mats]
    for step in range(STEPS):
        grads = [torch.stack(gs).mean(0) for gs in zip(*(rank_grads(r, step) for r in range(8)))]
        with torch.no_grad():
            reference_muon_step(mats, grads[:len(mats)], bufs, LR, MOM, 5, WD, "polar_express", row_norm)
    return mats, grads[len(mats):]


def test_sharded_muon_on_8_gloo_ranks_equals_the_single_rank_update(tmp_path, free_port):
    out = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(8, free_port, str(out), True), nprocs=8, join=True)
    got = torch.load(out)
    want_mats, want_others = reference(True)
    init, _ = make_params()
    for i, (g, w, p0) in enumerate(zip(got["mats"], want_mats, init)):
        # compare the applied updates (weights minus their decayed start), per matrix. The gradients travel in bf16
        # (8 ranks summed: <= 8 roundings of 2^-8 relative) and the update is gathered in bf16 (2^-8 relative); Newton-
        # Schulz is smooth in its input, so 5% of the update's largest entry leaves a >3x margin over those roundings.
        dg, dw = g - p0 * (1 - LR * WD) ** STEPS, w.detach() - p0 * (1 - LR * WD) ** STEPS
        assert (dg - dw).abs().max() <= 0.05 * dw.abs().max(), f"matrix {i} {tuple(g.shape)}"
    for g, w in zip(got["others"], want_others):
        # averaged in one bf16 all-reduce: |error| <= (8 + 1) roundings of 2^-8 of the largest gradient (|g| < 6)
        torch.testing.assert_close(g, w, atol=9 * 6 * 2 ** -8, rtol=0)


def test_banked_muon_one_rank_matches_per_matrix_reference_in_fp32():
    for row_norm in (False, True):
        mats, others = make_params()
        muon = Muon(mats, lr=LR, momentum=MOM, backend_steps=5, weight_decay=WD, ns_coeffs="jordan",
                    row_normalize=row_norm)
        ref, _ = make_params()
        bufs = [torch.zeros_like(p) for p in ref]
        for step in range(STEPS):
            grads = rank_grads(0, step)[:len(mats)]
            for p, g in zip(mats, grads):
                p.grad = g.clone()
            muon.step()  # no GradSync: the bank stacks the .grads
            with torch.no_grad():
                reference_muon_step(ref, grads, bufs, LR, MOM, 5, WD, "jordan", row_norm)
        for a, b in zip(mats, ref):
            # the same fp32 math, batched vs one matrix at a time: rounding-level differences only
            torch.testing.assert_close(a.detach(), b.detach(), atol=1e-5, rtol=1e-4)


def test_row_normalize_gives_unit_rows_in_the_direction_of_each_row():
    u = torch.tensor([[3.0, 4.0], [0.0, -2.0]])
    torch.testing.assert_close(row_normalize(u), torch.tensor([[0.6, 0.8], [0.0, -1.0]]))
    bank = torch.randn(3, 5, 7)
    torch.testing.assert_close(row_normalize(bank).norm(dim=-1), torch.ones(3, 5))


def test_step_bench_counts_one_host_read_and_fewer_optimizer_ops_after_banking():
    from lcq.tools.bench_step import bench_step
    from lcq.config import make_config

    r = bench_step(make_config("tiny"), world=2, tokens=128)
    # the new step reads the agreed flag once; the old one read it twice (no recurrence in tiny) or three times
    assert r["syncs_per_step"] == 1 and r["before"]["syncs_per_step"] >= 2
    # banked Newton-Schulz: one batched chain per bank instead of one per matrix
    assert r["optimizer_ops_per_rank"] < r["before"]["optimizer_ops_per_rank"]
    # bf16 buckets: the gradients travel in half the bytes, the all-gather of updates adds at most one bf16 copy
    assert r["reduce_bytes_per_step"] < r["before"]["reduce_bytes_per_step"]


def test_serialize_threads_zero_leaves_two_cores_per_local_rank(monkeypatch):
    import os

    from lcq.artifact import serialize_threads

    monkeypatch.setattr(os, "cpu_count", lambda: 26)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert serialize_threads(0) == 10 and serialize_threads(3) == 3  # an explicit count is kept as given
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert serialize_threads(0) == 1  # never below one
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert serialize_threads(0) == 24  # a single process: one rank


def _failing_master(rank, port, out):
    import time

    from lcq import dist as D

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    t0 = time.perf_counter()

    def write():
        if rank == 0:
            raise OSError("injected: compression failed")
        return b"never"

    try:
        D.on_master(write, "writing the artifact")
        got = "returned"
    except BaseException as e:
        got = f"{type(e).__name__}: {e}"
    with open(f"{out}.{rank}", "w") as f:
        f.write(f"{time.perf_counter() - t0:.3f}\n{got}")
    dist.destroy_process_group()


def test_a_failure_in_rank_0s_artifact_write_ends_every_rank_at_once(tmp_path, free_port):
    """What ship() does around rank 0's compression and write: rank 1 does not wait behind a dead rank 0."""
    out = str(tmp_path / "r")
    mp.spawn(_failing_master, args=(free_port, out), nprocs=2, join=True)
    r0, r1 = (open(f"{out}.{r}").read().split("\n", 1) for r in range(2))
    assert r0[1] == "OSError: injected: compression failed"
    assert r1[1].startswith("RankFailed: rank 0 failed while writing the artifact: OSError: injected")
    assert float(r1[0]) < 60  # one all_gather, not a barrier's timeout


def test_muon_banks_are_sent_while_backward_still_runs(monkeypatch):
    """Issue 27: the first bucket sent must be one whose gradients are complete before backward ends. With the
    collectives stubbed (they record how many gradients are still to come at each bank's send and hand rank 0's share
    back, as an average over ranks holding the same gradients would), the first Muon bank goes out before the last
    gradient hook fires, and
    each bank's share after finish() is this rank's gradients."""
    from lcq import dist as D
    from lcq.config import make_config
    from lcq.model import GPT
    from lcq.optim import build_optimizers

    class Done:
        def wait(self):
            pass

    events = []

    def reduce_scatter(out, t):
        events.append(sum(sync.left))  # gradients GradSync's hooks have yet to see
        out.copy_(t[: out.size(0)])
        return Done()

    def all_reduce(t):
        return Done()

    monkeypatch.setattr(D, "reduce_scatter_avg", reduce_scatter)
    monkeypatch.setattr(D, "all_reduce_avg", all_reduce)
    cfg = make_config("tiny")
    torch.manual_seed(0)
    model = GPT(cfg, bos_id=1)
    muon = build_optimizers(model, cfg, world=2)[1]
    in_muon = {id(p) for p in muon.param_groups[0]["params"]}
    sync = GradSync(muon, [p for p in model.parameters() if id(p) not in in_muon], 2)
    x = torch.randint(0, cfg.vocab_size, (257,))
    sync.armed = True
    model.loss(x[:-1], x[1:], torch.tensor([0, 100, 256], dtype=torch.int32), 256).backward()
    assert len(events) == len(muon.banks) and events[0] > 0, events
    sync.finish()
    for bank in muon.banks:
        mine = torch.stack([p.grad for p in bank.params[: bank.k]]).bfloat16().float()
        torch.testing.assert_close(bank.shard, mine, rtol=0, atol=0)
