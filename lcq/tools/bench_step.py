"""`python -m lcq.bench step`: what one training step costs a GPU, counted on CPU (issue 18).

No GPU figure exists on a CPU box, so the step is measured by what costs time on one: ATen ops dispatched (each is at
least one kernel launch), device->host reads (each a sync on CUDA), and bytes sent by collectives. The preset's real
model runs one step at a small per-rank batch on `--world N` gloo ranks, twice, side by side:

- `before`: the step as it ran before issue 18: fp32 flat all-reduce of every gradient (sum, then divide),
  clip_grad_norm_, per-matrix Muon on every rank (reference_muon_step below), and the three .item() reads of the stop
  flag (two, without depth recurrence);
- `after`: the step train() runs now: GradSync's bf16 buckets (Muon banks reduce-scattered to their owners), banked
  Muon on this rank's share, GradSync.clip_, and train.agree's one read.

Both use the same fused AdamW, so the optimizer rows differ by Muon alone. Rank 0's counts are reported (every rank
runs the same ops; Muon's share differs by at most one matrix per bank).
"""
from __future__ import annotations

import collections
import json
import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

from ..config import Config
from ..data import segment_bounds
from ..optim import newton_schulz, row_normalize

# Reads of device memory by the host: on CUDA each blocks until the queue drains.
SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "masked_select", "unique", "_unique2"}


class OpCounter(TorchDispatchMode):
    """Counts ATen ops by phase, host reads, and bytes of tensors handed to c10d collectives."""

    def __init__(self):
        super().__init__()
        self.phase = "forward"
        self.ops: collections.Counter = collections.Counter()
        self.syncs: collections.Counter = collections.Counter()
        self.comm_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        ns = func.namespace
        if ns == "c10d":
            # the tensors a collective sends: the input list/tensor (reduce_scatter/all_gather: the second arg)
            send = args[1] if name.startswith(("reduce_scatter", "_reduce_scatter", "allgather", "_allgather")) else args[0]
            flat = send if isinstance(send, (list, tuple)) else [send]
            flat = [t for x in flat for t in (x if isinstance(x, (list, tuple)) else [x])]
            self.comm_bytes += sum(t.numel() * t.element_size() for t in flat if isinstance(t, torch.Tensor))
            self.ops["comm"] += 1
        else:
            self.ops[self.phase] += 1
            d2h = name == "_to_copy" and str(kwargs.get("device", "")) == "cpu"  # dist.to_host's copy
            if name in SYNC_OPS or d2h:
                self.syncs[self.phase] += 1
        return func(*args, **(kwargs or {}))


