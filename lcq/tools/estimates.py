"""Estimates that preflight and gpu-check share: FA3's backward scratch and the Gaussian refill that bounds a trained
model's compressed bytes from above (README's preflight section says why)."""
from __future__ import annotations

import torch

from ..gptq import tensor_role
from ..shipping import TIED


def fa3_scratch_bytes(tokens: int, segments: int, heads: int, kv_heads: int, head_dim: int) -> int:
    """FA3's varlen backward scratch (issue 27): fp32 dq accumulators over round128(tokens + 128 * segments) rows for
    every head, and dk/dv accumulators over as many rows for the KV heads when they are fewer (GQA)."""
    rows = -(-(tokens + 128 * segments) // 128) * 128
    return rows * head_dim * 4 * (heads + (2 * kv_heads if kv_heads < heads else 0))


def gaussian_state(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Every quantized tensor refilled with N(0, 1) values of the same shape (tied weights stay tied)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in state.items():
        if name in TIED:
            continue
        out[name] = torch.randn(t.shape, generator=gen).to(t.device) if tensor_role(name, t) != "raw" else t
    for alias, target in TIED.items():
        if alias in state:
            out[alias] = out[target]
    return out
