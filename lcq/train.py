"""Wallclock-budgeted training: warm-up on synthetic tokens (state restored, not charged), then Muon + Adam steps until
the train budget (MAX_WALLCLOCK_SECONDS minus TRAIN_RESERVE_SECONDS) or ITERATIONS runs out; EMA weights at the end."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from . import dist as D
from .config import Config
from .data import TrainLoader, cu_buckets, max_segments, pad_cu, segment_bounds, train_pattern
from .guards import NonFiniteError, check_finite_weights
from .model import autocast_for
from .optim import EMA, GradSync, apply_schedule, build_optimizers, training_progress
from .recurrence import recurrence_due
from .seq_schedule import SeqSchedule


# A step line at least this often, whatever TRAIN_LOG_EVERY says (issue 28: the demo's 25 steps were a minute apart on
# a loaded box); the line costs one host sync.
LOG_SECONDS = 10.0
# The step time a slowdown is measured against: the mean of steps 2..BASE_STEPS (step 1 pays one-off costs); later
# steps are smoothed with weight SLOW_EMA each, so one slow step (a log line, a GC pause) does not stop training.
BASE_STEPS = 5
SLOW_EMA = 0.1


@dataclass
class TrainResult:
    steps: int
    train_time_s: float
    step_avg_ms: float
    tokens_per_step: int
    stopped_by: str
    final_train_loss: float
    files_read: list[str] = field(default_factory=list)
    slowdown: float = 1.0  # the last step time against the first steps' (budget_fn's argument)


def local_batch_tokens(cfg: Config, world_size: int) -> int:
    per = cfg.train_batch_tokens // (world_size * cfg.grad_accum_steps)
    if per < 2:
        raise ValueError(f"TRAIN_BATCH_TOKENS={cfg.train_batch_tokens} is too small for {world_size} ranks x "
                         f"{cfg.grad_accum_steps} accumulation steps")
    return per


def all_reduce_grads(params: list[nn.Parameter], world_size: int) -> None:
    """Average gradients over ranks in one flat buffer (one collective per step instead of one per tensor)."""
    if world_size == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = _flatten_dense_tensors(grads)
    D.all_reduce_sum(flat)
    flat /= world_size
    for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


def compile_loss(model: nn.Module, graphs: int, backend: str = "inductor"):
    """The training loss compiled with static shapes (issue 18): one graph per cu_seqlens bucket and layer order, all
    built in the warm-up; fullgraph, so a graph break is an error instead of a silent slowdown."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, graphs)  # else eager past 8
    return torch.compile(model.loss, dynamic=False, fullgraph=True, backend=backend)


def bucket_plan(cfg: Config, n: int, bos_id: int, lengths: list[int]) -> tuple[list[int], int, int]:
    """cu_buckets for this run's train rows at their shortest context (most cuts), and the measured maximum."""
    most = max_segments(train_pattern(cfg.data_path), n, min(lengths), bos_id)
    return (*cu_buckets(n, most), most)


