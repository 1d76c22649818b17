"""Causal attention over packed documents described by cu_seqlens.

Backends, best first: flash-attn 3 varlen, flash-attn 2 varlen, PyTorch SDPA with a block-diagonal causal mask.
flash-attn needs CUDA to install, so it is imported lazily; the SDPA path is what CPU runs and tests use. On CUDA the
SDPA path is only taken when asked for (ATTENTION_BACKEND=sdpa): it is several times slower than flash-attn at record
scale, and a run that fell back to it silently would spend its 600 s on a slower model.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

# kind -> (flash_attn_varlen_func, extra keyword arguments it needs) or (None, why it did not import). Filled by _flash()
# before any forward (resolve_backend runs when the model is built), so a compiled forward only reads this dict.
_KERNELS: dict[str, tuple] = {}

INSTALL_HINT = ("install flash-attn 3: `pip install --no-deps flash_attn_3 --find-links "
                "https://windreamer.github.io/flash-attention3-wheels/cu128_torch291/`")


def _load(kind: str):
    """(kernel, extra keywords) or (None, error). Every release is called with keywords only (see varlen_attention)."""
    try:
        if kind == "fa3":
            from flash_attn_interface import flash_attn_varlen_func  # flash-attn 3 (Hopper)
        else:
            from flash_attn import flash_attn_varlen_func  # flash-attn 2
    except Exception as e:  # not installed, or built for another CUDA/torch
        return None, f"{type(e).__name__}: {e}"
    # flash-attn 3 releases between Dao-AILab/flash-attention commits 7a802796 (2025-01-07) and a09abcd3 (2025-02-15)
    # take seqused_q/seqused_k as required arguments (before max_seqlen_q); later ones default them to None and put
    # them after max_seqlen_k, and releases before db803873 (2024-09-16) do not have them. Pass them only where required.
    try:
        params = inspect.signature(flash_attn_varlen_func).parameters
    except (TypeError, ValueError):  # a build whose entry point has no Python signature: pass nothing extra
        params = {}
    required = {n: None for n in ("seqused_q", "seqused_k")
                if n in params and params[n].default is inspect.Parameter.empty}
    return flash_attn_varlen_func, required


def _flash(kind: str):
    if kind not in _KERNELS:
        _KERNELS[kind] = _load(kind)
    fn, extra = _KERNELS[kind]
    return None if fn is None else (fn, extra)


def _import_error(kind: str) -> str:
    fn, extra = _KERNELS[kind]
    return extra if fn is None else ""


def resolve_backend(requested: str, device: torch.device) -> str:
    """The backend a run will use. On CUDA, flash-attn must import unless ATTENTION_BACKEND=sdpa is explicit."""
    if device.type != "cuda":
        if requested in ("fa3", "fa2"):
            raise RuntimeError(f"ATTENTION_BACKEND={requested} needs a CUDA device; use sdpa or auto on CPU")
        return "sdpa"
    if requested == "auto":
        for kind in ("fa3", "fa2"):
            if _flash(kind) is not None:
                return kind
        raise RuntimeError(f"ATTENTION_BACKEND=auto on CUDA: flash-attn 3 ({_import_error('fa3')}) and 2 "
                           f"({_import_error('fa2')}) do not import. {INSTALL_HINT}, or set ATTENTION_BACKEND=sdpa")
    if requested in ("fa3", "fa2") and _flash(requested) is None:
        raise RuntimeError(f"ATTENTION_BACKEND={requested}: cannot import it ({_import_error(requested)}); "
                           f"{INSTALL_HINT}, or use ATTENTION_BACKEND=auto/sdpa")
    return requested


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, backend: str = "sdpa") -> torch.Tensor:
    """q: (N, H, D); k, v: (N, Hkv, D) with H % Hkv == 0; cu_seqlens: int32 (S+1,) segment offsets.

    Returns (N, H, D). Token i attends to token j iff both lie in the same segment and j <= i."""
    if backend in ("fa3", "fa2"):
        fn, extra = _flash(backend)
        # Keywords only: the positional order differs between flash-attn 3 releases (see _load), and a positional
        # max_seqlen lands in seqused_q there. This is how the varlen records call it too (openai/parameter-golf,
        # records/track_10min_16mb/2026-04-10_VarLenAttn/train_gpt.py).
        out = fn(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen,
                 max_seqlen_k=max_seqlen, causal=True, **extra)
        # flash-attn 3 releases up to ed209409 (2025-07-11) return (out, softmax_lse); later ones and flash-attn 2 the
        # output alone.
        return out[0] if isinstance(out, tuple) else out
    return sdpa_varlen(q, k, v, cu_seqlens, max_seqlen)


def sdpa_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
    """SDPA with a block-diagonal causal mask, over query blocks of max_seqlen tokens in one batched call.

    A dense N x N mask would be quadratic in the packed length. Every segment is at most max_seqlen long, so the keys a
    query needs start no earlier than the previous block: query block b attends to key blocks b-1 and b (2 * max_seqlen
    keys) under the mask. Shapes depend only on N and max_seqlen, never on token values, so this path compiles
    without graph breaks (no .item(), no data-dependent slicing)."""
    n, h, d = q.shape
    hkv = k.shape[1]
    block = max(1, int(max_seqlen))
    # At least one padded query, even when block divides n: a zero-length pad would make "pad == 0" a shape guard,
    # and torch.compile would recompile the first time a batch length is (or is not) a multiple of max_seqlen.
    nb = n // block + 1
    pad = nb * block - n
    cu = cu_seqlens.to(device=q.device, dtype=torch.long)
    marks = torch.zeros(n + 1, dtype=torch.long, device=q.device)  # + 1: padded cu_seqlens end in n's
    marks[cu[1:-1]] = 1
    seg = torch.cumsum(marks[:n], 0)  # segment id (>= 0) of every token
    # Padding: one block of id -2 in front (the keys "before" block 0) and ids -1 at the end; a padded query attends to
    # itself at least, so no row of the mask is empty, and no real query ever matches a padded key.
    seg_p = torch.cat([seg.new_full((block,), -2), seg, seg.new_full((pad,), -1)]).view(nb + 1, block)
    pos_p = torch.arange((nb + 1) * block, device=q.device).view(nb + 1, block)
    seg_k, pos_k = torch.cat([seg_p[:-1], seg_p[1:]], 1), torch.cat([pos_p[:-1], pos_p[1:]], 1)  # (nb, 2 * block)
    seg_q, pos_q = seg_p[1:], pos_p[1:]  # (nb, block)
    mask = (seg_q[:, :, None] == seg_k[:, None, :]) & (pos_k[:, None, :] <= pos_q[:, :, None])

    def windows(x: torch.Tensor) -> torch.Tensor:  # (n, H', D) -> (nb, H', 2 * block, D)
        xp = torch.cat([x.new_zeros(block, *x.shape[1:]), x, x.new_zeros(pad, *x.shape[1:])]).view(nb + 1, block, *x.shape[1:])
        return torch.cat([xp[:-1], xp[1:]], 1).transpose(1, 2)

    qb = torch.cat([q, q.new_zeros(pad, h, d)]).view(nb, block, h, d).transpose(1, 2)  # (nb, H, block, D)
    kb, vb = windows(k), windows(v)
    if hkv != h:
        kb = kb.repeat_interleave(h // hkv, dim=1)
        vb = vb.repeat_interleave(h // hkv, dim=1)
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask[:, None])  # (nb, H, block, D)
    return out.transpose(1, 2).reshape(nb * block, h, d)[:n]
