"""GPTQ split across ranks (issue 18): each rank solves its share of the matrices, the codes and scales are broadcast,
and every rank ends with exactly the tensors a single rank computes alone."""
import datetime

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lcq.gptq as G
from lcq.gptq import QuantSpec, quantize_gptq, quantize_rtn, quantize_state, solve_cost, solve_plan

ALIASES = {"lm_head.weight": "tok_emb.weight"}
# Shapes of three widths, so the plan gives the ranks different matrix counts (the 40-column projs cost the most).
SHAPES = {"tok_emb.weight": (48, 16), "blocks.0.attn.c_q.weight": (16, 16), "blocks.0.attn.c_k.weight": (8, 16),
          "blocks.0.mlp.fc.weight": (40, 16), "blocks.0.mlp.proj.weight": (16, 40),
          "blocks.1.attn.c_q.weight": (16, 16),
          "blocks.1.mlp.proj.weight": (16, 40)}


def make_inputs():
    gen = torch.Generator().manual_seed(0)
    state = {n: torch.randn(s, generator=gen) * 0.1 for n, s in SHAPES.items()}
    state["blocks.0.attn_scale"] = torch.randn(16, generator=gen)  # raw: stored as is, never solved
    state["lm_head.weight"] = state["tok_emb.weight"]
    hessians = {}
    for n, (_, cols) in SHAPES.items():
        x = torch.randn(4 * cols, cols, generator=gen) + 2 * torch.randn(cols, generator=gen)  # one strong direction
        hessians[n] = x.T @ x / x.shape[0]
    return state, hessians


SPEC = QuantSpec(attn_clip_sigmas=13.0, mlp_clip_sigmas=11.5, block_size=8)  # block 8: the lazy batch update runs too