def reference_muon_step(params, grads, bufs, lr: float, momentum: float, steps: int, wd: float, coeffs: str,
                        row_norm: bool) -> None:
    """The single-rank Muon update one matrix at a time, as lcq/optim.py ran it before banking (issue 18): the known
    answer the banked, sharded Muon is tested against and the old path this bench counts. Kept here, not in the
    shipped optimizer: a run never calls it."""
    for p, g, buf in zip(params, grads, bufs):
        buf.mul_(momentum).add_(g)
        update = g.add(buf, alpha=momentum)
        if row_norm:
            update = row_normalize(update)
        update = newton_schulz(update, steps, coeffs) * max(1.0, p.size(0) / p.size(1)) ** 0.5
        if wd:
            p.mul_(1 - lr * wd)
        p.add_(update, alpha=-lr)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_step(cfg: Config, world: int, rank: int, tokens: int, path: str) -> dict:
    from ..model import GPT
    from ..optim import GradSync, build_optimizers
    from ..train import agree, all_reduce_grads

    torch.manual_seed(cfg.seed)
    model = GPT(cfg, bos_id=1)
    model.recur_active = cfg.recur_passes > 1
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(rank)
    ids = torch.randint(2, cfg.vocab_size, (tokens + 1,), generator=gen)
    ids[:: max(1, tokens // 4)] = 1  # a few documents per row, as a packed batch has
    x, y = ids[:-1], ids[1:]
    window = min(cfg.train_seq_len, tokens)
    cu = segment_bounds(x, 1, window)
    flag = torch.zeros(4)
    adam, muon = build_optimizers(model, cfg, world if path == "after" else 1)
    in_muon = {id(p) for p in muon.param_groups[0]["params"]}
    gsync = GradSync(muon, [p for p in params if id(p) not in in_muon], world) if path == "after" else None
    counter = OpCounter()
    with counter:
        counter.phase = "forward"
        if gsync is not None:
            gsync.armed = True
        loss = model.loss(x, y, cu, window)
        counter.phase = "backward"
        loss.backward()
        counter.phase = "sync"
        if gsync is None:
            all_reduce_grads(params, world)
            if cfg.grad_clip_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip_norm)
        else:
            gsync.finish()
            if cfg.grad_clip_norm:
                gsync.clip_(cfg.grad_clip_norm)
        counter.phase = "optimizer"
        adam.step()
        if gsync is None:
            group = muon.param_groups[0]
            mats = group["params"]
            bufs = [muon.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in mats]
            with torch.no_grad():
                reference_muon_step(mats, [p.grad for p in mats], bufs, group["lr"], group["momentum"],
                                    group["backend_steps"], group["weight_decay"], group["ns_coeffs"],
                                    group["row_normalize"])
        else:
            muon.step()
        counter.phase = "control"
        if gsync is None:  # out_of_time's read, then the non-finite flag and (with recurrence) the loop flag
            flag[0] = 0.0
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            bool(flag[0].item()), bool(flag[1].item())
            if cfg.recur_passes > 1:
                bool(flag[2].item())
        else:
            agree(flag, 1.0, 1, 1.0, 1e9)
    return dict(ops=dict(counter.ops), syncs=dict(counter.syncs), comm_bytes=counter.comm_bytes,
                muon_matrices=len(muon.param_groups[0]["params"]), banks=len(muon.banks))


def _worker(rank: int, world: int, port: int, cfg: Config, tokens: int, out: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        res = {p: _one_step(cfg, world, rank, tokens, p) for p in ("before", "after")}
        if rank == 0:
            with open(out, "w") as f:
                json.dump(res, f)
    finally:
        dist.destroy_process_group()


def bench_step(cfg: Config, world: int, tokens: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "step.json")
        mp.spawn(_worker, args=(world, _free_port(), cfg, tokens, out), nprocs=world, join=True)
        with open(out) as f:
            res = json.load(f)
    print(f"one training step, preset {cfg.preset}, {world} gloo ranks, {tokens} tokens per rank "
          f"({res['after']['muon_matrices']} Muon matrices in {res['after']['banks']} banks); rank 0's counts")
    print(f"{'':24}{'before':>10}{'after':>10}{'ratio':>8}")
    rows = [("ATen ops: forward", "ops", "forward"), ("ATen ops: backward", "ops", "backward"),
            ("ATen ops: sync", "ops", "sync"), ("ATen ops: optimizer", "ops", "optimizer"),
            ("ATen ops: control", "ops", "control"), ("collectives", "ops", "comm")]
    for label, key, phase in rows:
        b, a = res["before"][key].get(phase, 0), res["after"][key].get(phase, 0)
        print(f"{label:24}{b:>10}{a:>10}{(a / b if b else float('nan')):>8.2f}")
    total = {p: sum(v for k, v in res[p]["ops"].items() if k != "comm") for p in res}
    syncs = {p: sum(res[p]["syncs"].values()) for p in res}
    step_syncs = {p: sum(v for k, v in res[p]["syncs"].items() if k != "forward") for p in res}
    for label, d in (("ATen ops per step", total), ("host reads (all)", syncs), ("host reads outside fwd", step_syncs),
                     ("bytes sent per rank", {p: res[p]["comm_bytes"] for p in res})):
        print(f"{label:24}{d['before']:>10}{d['after']:>10}{d['after'] / max(d['before'], 1):>8.2f}")
    fwd_syncs = res["after"]["syncs"].get("forward", 0)
    if fwd_syncs:
        print(f"note: {fwd_syncs} host reads in the forward come from the CPU attention path (SDPA per document); "
              "the CUDA flash-attn path takes cu_seqlens on the device and reads nothing back")
    after = res["after"]
    from .preflight import kernels_in_use
    used = kernels_in_use(torch.device("cpu"))
    print(f"kernels (lcq/kernels.py: fused LeakyReLU^2 MLP, softcapped CE): {used}; a CUDA box runs triton")
    timing = {}
    if torch.cuda.is_available():  # issue 27: the kernel against F.linear at one rank's record shape, (98304, 512) -> 2048
        from .gpu_check import kernel_times
        timing = kernel_times(cfg, torch.device("cuda"), 98304)
        print("fused vs torch, forward + backward ms on " + torch.cuda.get_device_name() + ": " +
              ", ".join(f"{k} {v}" for k, v in timing.items() if k.endswith("_ms")) + f"; faster: {timing['fused_mlp']}")
    return dict(world_size=world, kernels=used, tokens_per_rank=tokens, preset=cfg.preset, kernel_ms=timing,
                ops_per_step=total["after"], optimizer_ops_per_rank=after["ops"].get("optimizer", 0),
                syncs_per_step=step_syncs["after"], reduce_bytes_per_step=after["comm_bytes"],
                before=dict(ops_per_step=total["before"],
                            optimizer_ops_per_rank=res["before"]["ops"].get("optimizer", 0),
                            syncs_per_step=step_syncs["before"], reduce_bytes_per_step=res["before"]["comm_bytes"]))
