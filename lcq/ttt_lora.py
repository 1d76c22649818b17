"""One LoRA per document slot, held as batched tensors, with its own AdamW state: what batched TTT trains (lcq/ttt.py).

#1855 adapts 64 documents at once, each with its own factors, A (S, r, in) and B (S, out, r), applied with batched
matmuls. Here every LoRALinear of the model (the shipped factors, or a zero-started adapter) is swapped for a SlotLoRA
that keeps the wrapper (its base layer, scale and the start factors) and adds S copies of the factors; the math is
lcq.lora.low_rank, the wrapper's own. The model's packed batch is S equal-length rows, slot s owning the tokens of row s.
A slot's factors and Adam moments reset to the start when a new document takes the slot; only slots that learn step.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .lora import LoRALinear, _set_submodule, lora_modules, low_rank


class SlotLoRA(nn.Module):
    def __init__(self, inner: LoRALinear, slots: int):
        super().__init__()
        self.inner = inner
        self.A = nn.Parameter(inner.lora_A.detach().expand(slots, -1, -1).clone())
        self.B = nn.Parameter(inner.lora_B.detach().expand(slots, -1, -1).clone())

    @property
    def base(self):  # paths through the wrapper stay valid: a branch LoRA's inner LoRAs sit under .base
        return self.inner.base

    def forward(self, x: torch.Tensor, *rest) -> torch.Tensor:
        n, s = x.shape[0], self.A.shape[0]
        low = low_rank(x.view(s, n // s, x.shape[-1]), self.A, self.B, self.inner.scale)
        return self.base(x, *rest) + low.reshape(n, -1)


class SlotAdapters:
    """Swap the model's LoRA wrappers for SlotLoRAs with `slots` slots (the base weights stay shared and frozen)."""

    def __init__(self, model: nn.Module, slots: int, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float):
        self.model, self.slots, self.lr, self.betas, self.eps, self.wd = model, slots, lr, betas, eps, weight_decay
        self.mods = {n: SlotLoRA(m, slots) for n, m in lora_modules(model).items()}
        # (factor, its start, Adam m, Adam v, is A)
        self.state = [(p, s.detach(), torch.zeros_like(p), torch.zeros_like(p), i == 0) for m in self.mods.values()
                      for i, (p, s) in enumerate(((m.A, m.inner.lora_A), (m.B, m.inner.lora_B)))]
        self.params = [x[0] for x in self.state]
        self.t = torch.zeros(slots, device=self.params[0].device)
        self.install()

    def install(self, back: bool = False) -> None:
        """Put the SlotLoRAs in (back: the LoRALinear wrappers, their start factors untouched)."""
        self.model.requires_grad_(False)
        for n, m in self.mods.items():
            _set_submodule(self.model, n, m.inner if back else m)
        for p in self.params:
            p.requires_grad_(True)

    @torch.no_grad()
    def reset(self, keep_a: bool = False) -> None:
        """Every slot back to the start factors with fresh Adam state; keep_a keeps A (TTT_WARM_START_A)."""
        for p, s, m, v, is_a in self.state:
            if not (keep_a and is_a):
                p.copy_(s.expand_as(p))
            m.zero_()
            v.zero_()
        self.t.zero_()

    @torch.no_grad()
    def step(self, learn: torch.Tensor) -> None:
        """One AdamW step (decoupled weight decay, bias-corrected, torch.optim.AdamW's update) on the slots of `learn`
        (bool (S,)); the other slots and their moments do not move. Gradients are cleared."""
        b1, b2 = self.betas
        a = learn.to(self.t.device)
        self.t.add_(a.float())
        t = self.t.clamp_min(1.0)[:, None, None]
        bc1, bc2 = 1 - b1 ** t, (1 - b2 ** t).sqrt()
        a = a[:, None, None]
        for p, _, m, v, _ in self.state:
            g = p.grad
            m.copy_(torch.where(a, b1 * m + (1 - b1) * g, m))
            v.copy_(torch.where(a, b2 * v + (1 - b2) * g * g, v))
            p.sub_(torch.where(a, p * (self.lr * self.wd) + (self.lr / bc1) * m / (v.sqrt() / bc2 + self.eps), 0.0))
            p.grad = None
