"""The training stop moved earlier by what the stages after it need (issue 28: on a loaded 2-core box GPTQ took 17.9 s,
LCQ's closed form 43.9 s and brotli ran 21 s past LCQ's end against a 30 s reserve: exit 4, a finished run lost).

Before step 1 a probe times, on the real model and shapes, what those stages do: GPTQ's calibration forward with its
Hessian hooks (one batch, then two: the fixed cost apart from the per-batch one), GPTQ's solve of one initial weight of each shape and role (quantize_state; times their
count, over the ranks as in the stage), one SVD per LCQ target shape (the closed form's core) and brotli on a sample
of the quantized codes (the model section's back-end, or its fallback). The probe is charged to the training clock (its own ledger row). While training,
the projection is scaled by how much slower a step is now than the first steps after the probe (a host that gets
loaded mid-run), and the stop is the earlier of TRAIN_RESERVE_SECONDS's and this projection's.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import brotli
import torch

from . import artifact
from . import dist as D
from .gptq import collect_hessians, quantize_state, tensor_role
from .model import gptq_targets

# Bytes of quantized codes brotli-11 is timed on: a stable rate in ~0.1 s on a quiet 2-core box.
SAMPLE_BYTES = 1 << 16
# LCQ's closed form also runs the student and the teacher over its held-out batch, at start and end: 4 forwards.
LCQ_FORWARDS = 4


@dataclass(frozen=True)
class PostTrainProbe:
    calib_s: float  # GPTQ calibration (forward + Hessian hooks) over every calibration token
    solve_s: float  # GPTQ's solves
    lcq_s: float  # LCQ's closed form (one SVD per target, its KL forwards); 0 with LCQ off
    serialize_s: float  # the model section at the measured brotli rate, on the serialize threads
    seconds: float  # the probe's own time

    def need(self, slowdown: float = 1.0) -> float:
        """Seconds the stages after the training stop are projected to need on a host `slowdown` times slower than
        during the probe."""
        return slowdown * (self.calib_s + self.solve_s + self.lcq_s + self.serialize_s)

    def line(self, slowdown: float = 1.0) -> str:
        return (f"post_train_projection: {self.need(slowdown):.2f}s = x{slowdown:.2f} slowdown (GPTQ calibration "
                f"{self.calib_s:.2f}s, solves {self.solve_s:.2f}s, LCQ closed form {self.lcq_s:.2f}s, serialize "
                f"{self.serialize_s:.2f}s)")


def probe(model, cfg, world_size: int, one_batch, batch_tokens: int, spec, aliases, lcq_names: list[str]) -> PostTrainProbe:
    """Time the post-training stages' work on `model` (left as it was). one_batch() runs the model over one
    calibration batch of `batch_tokens` train tokens per rank."""
    device = next(model.parameters()).device
    start = time.perf_counter()
    looped, model.recur_active = model.recur_active, True  # what ships runs the loop; GPTQ calibrates through it
    one_batch()  # untimed: a first forward pays one-off costs (allocator, lazy init) the stage after training does not
    D.sync(device)
    # Collecting over one batch and over two separates the per-batch cost from the fixed one (hooks, the Hessians'
    # allocation and their all-reduce, paid once per stage): scaling a one-batch time by the batch count charged that
    # fixed cost per batch and projected 8 gloo ranks' GPTQ at 35 s against 0.6 s.
    t0 = time.perf_counter()
    collect_hessians(model, gptq_targets(model), one_batch)
    D.sync(device)
    t1 = time.perf_counter()
    hessians = collect_hessians(model, gptq_targets(model), lambda: (one_batch(), one_batch()))
    model.recur_active = looped
    D.sync(device)
    t2 = time.perf_counter()
    per_batch = max(t2 - t1 - (t1 - t0), 0.0)
    fixed = max(t1 - t0 - per_batch, 0.0)
    # GPTQ's solves: one tensor of each (shape, role), timed, times how many the model has, over the ranks
    state = {k: v.detach() for k, v in model.state_dict().items() if k not in aliases}
    kinds: dict[tuple, list[str]] = {}
    for name, t in state.items():
        if tensor_role(name, t) != "raw":
            kinds.setdefault((tuple(t.shape), tensor_role(name, t)), []).append(name)
    qtensors, solve_s = {}, 0.0
    first = next(iter(kinds.values()))[0]
    quantize_state({first: state[first]}, hessians, spec, {})  # untimed: the first solve loads the linear algebra
    for names in kinds.values():
        t = time.perf_counter()
        q, _ = quantize_state({names[0]: state[names[0]]}, hessians, spec, {})
        D.sync(device)
        solve_s += (time.perf_counter() - t) * len(names) / world_size
        qtensors.update(q)
    mods = dict(model.named_modules())
    shapes = [tuple(mods[n].weight.shape) for n in lcq_names]
    svd = {s: _timed(lambda: (torch.linalg.svd(torch.randn(s, device=device)), D.sync(device))) for s in set(shapes)}
    lcq_s = sum(svd[s] for s in shapes) + LCQ_FORWARDS * cfg.lcq_batch_tokens * per_batch / batch_tokens * bool(shapes)
    sample = b"".join(t.cpu().numpy().tobytes() for t in qtensors.values())[:SAMPLE_BYTES]
    rate = len(sample) / max(_timed(lambda: brotli.compress(sample, quality=11, lgwin=24)), 1e-6)
    raw = sum(t.numel() for t in state.values())  # the section's codes: about one byte per parameter
    serialize_s = raw / rate / artifact.serialize_threads(cfg.serialize_threads)
    mine = [fixed + cfg.gptq_calib_tokens_per_rank(world_size) * per_batch / batch_tokens, solve_s, lcq_s, serialize_s]
    agreed = D.all_reduce_max(torch.tensor(mine, dtype=torch.float64, device=device))
    return PostTrainProbe(*agreed.tolist(), seconds=time.perf_counter() - start)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def stop_budget(cfg, spent: float, post: PostTrainProbe):
    """The train budget for a host `slowdown` times slower than during the probe: TRAIN_RESERVE_SECONDS's stop, or
    earlier where the stages after it are projected to need more than the cap leaves. `spent`: the clock used before
    step 1."""
    reserve = cfg.max_wallclock_seconds - cfg.lcq_safety_seconds - spent
    return lambda slowdown: min(cfg.train_budget_seconds - spent, reserve - post.need(slowdown))