def _worker(rank, world, port, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    solved, real = [], G.quantize_gptq

    def counting(W, H, *args):  # the real solve, recording which matrices this rank solved
        solved.append(next(n for n in SHAPES if W is state[n] and H is hess[n]))
        return real(W, H, *args)

    try:
        state, hess = make_inputs()
        G.quantize_gptq = counting
        lines = []
        tensors, qmeta = quantize_state(state, hess, SPEC, ALIASES, world, lines.append)
        mine = list(solved)
        if rank == 0:  # one rank alone inside the group (as the preflight's artifact row): world 1, no collective
            alone, _ = quantize_state(state, hess, SPEC, ALIASES)
            assert list(alone) == list(tensors) and all(torch.equal(alone[k], v) for k, v in tensors.items())
        torch.save({"tensors": tensors, "qmeta": qmeta, "solved": mine, "lines": lines}, f"{out}.{rank}")
    finally:
        G.quantize_gptq = real
        dist.destroy_process_group()


def test_split_over_2_gloo_ranks_is_bit_identical_to_one_rank(tmp_path, free_port):
    out = str(tmp_path / "rank")
    mp.spawn(_worker, args=(2, free_port, out), nprocs=2, join=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks ran
    try:
        state, hess = make_inputs()
        want, want_meta = quantize_state(state, hess, SPEC, ALIASES)
    finally:
        torch.set_num_threads(threads)
    got = [torch.load(f"{out}.{r}") for r in range(2)]
    for r, g in enumerate(got):
        assert list(g["tensors"]) == list(want), f"rank {r}: stored keys or their order differ"
        for k, v in want.items():
            assert g["tensors"][k].dtype == v.dtype and torch.equal(g["tensors"][k], v), f"rank {r}: {k} differs"
        assert g["qmeta"] == want_meta
    # each rank solved its own share of the plan, and only that
    cost = {n: solve_cost(r, c) for n, (r, c) in SHAPES.items()}
    plan = solve_plan(cost, 2)
    assert [g["solved"] for g in got] == plan and all(plan)
    sent = sum(r * c + 2 * r for r, c in SHAPES.values())  # int8 codes + float16 scales, each sent once
    assert got[0]["lines"] == got[1]["lines"] == [
        f"gptq_split: matrices per rank {[len(s) for s in plan]}, {sent} bytes gathered"]


def _failing_worker(rank, world, port, out, poisoned):
    torch.set_num_threads(1)
    # a short timeout: were the other rank left waiting at the gather, the test fails in 30 s instead of hanging
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    try:
        state, hess = make_inputs()
        hess[poisoned] = hess[poisoned].clone()
        hess[poisoned][0, 0] = float("nan")
        try:
            quantize_state(state, hess, SPEC, ALIASES, world)
            msg = None
        except Exception as e:
            msg = f"{type(e).__name__}: {e}"
        torch.save(msg, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_a_failed_solve_on_one_rank_fails_every_rank(tmp_path, free_port):
    """A solve runs on one rank only, so its failure must reach the ranks waiting for its codes (issue 18)."""
    plan = solve_plan({n: solve_cost(r, c) for n, (r, c) in SHAPES.items()}, 2)
    out = str(tmp_path / "rank")
    mp.spawn(_failing_worker, args=(2, free_port, out, plan[1][0]), nprocs=2, join=True)
    want = "RuntimeError: GPTQ on rank 1: ValueError('quantize_gptq: H has non-finite entries')"
    assert [torch.load(f"{out}.{r}") for r in range(2)] == [want, want]


def test_one_rank_is_the_per_tensor_solve():
    """World 1 (the default) splits and logs nothing: each tensor is solved in place, as before the split."""
    state, hess = make_inputs()
    for spec in (SPEC, QuantSpec(method="rtn")):
        lines = []
        tensors, _ = quantize_state(state, hess, spec, ALIASES, 1, lines.append)
        assert lines == []
        keys = []
        for n, t in state.items():
            if n in ALIASES:
                continue
            if n not in SHAPES:
                keys.append(n)
                continue
            keys += [n + ".q", n + ".scale"]
            role = "embed" if n == "tok_emb.weight" else "matrix"
            bits = spec.embed_bits if role == "embed" else spec.matrix_bits
            clip = G.clip_for(spec, n, role)
            q, s = (quantize_gptq(t, hess[n], bits, clip, spec.damp, spec.block_size, spec.act_order)
                    if spec.method == "gptq" else quantize_rtn(t, bits, clip))
            assert torch.equal(tensors[n + ".q"], q) and torch.equal(tensors[n + ".scale"], s), n
        assert list(tensors) == keys


def test_solve_plan_is_balanced_and_deterministic():
    costs = {f"m{i}": c for i, c in enumerate([9, 7, 7, 5, 4, 4, 3, 1, 1])}
    for world in (1, 2, 3, 4, 12):
        plan = solve_plan(costs, world)
        assert len(plan) == world and sorted(n for s in plan for n in s) == sorted(costs)
        assert solve_plan(dict(reversed(list(costs.items()))), world) == plan  # independent of dict order
        loads = [sum(costs[n] for n in s) for s in plan]
        # the costliest-first greedy's bound: the last job placed on the fullest rank started below the mean load
        assert max(loads) <= sum(costs.values()) / world + max(costs.values())
    # by hand: 9 | 7, 7 | 5 to the lighter rank 0 (9 < 14), 4 to rank 0 on the tie at 14, ... -> loads 21 and 20
    assert solve_plan(costs, 2) == [["m0", "m3", "m4", "m6"], ["m1", "m2", "m5", "m7", "m8"]]
    assert solve_plan({"a": 1, "b": 1}, 3) == [["a"], ["b"], []]  # ties go to the lower rank; a rank may get none


def test_gptq_bench_splits_the_tiny_model_bit_identically(capsys):
    from lcq.tools.bench_gptq import bench_gptq
    from lcq.config import make_config

    r = bench_gptq(make_config("tiny"), world=2)
    assert r["identical"] and sum(r["per_rank"]) == r["matrices"] and min(r["per_rank"]) > 0
    assert "codes and scales bit-identical to 1 rank: True" in capsys.readouterr().out
