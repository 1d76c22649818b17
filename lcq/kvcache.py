"""The key/value cache of TTT_CONTEXT=reuse (issue 26; proposed in openai/parameter-golf #318, not built by a record).

Recompute (#1855) re-runs a chunk's whole window, its document's last `window` tokens, every chunk. Reuse runs only the
chunk's new tokens: each attention call keeps the keys and values of the tokens its slot has scored, from the forward
that scored them, and the new queries attend to them. The key set is recompute's: a query at stream offset t of a chunk
read from `begin` sees the keys of [begin, t], so a window that outgrows the context is cut exactly where recompute cuts
it. Positions are recompute's too: keys are kept before RoPE and rotated at every read by their offset from `begin`.

One ring of `window` entries per slot and per attention call (a looped layer runs once per pass: one ring per pass); a
token at stream offset p lives in column p % window (plus a trash column for pads), which always holds the last
`window` tokens the slot wrote. Only the forward that scores a chunk writes; its later training steps re-read the same
cache, detached: no gradient reaches a kept key. The model reads `pos`, `prev_ids`, `mask` and `layers` (lcq/model.py);
this module holds no TTT policy (lcq/ttt.py plans the chunks).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


class LayerKV:
    """One attention call's ring: keys before RoPE and values, (S, window + 1, Hkv, D)."""

    def __init__(self, cache: "KVCache", k: torch.Tensor, v: torch.Tensor):
        self.cache, self.k, self.v = cache, k, v

    def attend(self, q: torch.Tensor, k_raw: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rotate) -> torch.Tensor:
        """q (N, H, D) and k (N, Hkv, D) rotated for the new tokens, k_raw their keys before RoPE, v (N, Hkv, D); N = S x L.
        `rotate(keys, cos, sin)` is the attention's own RoPE. Returns (N, H, D): softmax over kept keys + new keys."""
        c, (n, h, d), hkv = self.cache, q.shape, k.shape[1]
        s = c.slots
        kept = rotate(self.k.view(-1, hkv, d), c.key_cos, c.key_sin).view(s, -1, hkv, d).to(k.dtype)
        keys = torch.cat([kept, k.view(s, -1, hkv, d)], 1).transpose(1, 2)  # (S, Hkv, W + 1 + L, D)
        vals = torch.cat([self.v.to(v.dtype), v.view(s, -1, hkv, d)], 1).transpose(1, 2)
        y = F.scaled_dot_product_attention(q.view(s, -1, h, d).transpose(1, 2), keys, vals, attn_mask=c.mask[:, None],
                                           enable_gqa=hkv != h)  # GQA without copying the keys per query head
        if c.write:  # the scoring forward keeps its keys and values (pads go to the trash column)
            self.k.view(-1, hkv, d).index_copy_(0, c.cols, k_raw.detach().to(self.k.dtype))
            self.v.view(-1, hkv, d).index_copy_(0, c.cols, v.detach().to(self.v.dtype))
        return y.transpose(1, 2).reshape(n, h, d)


class KVCache:
    """Rings for `slots` documents over `window` tokens, one per attention call of the model's forward."""

    def __init__(self, rotary, calls: int, slots: int, window: int, kv_heads: int, head_dim: int, device, dtype):
        """rotary: the model's RoPE module; calls: attention calls per forward (len(GPT.layer_order()))."""
        self.slots, self.window, self.rotary, self.write = slots, window, rotary, False
        shape = (slots, window + 1, kv_heads, head_dim)
        self.layers = [LayerKV(self, *(torch.zeros(shape, dtype=dtype, device=device) for _ in "kv"))
                       for _ in range(calls)]
        self.kpos = torch.full((slots, window + 1), -1, dtype=torch.long, device=device)  # stream offset of each entry

    def reset(self) -> None:
        """Every slot empty (a batch of new documents)."""
        self.kpos.fill_(-1)

    def plan(self, rows: np.ndarray, tokens: torch.Tensor, length: int) -> None:
        """The next chunk: rows (S, 3) of (window begin, end, first new token) in stream offsets; slot s's row reads
        tokens [new, new + length), real up to `end`, pads after. Sets what the model reads; the next forward is the
        scoring one and writes the cache (the caller clears `write` for the chunk's training steps)."""
        dev, s, w = self.kpos.device, self.slots, self.window
        begin, end, new = (torch.from_numpy(np.ascontiguousarray(rows[:, i])).to(dev) for i in range(3))
        off = torch.arange(length, device=dev)
        self.pos = ((new - begin)[:, None] + off).ravel()  # recompute's RoPE position: offset in the window
        self.prev_ids = tokens[(new - 1).clamp_min(0)]  # feeds the SmearGate of each row's first token (masked at pos 0)
        kept = (self.kpos >= begin[:, None]) & (self.kpos < new[:, None])  # (S, W + 1): [begin, first new)
        causal = torch.ones(length, length, dtype=torch.bool, device=dev).tril()
        self.mask = torch.cat([kept[:, None, :].expand(s, length, w + 1), causal.expand(s, length, length)], 2)
        self.key_cos, self.key_sin = self.rotary((self.kpos - begin[:, None]).clamp_min(0).ravel())
        p = new[:, None] + off
        real = off < (end - new)[:, None]
        col = torch.where(real, p % w, w)
        self.cols = (col + torch.arange(s, device=dev)[:, None] * (w + 1)).ravel()
        self.kpos.scatter_(1, col, torch.where(real, p, -1))
        self.kpos[:, w] = -1
        self.write = True
