"""torchrun environment -> a small frozen record; process group set-up (NCCL on GPU, gloo on CPU)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_dist(env: dict | None = None) -> DistInfo:
    """Read RANK/WORLD_SIZE/LOCAL_RANK (torchrun) and join the process group when world_size > 1."""
    env = os.environ if env is None else env
    rank = int(env.get("RANK", 0))
    world = int(env.get("WORLD_SIZE", 1))
    local_rank = int(env.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timedelta(minutes=30), **kwargs)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def first_error(message: str | None) -> tuple[int, str] | None:
    """(rank, message) of the lowest rank that failed a check, seen by every rank (None: all passed). A rank that
    stopped alone would leave the others to be killed by torchrun (status 143), its message on its own stderr only."""
    out = [message]
    if is_dist():
        out *= dist.get_world_size()
        dist.all_gather_object(out, message)
    return next(((r, m) for r, m in enumerate(out) if m), None)


class RankFailed(RuntimeError):
    """Another rank failed at a point where this one waits for it (lcq.dist.on_master)."""


def on_master(fn, what: str):
    """fn() on rank 0 (None elsewhere), and every rank learns how it ended in one collective: an exception on rank 0 is
    raised there, and as RankFailed naming it on every other rank, at once instead of at the collective timeout (30
    minutes on NCCL) that a barrier behind a dead rank 0 would wait for (issue 18)."""
    out, err = None, None
    if not is_dist() or dist.get_rank() == 0:
        try:
            out = fn()
        except BaseException as e:  # Interrupted too: the others must not wait for a rank that is unwinding
            err = e
    failed = first_error(None if err is None else f"{type(err).__name__}: {err}")
    if err is not None:
        raise err
    if failed:
        raise RankFailed(f"rank {failed[0]} failed while {what}: {failed[1]}")
    return out


def all_reduce_avg(t: torch.Tensor):
    """Average over ranks in the collective, asynchronously: returns the work handle to wait on."""
    return dist.all_reduce(t, op=dist.ReduceOp.AVG, async_op=True)


def reduce_scatter_avg(out: torch.Tensor, t: torch.Tensor):
    """out <- this rank's 1/world slice (along dim 0) of the average of t over ranks; async, returns the work handle."""
    return dist.reduce_scatter_tensor(out, t, op=dist.ReduceOp.AVG, async_op=True)


def all_gather(out: torch.Tensor, t: torch.Tensor):
    """out <- every rank's t, concatenated along dim 0 in rank order; async, returns the work handle."""
    return dist.all_gather_into_tensor(out, t, async_op=True)


def to_host(t: torch.Tensor) -> list:
    """The one device->host read of a training step (issue 18): a copy to the host (a sync on CUDA) as a list."""
    return t.to("cpu", copy=True).tolist()


def sync(device: torch.device) -> None:
    """Wait for queued device work so that wall-clock readings mean what they say."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def shutdown(aligned: bool = False) -> None:
    """Tear the process group down. aligned=True (a run that ended normally on every rank) first waits for every rank:
    a gloo rank whose peers closed their connections while it was still finishing can die with SIGABRT at exit (seen
    once in five runs of the 8-rank test, after rank 0 had written all of its results). A failing rank passes False,
    since the others may never reach the barrier."""
    if is_dist():
        if aligned:
            dist.barrier()
        dist.destroy_process_group()
