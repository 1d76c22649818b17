"""`python -m lcq.bench gptq`: GPTQ's solves on one rank vs split over `--world N` gloo ranks (issue 18), CPU proxy.

The preset's real model at its initialisation (the solve's cost depends on shapes, not on training) is quantized by
`quantize_state` as the pipeline calls it, with the preset's QuantSpec. The Hessians are synthetic, one per input width
(q, k and v share one in a run too): H = X^T X / n for a Gaussian X with one strong direction, as real layer inputs
have, so the Cholesky and the column loop do the work they do on real inputs. Every process runs one thread, so N
ranks use N cores: on a box with fewer free cores than ranks the split cannot be faster, whatever it balances.

Rows: the single-rank wall, the split's wall (the slowest rank: the gather waits for it), the same as CPU seconds of the
busiest process (what the wall would be with a free core per rank: on a loaded box the walls measure the load), and the
plan's balance twice: by the cost estimate the split uses (`lcq.gptq.solve_cost`) and by each matrix's solve CPU
seconds measured one at a time here, with each shape's share of both. The split's codes and scales are compared with
the single rank's, bit for bit.
"""
from __future__ import annotations

import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .bench_step import _free_port
from ..config import Config
from ..gptq import clip_for, quantize_gptq, quantize_state, solve_cost, solve_plan, tensor_role


def _inputs(cfg: Config):
    from ..model import GPT
    from ..pipeline import quant_spec
    from ..shipping import TIED

    torch.manual_seed(cfg.seed)
    model = GPT(cfg, bos_id=1)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(cfg.seed)
    by_width = {}
    hessians = {}
    for name, t in state.items():
        if name in TIED or tensor_role(name, t) == "raw":
            continue
        cols = t.shape[1]
        if cols not in by_width:
            x = torch.randn(2 * cols, cols, generator=gen) + 3 * torch.randn(cols, generator=gen)
            by_width[cols] = x.T @ x / x.shape[0]
        hessians[name] = by_width[cols]
    return state, hessians, quant_spec(cfg), TIED


def _worker(rank: int, world: int, port: int, cfg: Config, out: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        state, hessians, spec, tied = _inputs(cfg)
        lines: list[str] = []
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        tensors, _ = quantize_state(state, hessians, spec, tied, world, lines.append)
        got = [None] * world
        dist.all_gather_object(got, (time.perf_counter() - t0, time.process_time() - c0))
        if rank == 0:
            torch.save({"tensors": tensors, "seconds": got, "line": lines[0]}, out)
    finally:
        dist.destroy_process_group()


def imbalance_at(plan_by: dict, weights: dict, world: int) -> float:
    """The fullest rank's share of `weights` over the mean share, for the plan solve_plan makes from `plan_by`."""
    loads = [sum(weights[n] for n in s) for s in solve_plan(plan_by, world)]
    return max(loads) * world / sum(loads)


def bench_gptq(cfg: Config, world: int) -> dict:
    if cfg.quant_method != "gptq":
        raise SystemExit("bench gptq: QUANT_METHOD must be gptq (RTN is not split)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        state, hessians, spec, tied = _inputs(cfg)
        t0, c0 = time.perf_counter(), time.process_time()
        want, _ = quantize_state(state, hessians, spec, tied)
        single, single_cpu = time.perf_counter() - t0, time.process_time() - c0
        measured = {}
        for name in hessians:
            t, role = state[name], tensor_role(name, state[name])
            bits = spec.embed_bits if role == "embed" else spec.matrix_bits
            c0 = time.process_time()
            quantize_gptq(t, hessians[name], bits, clip_for(spec, name, role), spec.damp, spec.block_size,
                          spec.act_order)
            measured[name] = time.process_time() - c0
    finally:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.pt")
        mp.spawn(_worker, args=(world, _free_port(), cfg, out), nprocs=world, join=True)
        res = torch.load(out)
    identical = list(res["tensors"]) == list(want) and all(torch.equal(res["tensors"][k], v) for k, v in want.items())
    split, split_cpu = max(s for s, _ in res["seconds"]), max(c for _, c in res["seconds"])
    cost = {n: solve_cost(*state[n].shape) for n in hessians}
    plan = solve_plan(cost, world)

    by_cost, by_time = imbalance_at(cost, cost, world), imbalance_at(cost, measured, world)
    greedy = imbalance_at(measured, measured, world)  # what a perfect cost model would reach
    print(f"GPTQ solves, preset {cfg.preset}: {len(hessians)} matrices, 1 thread per process, "
          f"{os.cpu_count()} cores on this box")
    print(f"{'':34}{'1 rank':>10}{f'{world} ranks':>10}{'ratio':>8}")
    print(f"{'quantize_state wall (s)':34}{single:>10.2f}{split:>10.2f}{split / single:>8.2f}")
    print(f"{'quantize_state CPU s, busiest rank':34}{single_cpu:>10.2f}{split_cpu:>10.2f}"
          f"{split_cpu / single_cpu:>8.2f}")
    print(f"{'matrices per rank':34}{len(hessians):>10}  {[len(s) for s in plan]}")
    print(f"{'plan imbalance, by cost estimate':34}{'':>10}{by_cost:>10.3f}")
    print(f"{'plan imbalance, by measured s':34}{'':>10}{by_time:>10.3f}"
          + f"   (greedy on the measured s: {greedy:.3f})")
    print(f"{'shape (rows x cols)':20}{'matrices':>9}{'est. share':>12}{'CPU share':>11}{'CPU s each':>12}")
    for shape in sorted({tuple(state[n].shape) for n in hessians}, key=lambda s: -s[1] ** 2 * sum(s)):
        names = [n for n in hessians if tuple(state[n].shape) == shape]
        print(f"{f'{shape[0]} x {shape[1]}':20}{len(names):>9}{sum(cost[n] for n in names) / sum(cost.values()):>12.3f}"
              f"{sum(measured[n] for n in names) / sum(measured.values()):>11.3f}"
              f"{sum(measured[n] for n in names) / len(names):>12.3f}")
    worlds = sorted({2, 4, 8, world})
    by_world = {w: (imbalance_at(cost, measured, w), imbalance_at(measured, measured, w)) for w in worlds}
    print("plan imbalance by measured CPU s at other world sizes (plan by cost estimate / by the measured s): "
          + ", ".join(f"{w}: {a:.3f} / {b:.3f}" for w, (a, b) in by_world.items()))
    print(f"split log: {res['line']}")
    print(f"codes and scales bit-identical to 1 rank: {identical}")
    return dict(bench="gptq", preset=cfg.preset, world_size=world, matrices=len(hessians), single_s=round(single, 3),
                split_s=round(split, 3), speedup=round(single / split, 3), single_cpu_s=round(single_cpu, 3),
                split_cpu_s=round(split_cpu, 3), cpu_ratio=round(split_cpu / single_cpu, 4),
                per_rank=[len(s) for s in plan],
                imbalance_cost=round(by_cost, 4), imbalance_measured=round(by_time, 4),
                imbalance_measured_greedy=round(greedy, 4),
                imbalance_measured_at={w: round(a, 4) for w, (a, _) in by_world.items()},
                identical=identical, cores=os.cpu_count(), solve_cpu_s=round(sum(measured.values()), 3))
