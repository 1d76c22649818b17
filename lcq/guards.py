"""The non-finite guard: a NaN/inf loss or weight stops the run by name before anything built from it is quantized,
shipped or scored. Raised by training (lcq/train.py) and reported by the pipeline's exit status; kept apart from the
start-up checks (lcq/checks.py), which run before step 1.
"""
from __future__ import annotations

import math

import torch


class NonFiniteError(RuntimeError):
    """A loss or weights that are NaN/inf: nothing built from them may be quantized, shipped or scored."""


def check_finite_weights(model: torch.nn.Module, where: str) -> None:
    """Every parameter and buffer finite; otherwise NonFiniteError naming the first bad tensors."""
    bad = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise NonFiniteError(f"{where}: non-finite weights in {bad[:5]}; nothing shipped. Fix: lower MATRIX_LR/"
                             "EMBED_LR/SCALAR_LR or set GRAD_CLIP_NORM")


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