def warmup_batch(gen, vocab: int, n: int, bos_id: int, window: int, buckets: list[int], size: int):
    """Synthetic (x, y, cu_seqlens) of n tokens whose padded cu_seqlens has `size` entries: BOS at evenly spaced
    places, as many as leave room for the cuts every `window` tokens (no other token is a BOS)."""
    toks = torch.randint(0, vocab - 1, (n + 1,), generator=gen)
    toks += toks >= bos_id
    toks[torch.linspace(0, n - 1, max(1, size - 1 - -(-n // window))).long()] = bos_id
    return toks[:-1], toks[1:], pad_cu(segment_bounds(toks[:-1], bos_id, window), buckets)


def out_of_time(flag: torch.Tensor, elapsed: float, steps: int, last_step_s: float, budget_s: float) -> bool:
    """True on every rank once the next step could cross the budget, estimated by the slower of the average and the
    last step. Ranks agree through a MAX all-reduce of `flag`, so no rank steps alone. The decision is the flag's first
    element; the train loop puts its non-finite-loss flag, recurrence flag and context stage in the others, agreed in
    the same collective."""
    return bool(agree(flag.view(-1), elapsed, steps, last_step_s, budget_s)[0])


def agree(flag: torch.Tensor, elapsed: float, steps: int, last_step_s: float, budget_s: float) -> list[float]:
    """out_of_time's collective, with the whole flag read back in one device->host copy: the training step's only
    host sync (issue 18; each .item() of a CUDA tensor is one)."""
    flag[0] = 1.0 if elapsed + max(elapsed / steps, last_step_s) > budget_s else 0.0
    D.all_reduce_max(flag)
    return D.to_host(flag)


def nonfinite_message(step: int, loss: float, cfg: Config) -> str:
    return (f"non-finite training loss at step {step}: train_loss {loss} on this rank; nothing shipped. Fix: lower "
            f"MATRIX_LR={cfg.matrix_lr:g} EMBED_LR={cfg.embed_lr:g} SCALAR_LR={cfg.scalar_lr:g}, or set "
            f"GRAD_CLIP_NORM={cfg.grad_clip_norm:g} (0 = off), LR_WARMUP_STEPS={cfg.lr_warmup_steps}")


def train(model: nn.Module, cfg: Config, dinfo: D.DistInfo, log, bos_id: int,
          eval_fn=None, budget_fn: Callable[[float], float] | None = None) -> TrainResult:
    """Train `model` in place and load the EMA weights into it at the end.

    eval_fn(step) -> str, if given, runs every VAL_LOSS_EVERY steps for monitoring; its time is not charged.
    budget_fn(slowdown) -> seconds, if given, is the train budget given how many times slower a step is now than over
    the first BASE_STEPS (smoothed; at least 1), asked every step from then on (lcq/clock.py); else TRAIN_BUDGET."""
    device = dinfo.device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizers = build_optimizers(model, cfg, dinfo.world_size)
    # gradients averaged in bf16 buckets while backward runs; Muon's banks reduce-scattered to their owners (issue 18)
    in_muon = {id(p) for p in optimizers[1].param_groups[0]["params"]}
    gsync = GradSync(optimizers[1], [p for p in params if id(p) not in in_muon], dinfo.world_size)
    local_tokens = local_batch_tokens(cfg, dinfo.world_size)
    seq = SeqSchedule(cfg.train_seq_schedule, cfg.train_seq_len)  # progressive context (#2014); off: TRAIN_SEQ_LEN
    # Static shapes (issue 18): max_seqlen is always the longest stage's length (a valid upper bound at every stage),
    # and cu_seqlens is padded to one of a few lengths, so no batch's layout or stage changes a shape
    window, (buckets, warmed, most) = max(seq.lengths), bucket_plan(cfg, local_tokens, bos_id, seq.lengths)
    log(f"cu_buckets:{buckets} warmed:{warmed} max_segments:{most}")
    looped = cfg.recur_passes > 1  # depth recurrence starts at RECUR_FROM_PROGRESS (lcq/recurrence.py)
    shapes = warmed * (1 + looped)
    fwd = compile_loss(model, len(buckets) * (1 + looped)) if (cfg.compile and device.type == "cuda") else model.loss
    autocast = autocast_for(device, cfg.autocast_cpu_bf16)

    def step_on(batches) -> torch.Tensor:
        total = torch.zeros((), device=device)
        for i, (x, y, cu) in enumerate(batches):
            gsync.armed = i == len(batches) - 1  # only the step's last backward sends
            with autocast:
                loss = fwd(x, y, cu, window) / cfg.grad_accum_steps
            loss.backward()
            total += loss.detach()
        gsync.finish()
        if cfg.grad_clip_norm:
            gsync.clip_(cfg.grad_clip_norm)
        for opt in optimizers:
            opt.step()
        gsync.zero()
        return total

    # Warm-up (compilation, allocator, kernels) on synthetic tokens: never val tokens, and the initial weights and
    # optimizer state are restored afterwards, so these steps neither train the model nor count against the budget.
    if cfg.warmup_steps:
        t_w = time.perf_counter()
        init_model = copy.deepcopy(model.state_dict())
        init_opts = [copy.deepcopy(o.state_dict()) for o in optimizers]
        gen = torch.Generator().manual_seed(cfg.seed + dinfo.rank)
        # every cu_seqlens bucket, then (with recurrence) both layer orders, as #1855 warms its shapes: each compiled
        # graph is built here, none on the clock
        for w in range(max(cfg.warmup_steps, shapes)):
            if looped:
                model.recur_active = (w // warmed) % 2 == 1
            batches = [[t.to(device) for t in warmup_batch(gen, cfg.vocab_size, local_tokens, bos_id, window, buckets,
                                                          buckets[w % warmed])] for _ in range(cfg.grad_accum_steps)]
            step_on(batches)
        model.load_state_dict(init_model)
        for o, s in zip(optimizers, init_opts):
            o.load_state_dict(s)
        D.sync(device)
        log.stage("warmup", time.perf_counter() - t_w, steps=max(cfg.warmup_steps, shapes), charged="no")

    torch.manual_seed(cfg.seed)
    loader = TrainLoader(train_pattern(cfg.data_path), dinfo.rank, dinfo.world_size, device, buckets,
                         vocab_size=cfg.vocab_size)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay else None
    budget_s = cfg.train_budget_seconds if budget_fn is None else budget_fn(1.0)
    slowdown = 1.0
    tokens_per_step = local_tokens * dinfo.world_size * cfg.grad_accum_steps
    D.barrier()
    D.sync(device)
    train_time = 0.0
    t0 = time.perf_counter()
    step, stopped_by, last_loss, t_logged = 0, "iterations", float("nan"), t0
    # [out of time, non-finite loss, recurrence due, context stage due]: agreed by every rank in the one all-reduce the
    # step already makes, so a NaN stops training at the step it appears (issue 10) and every rank switches the depth
    # loop on, and moves to a longer context, at the same step (each rank's own clock could put a switch one step
    # apart; MAX: the rank furthest on decides), without a second collective per step
    stop_flag = torch.zeros(4, device=device)
    stop_flag[2] = float(looped and recurrence_due(0.0, cfg.recur_from_progress))
    agreed = stop_flag.tolist()  # the flag as the host last read it
    progress = 0.0
    if seq.staged:
        log(f"train_seq_schedule:{seq.describe()} train_seq_len:{seq.length} tokens_per_step:{tokens_per_step}")
    while step < cfg.iterations:
        t_step = time.perf_counter()
        elapsed = train_time + (t_step - t0)
        apply_schedule(optimizers, step, elapsed, cfg)
        if looped and bool(agreed[2]) != model.recur_active:
            model.recur_active = not model.recur_active
            log(f"recurrence:{'on' if model.recur_active else 'off'} step:{step} layers:{model.layer_order()}")
        if seq.staged and seq.advance(int(agreed[3])):
            log(f"train_seq_len:{seq.length} step:{step} progress:{progress:.3f}")
        batches = [loader.next_batch(local_tokens, seq.length, bos_id) for _ in range(cfg.grad_accum_steps)]
        loss = step_on(batches)
        stop_flag[1] = (~torch.isfinite(loss)).float()
        if ema is not None:
            ema.update(model)
        step += 1
        now = time.perf_counter()
        elapsed = train_time + (now - t0)
        if looped or seq.staged:
            progress = training_progress(step, elapsed, cfg)
            stop_flag[2] = float(looped and recurrence_due(progress, cfg.recur_from_progress))
            stop_flag[3] = seq.due(progress)
        if budget_fn is not None and step >= BASE_STEPS:
            if step == BASE_STEPS:
                base_s = smooth_s = (elapsed - t_step1) / (BASE_STEPS - 1)
            smooth_s += SLOW_EMA * (now - t_step - smooth_s)
            slowdown = max(1.0, smooth_s / base_s)
            budget_s = budget_fn(slowdown)
        elif step == 1:
            t_step1 = elapsed
        agreed = agree(stop_flag, elapsed, step, now - t_step, budget_s)
        stop = bool(agreed[0]) and step < cfg.iterations
        if agreed[1]:
            raise NonFiniteError(nonfinite_message(step, float(loss.item()), cfg))
        last_step = stop or step == cfg.iterations
        if step % cfg.train_log_every == 0 or last_step or step <= 2 or now - t_logged >= LOG_SECONDS:
            t_logged = now
            D.sync(device)
            last_loss = float(loss.item())
            elapsed = train_time + (time.perf_counter() - t0)
            log(f"step:{step}/{cfg.iterations} train_loss:{last_loss:.4f} train_time:{elapsed * 1000:.0f}ms "
                f"step_avg:{elapsed * 1000 / step:.2f}ms tok/s:{step * tokens_per_step / elapsed:.0f}")
        if eval_fn is not None and cfg.val_loss_every and (step % cfg.val_loss_every == 0 or last_step):
            D.sync(device)
            train_time += time.perf_counter() - t0
            log(eval_fn(step))
            t0 = time.perf_counter()
        if stop:
            stopped_by = "wallclock"
            break
    D.sync(device)
    train_time += time.perf_counter() - t0
    if ema is not None:
        ema.copy_to(model)
    check_finite_weights(model, f"after {step} training steps")
    if looped:
        model.recur_active = True  # what ships runs the loop, however early training stopped
    return TrainResult(steps=step, train_time_s=train_time, step_avg_ms=1000 * train_time / max(step, 1),
                       tokens_per_step=tokens_per_step, stopped_by=stopped_by, final_train_loss=last_loss,
                       files_read=list(loader.files_read), slowdown=slowdown)
