"""Wallclock-budgeted training: warm-up on synthetic tokens (state restored, not charged), then Muon + Adam steps until
the train budget (MAX_WALLCLOCK_SECONDS minus TRAIN_RESERVE_SECONDS) or ITERATIONS runs out; EMA weights at the end."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from . import dist as D
from .checks import NonFiniteError, check_finite_weights
from .config import Config
from .data import TrainLoader, segment_bounds, train_pattern
from .model import autocast_for
from .optim import EMA, apply_schedule, build_optimizers, training_progress
from .recurrence import recurrence_due
from .seq_schedule import SeqSchedule


@dataclass
class TrainResult:
    steps: int
    train_time_s: float
    step_avg_ms: float
    tokens_per_step: int
    stopped_by: str
    final_train_loss: float
    files_read: list[str] = field(default_factory=list)


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


def out_of_time(flag: torch.Tensor, elapsed: float, steps: int, last_step_s: float, budget_s: float) -> bool:
    """True on every rank once the next step could cross the budget, estimated by the slower of the average and the
    last step. Ranks agree through a MAX all-reduce of `flag`, so no rank steps alone. The decision is the flag's first
    element; the train loop puts its non-finite-loss flag, recurrence flag and context stage in the others, agreed in
    the same collective."""
    flag.view(-1)[0] = 1.0 if elapsed + max(elapsed / steps, last_step_s) > budget_s else 0.0
    D.all_reduce_max(flag)
    return bool(flag.view(-1)[0].item())


def nonfinite_message(step: int, loss: float, cfg: Config) -> str:
    return (f"non-finite training loss at step {step}: train_loss {loss} on this rank (NaN/inf on at least one rank); "
            f"training stopped, nothing is quantized, shipped or scored. Knobs to look at: MATRIX_LR={cfg.matrix_lr:g} "
            f"EMBED_LR={cfg.embed_lr:g} SCALAR_LR={cfg.scalar_lr:g} (lower them), GRAD_CLIP_NORM={cfg.grad_clip_norm:g} "
            f"(0 = off), LR_WARMUP_STEPS={cfg.lr_warmup_steps}, MUON_MOMENTUM={cfg.muon_momentum:g}")


def train(model: nn.Module, cfg: Config, dinfo: D.DistInfo, log, bos_id: int,
          eval_fn=None) -> TrainResult:
    """Train `model` in place and load the EMA weights into it at the end.

    eval_fn(step) -> str, if given, runs every VAL_LOSS_EVERY steps for monitoring; its time is not charged."""
    device = dinfo.device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizers = build_optimizers(model, cfg)
    local_tokens = local_batch_tokens(cfg, dinfo.world_size)
    # dynamic=True: the packed row keeps its length, but the segment count changes every batch and max_seqlen with each
    # TRAIN_SEQ_SCHEDULE stage. max_seqlen is then a symbolic int: Dynamo traced one graph for lengths 16, 32 and 64 on
    # the SDPA path (CPU, CompileCounter), so expect one graph per layer order (2 with depth recurrence); an attention
    # kernel that specialises on it gives at most one per (length, order) pair, which the warm-up below visits.
    fwd = torch.compile(model.loss, dynamic=True) if (cfg.compile and device.type == "cuda") else model.loss
    autocast = autocast_for(device, cfg.autocast_cpu_bf16)
    seq = SeqSchedule(cfg.train_seq_schedule, cfg.train_seq_len)  # progressive context (#2014); off: TRAIN_SEQ_LEN

    def step_on(batches, seq_len: int) -> torch.Tensor:
        total = torch.zeros((), device=device)
        for x, y, cu in batches:
            with autocast:
                loss = fwd(x, y, cu, seq_len) / cfg.grad_accum_steps
            loss.backward()
            total += loss.detach()
        all_reduce_grads(params, dinfo.world_size)
        if cfg.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip_norm)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        return total

    # Warm-up (compilation, allocator, kernels) on synthetic tokens: never val tokens, and the initial weights and
    # optimizer state are restored afterwards, so these steps neither train the model nor count against the budget.
    looped = cfg.recur_passes > 1  # depth recurrence starts at RECUR_FROM_PROGRESS (lcq/recurrence.py)
    if cfg.warmup_steps:
        t_w = time.perf_counter()
        init_model = copy.deepcopy(model.state_dict())
        init_opts = [copy.deepcopy(o.state_dict()) for o in optimizers]
        gen = torch.Generator().manual_seed(cfg.seed + dinfo.rank)
        n_len = len(seq.lengths)
        for w in range(cfg.warmup_steps):
            # every context length in turn, then (with recurrence) both layer orders, as #1855 and #2014 warm theirs, so
            # no (length, order) pair compiles on the clock when WARMUP_STEPS >= their number
            seq_len = seq.lengths[w % n_len]
            if looped:
                model.recur_active = (w // n_len) % 2 == 1
            batches = []
            for _ in range(cfg.grad_accum_steps):
                toks = torch.randint(0, cfg.vocab_size, (local_tokens + 1,), generator=gen)
                toks[:: max(2, seq_len // 3)] = bos_id  # exercise multi-document segments
                x, y = toks[:-1], toks[1:]
                batches.append((x.to(device), y.to(device), segment_bounds(x, bos_id, seq_len).to(device)))
            step_on(batches, seq_len)
        model.load_state_dict(init_model)
        for o, s in zip(optimizers, init_opts):
            o.load_state_dict(s)
        D.sync(device)
        log.stage("warmup", time.perf_counter() - t_w, steps=cfg.warmup_steps, charged="no")

    torch.manual_seed(cfg.seed)
    loader = TrainLoader(train_pattern(cfg.data_path), dinfo.rank, dinfo.world_size, device, cfg.vocab_size)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay else None
    budget_s = cfg.train_budget_seconds
    tokens_per_step = local_tokens * dinfo.world_size * cfg.grad_accum_steps
    D.barrier()
    D.sync(device)
    train_time = 0.0
    t0 = time.perf_counter()
    step, stopped_by, last_loss = 0, "iterations", float("nan")
    # [out of time, non-finite loss, recurrence due, context stage due]: agreed by every rank in the one all-reduce the
    # step already makes, so a NaN stops training at the step it appears (issue 10) and every rank switches the depth
    # loop on, and moves to a longer context, at the same step (each rank's own clock could put a switch one step
    # apart; MAX: the rank furthest on decides), without a second collective per step
    stop_flag = torch.zeros(4, device=device)
    stop_flag[2] = float(looped and recurrence_due(0.0, cfg.recur_from_progress))
    progress = 0.0
    if seq.staged:
        log(f"train_seq_schedule:{seq.describe()} train_seq_len:{seq.length} tokens_per_step:{tokens_per_step}")
    while step < cfg.iterations:
        t_step = time.perf_counter()
        elapsed = train_time + (t_step - t0)
        apply_schedule(optimizers, step, elapsed, cfg)
        if looped and bool(stop_flag[2].item()) != model.recur_active:
            model.recur_active = not model.recur_active
            log(f"recurrence:{'on' if model.recur_active else 'off'} step:{step} layers:{model.layer_order()}")
        if seq.staged and seq.advance(int(stop_flag[3].item())):
            log(f"train_seq_len:{seq.length} step:{step} progress:{progress:.3f}")
        batches = [loader.next_batch(local_tokens, seq.length, bos_id) for _ in range(cfg.grad_accum_steps)]
        loss = step_on(batches, seq.length)
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
        stop = out_of_time(stop_flag, elapsed, step, now - t_step, budget_s) and step < cfg.iterations
        if stop_flag[1].item():
            raise NonFiniteError(nonfinite_message(step, float(loss.item()), cfg))
        last_step = stop or step == cfg.iterations
        if step % cfg.train_log_every == 0 or last_step or step <= 2:
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
                       files_read=list(loader.files_read))
