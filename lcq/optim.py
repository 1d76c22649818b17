"""Muon for 2-D hidden matrices, Adam for the embedding and the scalars; LR schedule; EMA of the weights."""
from __future__ import annotations

import torch
import torch.nn as nn

from .config import Config


def newton_schulz(g: torch.Tensor, steps: int) -> torch.Tensor:
    """Approximately orthogonalise g (replace its singular values by ~1) with a quintic Newton-Schulz iteration.

    Coefficients (3.4445, -4.7750, 2.0315) are the ones Keller Jordan tuned for Muon (modded-nanogpt): they push singular
    values into roughly [0.7, 1.2] in five steps, which works as well as exact orthogonalisation for the update."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    transposed = x.size(0) > x.size(1)
    if transposed:
        x = x.T
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        m = x @ x.T
        x = a * x + (b * m + c * m @ m) @ x
    if transposed:
        x = x.T
    return x.to(g.dtype)


class Muon(torch.optim.Optimizer):
    """SGD-momentum (Nesterov) whose update is orthogonalised per matrix (Muon, Jordan et al. 2024).

    Every rank holds the same all-reduced gradients, so every rank computes the same update: no extra communication."""

    def __init__(self, params, lr: float, momentum: float, backend_steps: int, weight_decay: float):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(p.grad)
                update = p.grad.add(buf, alpha=group["momentum"])
                update = newton_schulz(update, group["backend_steps"])
                # Scale so the update's RMS does not shrink for wide matrices (modded-nanogpt's max(1, rows/cols)^0.5).
                update = update * max(1.0, p.size(0) / p.size(1)) ** 0.5
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"])


def build_optimizers(model: nn.Module, cfg: Config) -> list[torch.optim.Optimizer]:
    """Muon for the 2-D matrices inside the blocks; Adam for the tied embedding and every vector/scalar parameter."""
    matrices, scalars = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or name == "tok_emb.weight":
            continue
        (matrices if p.ndim == 2 and name.startswith("blocks.") else scalars).append(p)
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    adam = torch.optim.Adam(
        [dict(params=[model.tok_emb.weight], lr=cfg.embed_lr, base_lr=cfg.embed_lr),
         dict(params=scalars, lr=cfg.scalar_lr, base_lr=cfg.scalar_lr)],
        betas=betas, eps=cfg.adam_eps, fused=next(model.parameters()).is_cuda)
    muon = Muon(matrices, lr=cfg.matrix_lr, momentum=cfg.muon_momentum, backend_steps=cfg.muon_backend_steps,
                weight_decay=cfg.muon_weight_decay)
    for g in muon.param_groups:
        g["base_lr"] = cfg.matrix_lr
    return [adam, muon]


def lr_multiplier(step: int, elapsed_s: float, cfg: Config) -> float:
    """Linear warm-up by steps, then constant, then a linear warmdown to 0 over the last `warmdown_frac` of progress.

    Progress is the larger of step/ITERATIONS and elapsed/train budget, so a wallclock-capped run still decays to ~0 when
    its time is up rather than stopping at full LR."""
    if cfg.lr_warmup_steps and step < cfg.lr_warmup_steps:
        return (step + 1) / cfg.lr_warmup_steps
    progress = max(step / cfg.iterations, elapsed_s / cfg.train_budget_seconds)
    if cfg.warmdown_frac <= 0:
        return 1.0
    return max(0.0, min(1.0, (1.0 - progress) / cfg.warmdown_frac))


def apply_schedule(optimizers, step: int, elapsed_s: float, cfg: Config) -> float:
    mult = lr_multiplier(step, elapsed_s, cfg)
    frac = min(step / cfg.muon_momentum_warmup_steps, 1.0) if cfg.muon_momentum_warmup_steps else 1.0
    momentum = (1 - frac) * cfg.muon_momentum_warmup_start + frac * cfg.muon_momentum
    for opt in optimizers:
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * mult
            if isinstance(opt, Muon):
                g["momentum"] = momentum
    return mult


class EMA:
    """Exponential moving average of the float parameters; its weights become the final model."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().clone().float() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            self.shadow[n].lerp_(p.detach().float(), 1 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            p.copy_(self.shadow[n].to(p.dtype))
