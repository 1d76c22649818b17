"""The LCQ stage (lcq_stage) and its policy: which tensors get a low-rank correction and at what rank (byte or rank
allocation), its closed-form init, its distillation and that distillation's budget. lcq/lora.py is the mechanics.

LQER is this stage with no distillation steps (LCQ_MAX_STEPS=0): the closed form ships as fitted, in the same `lora`
section, under the same gate.

Distillation: the float (EMA) teacher distilled into the dequantized model through LoRA factors, on train tokens, on
a clock.

Student = the model decoded from the GPTQ weights + LoRA; teacher = the pre-quantization model; loss = tau^2 *
KL(teacher || student) over next-token distributions of train-shard tokens (never val). Only the factors train (AdamW);
their gradients are all-reduced every step, so every rank holds the same factors at every step (a public attempt
averaged per-rank factors once at the end, and the mean of products is not the product of means).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import artifact
from . import dist as D
from .config import Config
from .data import TrainLoader, train_pattern
from .gptq import QuantSpec, quantize_state
from .lora import (DEFAULT_TARGETS, LORA_SECTION_BYTES, FactorFormat, allocate_bytes, attach_lora,
                   config_format, factor_bytes, init_act_svd, init_grail, init_svd, lora_modules, lora_parameters,
                   match_targets, merge_lora, recoverable_energy, set_format)
from .model import autocast_for, stored_weight
from .script import shipped_script
from .shipping import TIED, WRITE_SECONDS, model_from_state, pack_lora, plan_serialize
from .train import all_reduce_grads, out_of_time


@dataclass
class DistillResult:
    steps: int
    seconds: float
    tokens_per_step: int
    kl_start: float  # held-out train batch, before any step (after the init)
    kl_end: float
    stopped_by: str


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Mean over tokens of tau^2 * KL(softmax(t / tau) || softmax(s / tau)).

    tau > 1 flattens both distributions, which up-weights the teacher's tail; the tau^2 factor keeps gradient size
    comparable across temperatures (Hinton et al. 2015)."""
    t = F.log_softmax(teacher_logits.float() / tau, dim=-1)
    s = F.log_softmax(student_logits.float() / tau, dim=-1)
    return (tau * tau) * (t.exp() * (t - s)).sum(-1).mean()


@torch.no_grad()
def heldout_kl(student: nn.Module, teacher: nn.Module, batch, cfg: Config, dinfo: D.DistInfo) -> float:
    """KL on a fixed batch of train tokens, averaged over ranks."""
    x, _, cu = batch
    with autocast_for(dinfo.device, cfg.autocast_cpu_bf16):
        kl = kl_divergence(student(x, cu, cfg.train_seq_len), teacher(x, cu, cfg.train_seq_len), cfg.lcq_temperature)
    return float(D.all_reduce_sum(kl.detach().clone()).item()) / dinfo.world_size


@torch.no_grad()
def init_factors(student: nn.Module, teacher: nn.Module, method: str, hessians: dict[str, torch.Tensor],
                 run_calibration, ridge: float) -> None:
    """Closed-form LoRA init for every wrapper of the student (B = 0 stays for `zero`).

    svd: top-r SVD of W - W_hat (LQER). act_svd: the same, weighted by the GPTQ Hessian of the layer's inputs (EoRA,
    QERA, ASER). grail: ridge regression from the student's own layer inputs to the teacher's layer outputs, then the
    rank-r part (after GRAIL), which also corrects error that earlier quantized layers pushed into this layer's inputs.
    run_calibration(model) runs the given model on calibration train batches."""
    wrappers = lora_modules(student)
    teacher_mods = dict(teacher.named_modules())
    if method == "zero":
        return
    if method in ("svd", "act_svd"):
        for name, m in wrappers.items():
            W = teacher_mods[name].weight.float()
            E = W - m.base.weight.float()
            if method == "svd":
                B, A = init_svd(E, m.rank, m.scale)
            else:
                B, A = init_act_svd(E, hessians[stored_weight(name)], m.rank, m.scale)
            m.set_factors(B, A)
        return
    if method != "grail":
        raise ValueError(f"LCQ_INIT={method!r}: choose zero, svd, act_svd or grail")
    h_hat, cross = collect_paired_inputs(student, teacher, list(wrappers), run_calibration)
    for name, m in wrappers.items():
        B, A = init_grail(teacher_mods[name].weight.float(), m.base.weight.float(), h_hat[name], cross[name],
                          m.rank, m.scale, ridge)
        m.set_factors(B, A)


