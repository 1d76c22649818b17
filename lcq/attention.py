"""Causal attention over packed documents described by cu_seqlens.

Backends, best first: flash-attn 3 varlen, flash-attn 2 varlen, PyTorch SDPA with an explicit block-diagonal causal mask.
flash-attn needs CUDA to install, so it is imported lazily; the SDPA path is what CPU runs and tests use.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=None)
def _flash(kind: str):
    try:
        if kind == "fa3":
            from flash_attn_interface import flash_attn_varlen_func  # flash-attn 3 (Hopper)
        else:
            from flash_attn import flash_attn_varlen_func  # flash-attn 2
        return flash_attn_varlen_func
    except Exception:  # not installed, or built for another CUDA/torch
        return None


def resolve_backend(requested: str, device: torch.device) -> str:
    """The backend a run will use; an explicitly requested flash backend that cannot load is an error."""
    if device.type != "cuda":
        if requested in ("fa3", "fa2"):
            raise RuntimeError(f"ATTENTION_BACKEND={requested} needs a CUDA device; use sdpa or auto on CPU")
        return "sdpa"
    if requested == "auto":
        for kind in ("fa3", "fa2"):
            if _flash(kind) is not None:
                return kind
        return "sdpa"
    if requested in ("fa3", "fa2") and _flash(requested) is None:
        pkg = "flash_attn_interface (flash-attn 3)" if requested == "fa3" else "flash_attn (flash-attn 2)"
        raise RuntimeError(f"ATTENTION_BACKEND={requested}: cannot import {pkg}; install it or use auto/sdpa")
    return requested


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, backend: str = "sdpa") -> torch.Tensor:
    """q: (N, H, D); k, v: (N, Hkv, D) with H % Hkv == 0; cu_seqlens: int32 (S+1,) segment offsets.

    Returns (N, H, D). Token i attends to token j iff both lie in the same segment and j <= i."""
    if backend in ("fa3", "fa2"):
        fn = _flash(backend)
        out = fn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True)
        return out[0] if isinstance(out, tuple) else out
    return sdpa_varlen(q, k, v, cu_seqlens, max_seqlen)


def sdpa_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
    """SDPA with an explicit block-diagonal causal mask, computed block by block.

    A dense N x N mask would be quadratic in the packed length; instead queries are taken in blocks of max_seqlen and each
    block only sees keys from the start of the segment holding its first query, so no block is wider than 2 * max_seqlen."""
    n, h, d = q.shape
    hkv = k.shape[1]
    cu = cu_seqlens.to(device=q.device, dtype=torch.long)
    seg = torch.zeros(n, dtype=torch.long, device=q.device)
    seg[cu[1:-1]] = 1
    seg = torch.cumsum(seg, 0)  # segment id of every token
    seg_start = cu[:-1][seg]  # start offset of every token's segment
    pos = torch.arange(n, device=q.device)
    block = max(1, int(max_seqlen))
    out = torch.empty_like(q)
    for qs in range(0, n, block):
        qe = min(n, qs + block)
        ks = int(seg_start[qs])
        mask = (seg[qs:qe, None] == seg[None, ks:qe]) & (pos[ks:qe][None, :] <= pos[qs:qe, None])
        qb = q[qs:qe].transpose(0, 1).unsqueeze(0)  # (1, H, Bq, D)
        kb = k[ks:qe].transpose(0, 1).unsqueeze(0)
        vb = v[ks:qe].transpose(0, 1).unsqueeze(0)
        if hkv != h:
            kb = kb.repeat_interleave(h // hkv, dim=1)
            vb = vb.repeat_interleave(h // hkv, dim=1)
        ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask[None, None])
        out[qs:qe] = ob[0].transpose(0, 1)
    return out
