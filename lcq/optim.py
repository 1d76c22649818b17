"""Muon for 2-D hidden matrices, Adam for the embedding and the scalars; LR schedule; EMA of the weights."""
from __future__ import annotations

import torch
import torch.nn as nn

from .config import Config


# Quintic Newton-Schulz coefficients (a, b, c) per iteration, x <- a x + (b m + c m^2) x with m = x x^T.
# jordan: the one tuple Keller Jordan tuned for Muon (modded-nanogpt), used at every step; it pushes singular values
# into roughly [0.7, 1.2] in five steps. polar_express: Polar Express (Amsel et al. 2025) minimax tuples, a different
# one per step (openai/parameter-golf #1344, kept by #1787/#1855): a faster start on small singular values and a
# tighter band around 1 after five steps; steps past the table repeat its last (converged) tuple.
NS_COEFFS: dict[str, tuple[tuple[float, float, float], ...]] = {
    "jordan": ((3.4445, -4.7750, 2.0315),),
    "polar_express": (
        (8.156554524902461, -22.48329292557795, 15.878769915207462),
        (4.042929935166739, -2.808917465908714, 0.5000178451051316),
        (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
        (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
        (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
    ),
}


def newton_schulz(g: torch.Tensor, steps: int, coeffs: str = "jordan") -> torch.Tensor:
    """Approximately orthogonalise g (replace its singular values by ~1) with `steps` quintic Newton-Schulz iterations
    using the NS_COEFFS[coeffs] schedule; works as well as exact orthogonalisation for the Muon update."""
    table = NS_COEFFS[coeffs]
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    transposed = x.size(0) > x.size(1)
    if transposed:
        x = x.T
    x = x / (x.norm() + 1e-7)
    for i in range(steps):
        a, b, c = table[min(i, len(table) - 1)]
        m = x @ x.T
        x = a * x + (b * m + c * m @ m) @ x
    if transposed:
        x = x.T
    return x.to(g.dtype)


class Muon(torch.optim.Optimizer):
    """SGD-momentum (Nesterov) whose update is orthogonalised per matrix (Muon, Jordan et al. 2024).

    Every rank holds the same all-reduced gradients, so every rank computes the same update: no extra communication."""

    def __init__(self, params, lr: float, momentum: float, backend_steps: int, weight_decay: float,
                 ns_coeffs: str = "jordan"):
        if ns_coeffs not in NS_COEFFS:
            raise ValueError(f"Muon: ns_coeffs must be one of {sorted(NS_COEFFS)}, got {ns_coeffs!r}")
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps, weight_decay=weight_decay,
                                      ns_coeffs=ns_coeffs))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(p.grad)
                update = p.grad.add(buf, alpha=group["momentum"])
                update = newton_schulz(update, group["backend_steps"], group["ns_coeffs"])
                # Scale so the update's RMS does not shrink for wide matrices (modded-nanogpt's max(1, rows/cols)^0.5).
                update = update * max(1.0, p.size(0) / p.size(1)) ** 0.5
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"])


def build_optimizers(model: nn.Module, cfg: Config) -> list[torch.optim.Optimizer]:
    """Muon for the linear layers' weights inside the blocks; AdamW for the tied embedding and every other parameter
    (gains, gates, skip weights, lane mixes: #1855 routes these "control tensors" to Adam too, 2-D or not).
    Weight decay is decoupled; with EMBED/SCALAR_WEIGHT_DECAY at 0 AdamW is plain Adam."""
    matrices, scalars = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or name == "tok_emb.weight":
            continue
        is_matrix = p.ndim == 2 and name.startswith("blocks.") and name.endswith(".weight")
        (matrices if is_matrix else scalars).append(p)
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    adam = torch.optim.AdamW(
        [dict(params=[model.tok_emb.weight], lr=cfg.embed_lr, base_lr=cfg.embed_lr, weight_decay=cfg.embed_weight_decay),
         dict(params=scalars, lr=cfg.scalar_lr, base_lr=cfg.scalar_lr, weight_decay=cfg.scalar_weight_decay)],
        betas=betas, eps=cfg.adam_eps, fused=next(model.parameters()).is_cuda)
    muon = Muon(matrices, lr=cfg.matrix_lr, momentum=cfg.muon_momentum, backend_steps=cfg.muon_backend_steps,
                weight_decay=cfg.muon_weight_decay, ns_coeffs=cfg.muon_ns_coeffs)
    for g in muon.param_groups:
        g["base_lr"] = cfg.matrix_lr
    return [adam, muon]


def training_progress(step: int, elapsed_s: float, cfg: Config) -> float:
    """The larger of step/ITERATIONS and elapsed/train budget: a wallclock-capped run reaches 1 when its time is up."""
    return max(step / cfg.iterations, elapsed_s / cfg.train_budget_seconds)


def lr_multiplier(step: int, elapsed_s: float, cfg: Config) -> float:
    """Linear warm-up by steps, then constant, then a linear warmdown over the last `warmdown_frac` of progress, down to
    MIN_LR_FRAC (0 by default; #1787 keeps a 0.10 floor so the last steps still move the weights)."""
    if cfg.lr_warmup_steps and step < cfg.lr_warmup_steps:
        return (step + 1) / cfg.lr_warmup_steps
    if cfg.warmdown_frac <= 0:
        return 1.0
    progress = training_progress(step, elapsed_s, cfg)
    return max(cfg.min_lr_frac, min(1.0, (1.0 - progress) / cfg.warmdown_frac))


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
