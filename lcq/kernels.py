"""Fused training kernels (issue 18), each beside the torch reference it must match.

- mlp(x, w1, w2, slope) = leaky_relu(x @ w1.T, slope)^2 @ w2.T, the MLP with its LeakyReLU^2 up-projection fused (#1855
  has such a Triton kernel). Autograd keeps one N x hidden tensor, the pre-activation; the backward's kernel forms the
  gradient of the pre-activation and recomputes the activation from it in one pass. The unfused graph keeps three.
- softcap_ce(logits, targets, cap, cap_neg) = mean cross-entropy of softcap(logits), as #1855's fused softcapped CE:
  one kernel per row reads the raw logits, sums the exponentials, then writes the loss and its gradient, the softcap
  recomputed from the raw logits in registers: the softcapped logits are never written, in fp32 or any dtype. With
  cap_neg it is the asymmetric softcap (#1923 -> #2130), the caps read from the device, never the host.

The Triton kernels run on CUDA tensors when triton imports, and on CPU tensors under TRITON_INTERPRET=1 (how
tests/test_kernels.py checks them); the torch reference, the unfused math the model ran before, runs everywhere else
(on CPU the fused graphs' extra recomputation made a demo step slower, measured side by side). The kernels use plain
tl.load/tl.dot block loops, which is what the interpreter runs.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(t: torch.Tensor) -> bool:
    return triton is not None and (t.is_cuda or INTERPRET)


def mlp_ref(x, w1, w2, slope: float):
    return F.linear(F.leaky_relu(F.linear(x, w1), slope).square(), w2)


def softcap(z, cap, cap_neg=None):
    """cap * tanh(z / cap); with cap_neg (#1923's asymmetric softcap) cap_neg * tanh(z / cap_neg) where z < 0. Both caps
    equal to the scalar cap give cap * tanh(z / cap) bit for bit (tests/test_model.py)."""
    if cap_neg is None:
        return cap * torch.tanh(z / cap)
    return torch.where(z >= 0, cap * torch.tanh(z / cap), cap_neg * torch.tanh(z / cap_neg))


def ce_ref(z, t, cap, cap_neg=None):
    return F.cross_entropy(softcap(z.float(), cap, cap_neg), t)


if triton is not None:
    @triton.jit
    def _up_kernel(a, b, pre, o1, o2, M, N, K, slope, FWD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                   BK: tl.constexpr):
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K, BK):
            rk = k + tl.arange(0, BK)
            x = tl.load(a + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
            y = tl.load(b + rn[:, None] * K + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < K), other=0.0)
            acc = tl.dot(x, tl.trans(y), acc)
        off = rm[:, None] * N + rn[None, :]
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        acc = acc.to(o1.dtype.element_ty).to(tl.float32)  # the activation of the stored (rounded) pre-activation
        if FWD:
            h = acc
            out = acc
        else:
            h = tl.load(pre + off, mask=mask, other=0.0).to(tl.float32)
            out = acc * tl.where(h > 0, 2 * h, 2 * slope * slope * h)
        act = tl.where(h > 0, h, slope * h)
        tl.store(o1 + off, out.to(o1.dtype.element_ty), mask=mask)
        tl.store(o2 + off, (act * act).to(o2.dtype.element_ty), mask=mask)

    @triton.jit
    def _ce_kernel(z, t, loss, dz, V, stride, caps, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        base, tr = z + row * stride, tl.load(t + row)
        cp, cn = tl.load(caps), tl.load(caps + 1)  # the caps of positive and negative logits
        total = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32)
            c = tl.where(x >= 0, cp, cn)
            # the softcapped logits lie in [-cn, cp], so cp is a safe shift for the exponentials: no running max
            total += tl.where(cols < V, tl.exp((c - cp) - 2 * c / (1 + tl.exp(2 * x / c))), 0.0)
        lse = cp + tl.log(tl.sum(total, axis=0))
        for start in range(0, V, BLOCK):  # second pass: d loss / d logit, softcap recomputed from the logits
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32)
            c = tl.where(x >= 0, cp, cn)
            th = 1 - 2 / (1 + tl.exp(2 * x / c))
            tl.store(dz + row * V + cols, ((tl.exp(c * th - lse) - (cols == tr)) * (1 - th * th)).to(
                dz.dtype.element_ty), mask=cols < V)
        xt = tl.load(base + tr).to(tl.float32)
        ct = tl.where(xt >= 0, cp, cn)
        tl.store(loss + row, lse - ct + 2 * ct / (1 + tl.exp(2 * xt / ct)))


def up(a, b, slope: float, pre=None):
    """a (M, K), b (N, K). Forward (pre None): (a @ b.T, leaky(a @ b.T)^2). Backward (pre given, a the gradient of the
    MLP's output, b its down-projection transposed): (a @ b.T * d leaky(pre)^2 / d pre, leaky(pre)^2)."""
    a, b = a.contiguous(), b.contiguous()
    (m, k), n = a.shape, b.shape[0]
    o1, o2 = a.new_empty(m, n), a.new_empty(m, n)
    _up_kernel[(triton.cdiv(m, 64), triton.cdiv(n, 64))](a, b, o1 if pre is None else pre, o1, o2, m, n, k, slope,
                                                        FWD=pre is None, BM=64, BN=64, BK=32)
    return o1, o2


class _MLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, w2, slope):
        pre, post = up(x, w1, slope)
        ctx.save_for_backward(x, w1, w2, pre)
        ctx.slope = slope
        return post @ w2.t()

    @staticmethod
    def backward(ctx, g):
        x, w1, w2, pre = ctx.saved_tensors
        dpre, post = up(g, w2.t(), ctx.slope, pre)
        return dpre @ w1, dpre.t() @ x, g.t() @ post, None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run a matmul of x in (x's own outside autocast)."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def mlp(x, w1, w2, slope: float):
    """x: (N, d); w1: (hidden, d); w2: (d, hidden), fp32 master weights cast to the compute dtype here."""
    if not use_triton(x):
        return mlp_ref(x, w1, w2, slope)
    dt = compute_dtype(x)
    return _MLP.apply(x.to(dt), w1.to(dt), w2.to(dt), slope)


class _CE(torch.autograd.Function):
    """The forward forms the per-row loss and its gradient in one pass over the logits (two reads of each row, as a
    forward and a recomputing backward would make); autograd keeps that gradient, the size of the logits, and the
    backward only scales it."""

    @staticmethod
    def forward(ctx, z, t, caps):
        loss, dz = z.new_empty(z.size(0), dtype=torch.float32), torch.empty_like(z)
        _ce_kernel[(z.size(0),)](z, t, loss, dz, z.size(1), z.stride(0), caps, BLOCK=1024)
        ctx.save_for_backward(dz)
        return loss

    @staticmethod
    def backward(ctx, g):
        return ctx.saved_tensors[0] * g[:, None].to(ctx.saved_tensors[0].dtype), None, None


def softcap_ce(logits, targets, cap, cap_neg=None):
    """Mean cross-entropy of softcap(logits, cap, cap_neg); logits (N, V) in the head's dtype, targets (N,) int64.
    cap: a float, or with cap_neg two 0-d tensors (the model's learned caps, which training leaves alone, #2135): the
    kernel's gradient goes to the logits only."""
    if not use_triton(logits):
        return ce_ref(logits, targets, cap, cap_neg)
    caps = logits.new_full((2,), cap, dtype=torch.float32) if cap_neg is None else torch.stack((cap, cap_neg))
    return _CE.apply(logits.contiguous(), targets, caps).mean()