@torch.no_grad()
def collect_paired_inputs(student: nn.Module, teacher: nn.Module, names: list[str], run_calibration):
    """Per module: H_hat = X_hat^T X_hat / n and C = X_hat^T X / n, X_hat the student's inputs and X the teacher's on the
    same tokens. The teacher runs first on each batch and its inputs wait in memory until the student's pass. A module
    run several times per forward (depth recurrence, lcq/recurrence.py) queues one input per pass, pairs them in order,
    and is normalised by its own count of rows, so its statistics cover every pass of the one stored layer.

    The sums are float32 and accumulate with autocast off: run_calibration runs the models under bf16 autocast on CUDA,
    where a plain `xh.T @ xh` would be a bf16 matmul and the running sum (and its all-reduce) bf16, with ~3 significant
    digits over thousands of tokens (issue 8)."""
    s_mods, t_mods = dict(student.named_modules()), dict(teacher.named_modules())
    pending: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    h_hat: dict[str, torch.Tensor] = {}
    cross: dict[str, torch.Tensor] = {}
    count = {n: 0 for n in names}

    def grab_teacher(name):
        def hook(_, inputs):
            pending[name].append(inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float())
        return hook

    def grab_student(name):
        def hook(_, inputs):
            xh = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            x = pending[name].pop(0)
            if name not in h_hat:
                h_hat[name] = xh.new_zeros(xh.shape[1], xh.shape[1])
                cross[name] = xh.new_zeros(xh.shape[1], x.shape[1])
            with torch.autocast(xh.device.type, enabled=False):
                h_hat[name].addmm_(xh.T, xh)
                cross[name].addmm_(xh.T, x)
            count[name] += xh.shape[0]
        return hook

    handles = []
    try:
        for n in names:
            handles.append(t_mods[n].register_forward_pre_hook(grab_teacher(n)))
            handles.append(s_mods[n].register_forward_pre_hook(grab_student(n)))
        run_calibration(teacher, student)
    finally:
        for h in handles:
            h.remove()
    totals = torch.tensor([float(count[n]) for n in names], device=next(student.parameters()).device)
    D.all_reduce_sum(totals)
    for n, total in zip(names, totals):
        D.all_reduce_sum(h_hat[n])
        D.all_reduce_sum(cross[n])
        h_hat[n] /= total
        cross[n] /= total
    return h_hat, cross


def energy_report(errors: dict[str, tuple[torch.Tensor, torch.Tensor]], ranks: dict[str, int]) -> dict[str, dict]:
    """Per tensor: rho = share of its Hessian-weighted quantization error energy tr(E H E^T) that its top-r weighted
    directions hold (what a rank-r correction can remove at best), the energy itself, and r."""
    out = {}
    for name, r in ranks.items():
        E, H = errors[name]
        energy = float(torch.einsum("oi,ij,oj->", E.double(), H.double(), E.double()))
        out[name] = dict(rho=recoverable_energy(E, H, r), energy=energy, rank=r)
    return out


