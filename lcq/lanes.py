"""Parallel residual lanes (openai/parameter-golf PR #1530, kept by #1855 from layer 8 of 11).

From the first lane layer on, the residual stream splits into two lanes: the attention of each block reads lane 0 and
its MLP reads lane 1, side by side (no attention -> MLP dependency inside the block). Each lane then keeps a learned
multiple of itself and adds a learned mix of both branch outputs, so the network decides how much of each branch
each lane carries; U-Net skips land on lane 0. The output is the mean of the lanes.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class ParallelLanes(nn.Module):
    """The learned lane mix for layers start..num_layers-1 (one set of coefficients per stored layer)."""

    def __init__(self, start: int, num_layers: int):
        super().__init__()
        self.start = start
        n = num_layers - start
        # post[l, lane, branch]: how much of the attention (0) / MLP (1) output enters each lane; ones = plain residual.
        self.post = nn.Parameter(torch.ones(n, 2, 2))
        # resid[l, lane]: the lane's own carry-over; #1855 starts it at 1.1.
        self.resid = nn.Parameter(torch.full((n, 2), 1.1))

    def mix(self, layer: int, lane0, lane1, attn_out, mlp_out):
        post = self.post[layer - self.start].to(lane0.dtype)
        resid = self.resid[layer - self.start].to(lane0.dtype)
        new0 = resid[0] * lane0 + post[0, 0] * attn_out + post[0, 1] * mlp_out
        new1 = resid[1] * lane1 + post[1, 0] * attn_out + post[1, 1] * mlp_out
        return new0, new1

    @staticmethod
    def merge(lane0: torch.Tensor, lane1: torch.Tensor) -> torch.Tensor:
        return 0.5 * (lane0 + lane1)