def distill(student: nn.Module, teacher: nn.Module, cfg: Config, dinfo: D.DistInfo, log, bos_id: int,
            seconds: float | Callable[[float], float]) -> DistillResult:
    """Train the student's LoRA factors for at most `seconds` of wall time (and LCQ_MAX_STEPS steps).

    `seconds` may be a function of the distillation time elapsed that returns the budget as it stands then, asked once
    per step: the pipeline shrinks it when the artifact's model section, compressing on host threads, is projected to
    finish late (issue 8). It must return the same value on every rank (the LR schedule reads it)."""
    given = seconds if callable(seconds) else (lambda _elapsed: seconds)
    device = dinfo.device
    params = lora_parameters(student)
    opt = torch.optim.AdamW(params, lr=cfg.lcq_lr, betas=(0.9, 0.99), weight_decay=0.0)
    local = max(2, cfg.lcq_batch_tokens // dinfo.world_size)
    loader = TrainLoader(train_pattern(cfg.data_path), dinfo.rank, dinfo.world_size, device,
                         vocab_size=cfg.vocab_size)
    # A fixed held-out batch, taken from train shards before any training step, so a log shows whether KL moved.
    heldout = loader.next_batch(local, cfg.train_seq_len, bos_id)
    teacher.eval()
    student.train()
    t_kl = time.perf_counter()
    kl_start = heldout_kl(student, teacher, heldout, cfg, dinfo)
    # The closing held-out KL runs after the last step: keep its time (twice the measured one, for a loaded host) out
    # of the step budget, so the stage ends inside its share of the clock, not LCQ_SAFETY_SECONDS past it.
    kl_reserve = 2.0 * (time.perf_counter() - t_kl)

    def budget_at(elapsed: float) -> float:
        return given(elapsed) - kl_reserve

    log(f"lcq_step:0/{cfg.lcq_max_steps} heldout_kl:{kl_start:.6f} lcq_time:0ms")
    autocast = autocast_for(device, cfg.autocast_cpu_bf16)
    D.sync(device)
    t0 = time.perf_counter()
    seconds = budget_at(0.0)
    step, stopped_by = 0, "max_steps" if seconds > 0 else "no_time"
    stop_flag = torch.zeros((), device=device)
    kl = kl_start
    while step < cfg.lcq_max_steps and seconds > 0:
        t_step = time.perf_counter()
        # Constant LR, then a linear decay to 0 over the last LCQ_WARMDOWN_FRAC of progress (the larger of the step and
        # the time fraction). Early steps get exactly the base LR, so a step-bound run is reproducible.
        progress = max(step / cfg.lcq_max_steps, (time.perf_counter() - t0) / seconds)
        mult = min(1.0, max(0.0, (1.0 - progress) / cfg.lcq_warmdown_frac)) if cfg.lcq_warmdown_frac else 1.0
        for g in opt.param_groups:
            g["lr"] = cfg.lcq_lr * mult
        x, _, cu = loader.next_batch(local, cfg.train_seq_len, bos_id)
        with torch.no_grad(), autocast:
            t_logits = teacher(x, cu, cfg.train_seq_len)
        with autocast:
            s_logits = student(x, cu, cfg.train_seq_len)
            loss = kl_divergence(s_logits, t_logits, cfg.lcq_temperature)
        loss.backward()
        all_reduce_grads(params, dinfo.world_size)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        now = time.perf_counter()
        # one more step's time kept back: the stage's tail after the loop (pack, sync) on a loaded host (issue 28: a
        # step of a loaded 2-core box landed 0.65 s past LCQ's budget)
        seconds = budget_at(now - t0) - (now - t_step)
        stop = out_of_time(stop_flag, now - t0, step, now - t_step, seconds)
        if step % cfg.lcq_log_every == 0 or stop or step == cfg.lcq_max_steps:
            kl = heldout_kl(student, teacher, heldout, cfg, dinfo)
            elapsed = time.perf_counter() - t0
            log(f"lcq_step:{step}/{cfg.lcq_max_steps} train_kl:{loss.item():.6f} heldout_kl:{kl:.6f} "
                f"lcq_time:{elapsed * 1000:.0f}ms step_avg:{elapsed * 1000 / step:.2f}ms")
        if stop:
            stopped_by = "wallclock"
            break
    D.sync(device)
    seconds_used = time.perf_counter() - t0
    # Every way out of the loop after a step logs the held-out KL (a stop or the last step), so that is the final one.
    kl_end = kl
    student.eval()
    return DistillResult(steps=step, seconds=seconds_used, tokens_per_step=local * dinfo.world_size,
                         kl_start=kl_start, kl_end=kl_end, stopped_by=stopped_by)


# ---- the stage: targets, rank and byte allocation, budget (lcq.pipeline.lcq wires it) ---------------------------

def lora_bytes_per_rank(model: nn.Module, names: list[str], fmt: FactorFormat) -> float:
    """Upper estimate of the artifact bytes one unit of rank costs over `names`: the codes as if incompressible plus
    their fp16 scales."""
    mods = dict(model.named_modules())
    return sum(factor_bytes(mods[n].in_features, mods[n].out_features, 1, fmt) for n in names)


def lora_room(run) -> int:
    """Bytes the code and the base model's real section leave under the cap, less LCQ_AUTO_HEADROOM_BYTES.

    It waits for the base model's section (compressed on host threads since GPTQ) to know its real bytes (an estimate
    could overshoot the cap and fail the gate at the end of a paid run); the wait is charged to LCQ's time."""
    cfg = run.cfg
    # rank 0 is already rendering the script on a thread (start_base_section); asking again would render it twice
    code = len(run.script_job.result() if run.script_job is not None else shipped_script())
    mine = artifact.HEADER_BYTES + sum(s.nbytes for s in run.base_job.sections()) if run.base_job is not None else 0
    model_bytes = int(D.all_reduce_max(torch.tensor(mine, dtype=torch.int64, device=run.dinfo.device)).item())
    room = cfg.artifact_cap_bytes - code - model_bytes - cfg.lcq_auto_headroom_bytes
    run.log(f"lcq_room: code {code} + model {model_bytes} bytes leave {room} under the cap (headroom "
            f"{cfg.lcq_auto_headroom_bytes})")
    return room


def auto_rank(run, names: list[str], model: nn.Module) -> int:
    """The largest uniform rank whose factors fit under the cap next to the code and the quantized model."""
    cfg = run.cfg
    room = lora_room(run)
    rank = max(0, int(room // lora_bytes_per_rank(model, names, config_format(cfg))))
    mods = dict(model.named_modules())
    rank = min(rank, min(min(mods[n].in_features, mods[n].out_features) for n in names))
    run.log(f"lcq_auto_rank: {room} bytes under the cap; rank {rank}")
    return rank


def byte_allocation(run, names: list[str]) -> tuple[dict[str, int], dict[str, dict]]:
    """LCQ_BYTES spent by lcq.lora.allocate_bytes over `names`; logs one row per tensor given a rank."""
    cfg = run.cfg
    # the section's raw bytes beyond the factors' entries: its manifest frame and the LoRA meta (ranks, alpha, format)
    budget = (lora_room(run) if cfg.lcq_bytes == "auto" else int(cfg.lcq_bytes)) - LORA_SECTION_BYTES
    max_rank = 64 if cfg.lcq_rank == "auto" else int(cfg.lcq_rank)
    ranks, fits, rows = allocate_bytes(quant_errors(run, names), max(0, budget), config_format(cfg), cfg.lcq_alpha,
                                       max_rank)
    spent = sum(b for _, _, b, _ in rows)
    run.log(f"lcq_alloc: {sum(ranks.values())} rank units over {len(rows)} of {len(names)} tensors, {spent:.0f} of "
            f"{budget} bytes")
    for n, r, b, gain in rows:
        run.log(f"lcq_alloc: {n} rank {r} bytes {b:.0f} error removed {gain:.6g}")
    return ranks, fits


def quant_errors(run, names: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module: (W - W_hat, H) from the float model and the GPTQ weights."""
    return {n: (run.model.get_submodule(n).weight.detach().float() - run.gptq_state[stored_weight(n)].float(),
                run.hessians[stored_weight(n)]) for n in names}


def lora_raw_bytes(model: nn.Module, ranks: dict[str, int], fmt: FactorFormat) -> int:
    """Upper estimate of the LoRA section's uncompressed bytes: the factors (lcq.lora.factor_bytes) and ~200 bytes of
    manifest per target."""
    mods = dict(model.named_modules())
    return int(sum(factor_bytes(mods[n].in_features, mods[n].out_features, r, fmt) + 200 for n, r in ranks.items()))


def lcq_target_names(model: nn.Module, cfg: Config) -> list[str]:
    patterns = [p.strip() for p in cfg.lcq_targets.split(",") if p.strip()] or list(DEFAULT_TARGETS)
    try:
        names = match_targets(model, patterns)
    except ValueError as e:
        raise ValueError(f"LCQ_TARGETS: {e}") from None
    mods = dict(model.named_modules())
    not_linear = [n for n in names if not isinstance(mods[n], nn.Linear)]
    if not_linear:
        raise ValueError(f"LCQ_TARGETS matches modules that are not linear layers: {not_linear[:3]}; "
                         "name linear layers such as blocks.*.attn.c_q")
    if cfg.lcq_merge == "baked" and "lm_head" in names:
        raise ValueError("LCQ_MERGE=baked cannot target lm_head: its weight is the tied embedding; drop lm_head from "
                         "LCQ_TARGETS or use side/fused")
    return names


def lcq_diagnostic(run) -> float | None:
    """rho per tensor: the share of its Hessian-weighted quantization error that its LoRA rank can capture at best.
    Pure reporting, so it runs after the training clock stops."""
    ranks = {n: r for n, r in run.lcq_ranks.items() if r}
    if not ranks:
        return None
    report = energy_report(quant_errors(run, list(ranks)), ranks)
    total_energy = sum(v["energy"] for v in report.values()) or 1.0
    rho_total = sum(v["rho"] * v["energy"] for v in report.values()) / total_energy
    worst = sorted(report.items(), key=lambda kv: kv[1]["rho"])[:3]
    run.log(f"lcq_rho: total {rho_total:.4f} (share of the Hessian-weighted error energy the ranks can capture); "
            "lowest: " + " ".join(f"{n}:{v['rho']:.3f}(r={v['rank']})" for n, v in worst))
    run.log.summary["lcq_rho"] = {"total": rho_total, **{n: round(v["rho"], 5) for n, v in report.items()}}
    return rho_total


def distill_budget(run, initial: float, window: float, lora_s: float, lora_bytes: int = 0):
    """Distillation's budget as a function of its elapsed seconds, re-read every step (lcq.distill): `initial` (from
    the plan), shrunk by however late the model section is projected to finish now, from the rates its job keeps
    measuring (an early projection is optimistic: brotli slows as its window fills, and a shared host's load moves).
    A plan made before any chunk was timed kept SERIALIZE_RESERVE_SECONDS (plan_serialize); when the first projection
    arrives, LCQ takes back what it does not need (issue 25), the LoRA section (`lora_bytes` raw) priced at the
    measured rates. Rank 0 projects and every rank gets its value (one scalar all-reduce per step). `window` is what
    LCQ could use before any serialization."""
    job, cfg = run.base_job, run.cfg
    floor = float("-inf")
    ceiling, pending = initial, job is not None and job.rates() is None  # planned on the reserve: no chunk timed

    def budget(elapsed: float) -> float:
        nonlocal ceiling, pending, lora_s
        value = initial
        if job is not None and cfg.lcq_merge != "baked":
            left = job.seconds_left()
            if left is not None:
                if pending:  # the first projection since the plan
                    rates, pending = job.rates(), False
                    lora_s = lora_bytes * sum(1 / r for c, r in rates.items() if c not in job.dropped) / min(
                        job.threads, len(rates))
                    ceiling = min(cfg.lcq_seconds or math.inf, window - lora_s - WRITE_SECONDS)
                    run.log(f"lcq_budget: the model section's first projection came at {elapsed:.2f}s; distillation "
                            f"takes back {ceiling - initial:.2f}s of SERIALIZE_RESERVE_SECONDS")
                late = max(0.0, elapsed + left - (window - lora_s - WRITE_SECONDS))
                value = min(ceiling, window - lora_s - WRITE_SECONDS - late)
        mine = value if run.dinfo.is_master else floor
        value = float(D.all_reduce_max(torch.tensor(mine, dtype=torch.float64, device=run.dinfo.device)).item())
        if value != initial:  # the serialize stage gets what LCQ gave back, or gives back what it does not need
            run.serialize_budget = window - value
        return max(0.0, value)

    return budget


def lcq_stage(run, calibrate, spec: QuantSpec) -> None:
    """The LCQ stage on the pipeline's Run: attach LoRA to the dequantized model, initialise it in closed form, distil
    it against the float model on train tokens until the clock says stop (LCQ_MAX_STEPS=0: not at all, so the closed
    form ships as fitted: LQER), then pack it as shipped into run.lora_tensors / run.lora_meta (side/fused: quantized
    factors; baked: W + BA re-quantized by `spec` into run.qtensors / run.qmeta). calibrate(*models) runs models over
    calibration train batches (the grail init).

    The base model's artifact section is already compressing on host threads (lcq.pipeline.start_base_section); the
    distillation budget keeps back what serialization is projected to need from the rate that job measures."""
    cfg, dinfo = run.cfg, run.dinfo
    if not cfg.lcq_enabled:
        return
    D.sync(dinfo.device)
    t0 = time.perf_counter()
    if run.post is not None:  # issue 28: the closed form is budgeted from the probe (lcq/clock.py), or skipped
        slow = run.train_result.slowdown if run.train_result else 1.0
        need, room = slow * run.post.lcq_s, run.clock_left - cfg.lcq_safety_seconds - slow * run.post.serialize_s
        if need > room:
            run.log(f"lcq: skipped: the closed form is projected to need {need:.2f}s and {room:.2f}s are left before "
                    "serialize; shipping the GPTQ model alone")
            run.charge("lcq", time.perf_counter() - t0, rank=0, skipped="no time")
            return
    teacher = run.model
    student = model_from_state(cfg, run.bos_id, run.gptq_state, dinfo.device)
    names = lcq_target_names(student, cfg)
    fits = None
    if cfg.lcq_bytes != "0":
        ranks, fits = byte_allocation(run, names)
        rank = sum(ranks.values())
    else:
        rank = auto_rank(run, names, student) if cfg.lcq_rank == "auto" else int(cfg.lcq_rank)
    if rank == 0:
        run.log("lcq: no room for any LoRA rank under the cap; shipping the GPTQ model alone")
        run.charge("lcq", time.perf_counter() - t0, rank=0)
        return
    if fits is None:
        ranks = {n: rank for n in names}
    run.lcq_ranks = ranks
    torch.manual_seed(cfg.seed)  # the same A init on every rank
    wrappers = attach_lora(student, names, ranks, cfg.lcq_alpha)
    fmt, init = config_format(cfg), "closed_form" if fits is not None else cfg.lcq_init
    if fits is not None:  # the closed-form fits the allocation priced, on their own grids (frozen while distilling)
        for n, fit in fits.items():
            wrappers[n].set_factors(fit["B"].to(dinfo.device), fit["A"].to(dinfo.device))
            wrappers[n].fmt, wrappers[n].grid = fmt, tuple(t.to(dinfo.device) for t in fit["grid"])
    else:
        init_factors(student, teacher, cfg.lcq_init, run.hessians, calibrate, cfg.lcq_grail_ridge)
        if cfg.lcq_merge != "baked":  # side/fused ship the factors on this grid: train on it (baked re-quantizes W + BA)
            set_format(student, fmt)
    elapsed = time.perf_counter() - t0
    gptq_s = next(s for stage, s, _ in run.ledger if stage == "gptq") if cfg.lcq_merge == "baked" else 0.0
    left = run.clock_left - elapsed - cfg.lcq_safety_seconds - gptq_s
    serialize_s, lora_s = plan_serialize(run, left, 0 if cfg.lcq_merge == "baked" else
                                         lora_raw_bytes(student, ranks, fmt))
    seconds = left - serialize_s
    if cfg.lcq_seconds:
        seconds = min(seconds, cfg.lcq_seconds)
    seconds = max(0.0, seconds)
    run.log(f"lcq_budget: {seconds:.2f}s for distillation (clock left {run.clock_left - elapsed:.2f}s, serialize "
            f"{serialize_s:.2f}s projected, safety {cfg.lcq_safety_seconds:.1f}s"
            + (f", GPTQ again {gptq_s:.2f}s" if gptq_s else "") + ")")
    planned = run.serialize_budget
    res = distill(student, teacher, cfg, dinfo, run.log, run.bos_id,
                  distill_budget(run, seconds, left, lora_s, lora_raw_bytes(student, ranks, fmt))
                  if cfg.lcq_max_steps and seconds > 0 else 0.0)
    if run.serialize_budget is not None and planned is not None and run.serialize_budget > planned:
        run.log(f"lcq_budget: the model section was projected later as it went; distillation gave back "
                f"{run.serialize_budget - planned:.2f}s, serialize budget {run.serialize_budget:.2f}s")
    lcq_budget = run.clock_left - (run.serialize_budget if run.serialize_budget is not None else serialize_s)
    run.distill_result = res
    if cfg.lcq_merge == "baked":
        merge_lora(student)
        state = {k: v.detach() for k, v in student.state_dict().items()}
        run.qtensors, run.qmeta = quantize_state(state, run.hessians, spec, TIED)
        run.lora_meta = dict(merge="baked", init=cfg.lcq_init, ranks=ranks, alpha=cfg.lcq_alpha)
        if run.base_job is not None:  # compressed the weights before baking: ship compresses the new ones
            run.base_job.cancel()
            run.base_job = None
    else:
        run.lora_tensors, packed_ranks, alpha = pack_lora(student, fmt)
        run.lora_meta = dict(merge=cfg.lcq_merge, init=init, ranks=packed_ranks, alpha=alpha, format=list(fmt))
    D.sync(dinfo.device)
    run.charge("lcq", time.perf_counter() - t0, lcq_budget,
               rank="bytes" if fits is not None else cfg.lcq_rank,
               init=init, merge=cfg.lcq_merge,
               steps=res.steps, tokens_per_step=res.tokens_per_step, kl=f"{res.kl_start:.5f}->{res.kl_end:.5f}",
               stopped_by=res.stopped_by)
