"""The GPT, in the shape of the strong public Parameter Golf records.

Tied embeddings, parameter-free RMSNorm, GQA, partial RoPE, QK-norm with a learned per-head gain, MLP with relu^2 or
LeakyReLU(0.5)^2, U-Net style encoder/decoder skips with learned weights, SmearGate with a BOS mask, logit softcap.
The model works on a flat packed batch: tokens (N,) plus cu_seqlens; positions restart at every segment start and no token
sees another segment. Module names are a stable API: GPTQ and LoRA target `blocks.{i}.attn.{c_q,c_k,c_v,proj}`,
`blocks.{i}.mlp.{fc,proj}` and `lm_head` (which shares its weight with `tok_emb`).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import varlen_attention
from .config import Config


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


class CastedLinear(nn.Linear):
    """Weights stay float32 (for the optimizer and EMA); the matmul runs in the activations' dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def segment_positions(cu_seqlens: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(position inside its segment, is-segment-start) for each of the n packed tokens."""
    cu = cu_seqlens.to(torch.long)
    marks = torch.zeros(n, dtype=torch.long, device=cu.device)
    marks[cu[1:-1]] = 1
    seg = torch.cumsum(marks, 0)
    pos = torch.arange(n, device=cu.device) - cu[:-1][seg]
    return pos, pos == 0


class Rotary(nn.Module):
    """RoPE on the first `dims` channels of each head (partial RoPE); the rest carry no position."""

    def __init__(self, dims: int, base: float):
        super().__init__()
        self.dims = dims
        self.register_buffer("inv_freq", 1.0 / base ** (torch.arange(0, dims, 2, dtype=torch.float32) / dims),
                             persistent=False)

    def forward(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = pos.to(torch.float32)[:, None] * self.inv_freq[None, :]
        return freqs.cos(), freqs.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dims: int) -> torch.Tensor:
    """x: (N, H, D). Rotates x[..., :dims] by the per-token angles."""
    half = dims // 2
    x1, x2, rest = x[..., :half], x[..., half:dims], x[..., dims:]
    c, s = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    return torch.cat([x1 * c + x2 * s, x2 * c - x1 * s, rest], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        d, h, hkv = cfg.model_dim, cfg.num_heads, cfg.num_kv_heads
        self.num_heads, self.num_kv_heads, self.head_dim = h, hkv, d // h
        self.rope_dims = cfg.rope_dims or self.head_dim
        self.c_q = CastedLinear(d, h * self.head_dim, bias=False)
        self.c_k = CastedLinear(d, hkv * self.head_dim, bias=False)
        self.c_v = CastedLinear(d, hkv * self.head_dim, bias=False)
        self.proj = CastedLinear(h * self.head_dim, d, bias=False)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            # QK-norm bounds the logits, so a learned per-head gain sets the attention temperature back.
            self.q_gain = nn.Parameter(torch.full((h,), cfg.qk_gain_init))

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen: int, backend: str):
        n = x.size(0)
        q = self.c_q(x).view(n, self.num_heads, self.head_dim)
        k = self.c_k(x).view(n, self.num_kv_heads, self.head_dim)
        v = self.c_v(x).view(n, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = rms_norm(q), rms_norm(k)
        q = apply_rotary(q, cos, sin, self.rope_dims)
        k = apply_rotary(k, cos, sin, self.rope_dims)
        if self.qk_norm:
            q = q * self.q_gain.to(q.dtype)[None, :, None]
        # Autocast may run the norms in float32; flash-attn only takes bf16/fp16, so match the projections' dtype.
        y = varlen_attention(q.to(v.dtype), k.to(v.dtype), v, cu_seqlens, max_seqlen, backend)
        return self.proj(y.reshape(n, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        hidden = int(cfg.mlp_mult * cfg.model_dim)
        self.fc = CastedLinear(cfg.model_dim, hidden, bias=False)
        self.proj = CastedLinear(hidden, cfg.model_dim, bias=False)
        # relu^2 is the baseline; LeakyReLU(0.5)^2 keeps a gradient for negative inputs (public records, e.g. PR #549).
        self.slope = cfg.leaky_relu_slope if cfg.mlp_act == "leaky_relu2" else 0.0

    def forward(self, x):
        h = self.fc(x)
        h = F.leaky_relu(h, self.slope) if self.slope else F.relu(h)
        return self.proj(h.square())


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.attn_scale = nn.Parameter(torch.ones(cfg.model_dim))
        self.mlp_scale = nn.Parameter(torch.ones(cfg.model_dim))

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen, backend):
        x = x + self.attn_scale.to(x.dtype) * self.attn(rms_norm(x), cos, sin, cu_seqlens, max_seqlen, backend)
        return x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x))


class SmearGate(nn.Module):
    """Mixes each token's embedding with the previous token's through a learned per-channel gate.

    The previous token is masked out at every segment start and at every BOS, so nothing of document N reaches the first
    token of document N+1 (a leak that got public records flagged)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(dim))

    def forward(self, x, input_ids, seg_start, bos_id: int):
        prev = torch.cat([torch.zeros_like(x[:1]), x[:-1]], dim=0)
        keep = ~(seg_start | (input_ids == bos_id))
        g = torch.sigmoid(self.gate).to(x.dtype)[None, :] * keep[:, None].to(x.dtype)
        return x + g * (prev - x)


class GPT(nn.Module):
    def __init__(self, cfg: Config, bos_id: int):
        super().__init__()
        self.bos_id = bos_id
        self.logit_softcap = cfg.logit_softcap
        self.attn_backend = "sdpa"  # set by the caller once the device is known (attention.resolve_backend)
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        self.smear = SmearGate(cfg.model_dim) if cfg.smear_gate else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.num_encoder = cfg.num_layers // 2 if cfg.unet_skips else 0
        n_skips = min(self.num_encoder, cfg.num_layers - self.num_encoder)
        self.skip_weights = nn.Parameter(torch.ones(n_skips, cfg.model_dim)) if n_skips else None
        head_dim = cfg.model_dim // cfg.num_heads
        self.rotary = Rotary(cfg.rope_dims or head_dim, cfg.rope_base)
        self.lm_head = CastedLinear(cfg.model_dim, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # tied embeddings
        self._init(cfg)

    def _init(self, cfg: Config) -> None:
        nn.init.normal_(self.tok_emb.weight, std=cfg.tied_embed_init_std)
        for block in self.blocks:
            # Residual-branch outputs start at zero, so every block starts as the identity (modded-nanogpt).
            nn.init.zeros_(block.attn.proj.weight)
            nn.init.zeros_(block.mlp.proj.weight)

    def forward(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        """input_ids: (N,) packed tokens; cu_seqlens: (S+1,) int32 segment offsets. Returns logits (N, vocab), float32."""
        pos, seg_start = segment_positions(cu_seqlens, input_ids.numel())
        cos, sin = self.rotary(pos)
        x = rms_norm(self.tok_emb(input_ids))
        if self.smear is not None:
            x = self.smear(x, input_ids, seg_start, self.bos_id)
        skips = []
        for i, block in enumerate(self.blocks):
            if self.skip_weights is not None and i >= len(self.blocks) - len(self.skip_weights):
                j = len(self.blocks) - 1 - i  # decoder layer i pairs with encoder layer j (mirror)
                x = x + self.skip_weights[j].to(x.dtype) * skips[j]
            x = block(x, cos, sin, cu_seqlens, max_seqlen, self.attn_backend)
            if i < self.num_encoder:
                skips.append(x)
        logits = self.lm_head(rms_norm(x)).float()
        if self.logit_softcap:
            logits = self.logit_softcap * torch.tanh(logits / self.logit_softcap)
        return logits

    def loss(self, input_ids, targets, cu_seqlens, max_seqlen: int) -> torch.Tensor:
        return F.cross_entropy(self(input_ids, cu_seqlens, max_seqlen), targets)


def build_model(cfg: Config, bos_id: int, device: torch.device) -> GPT:
    return GPT(cfg, bos_id).to(device)


def gptq_targets(model: GPT) -> dict[str, str]:
    """Weight name -> name of the module whose input feeds it (the tied embedding is calibrated at the head)."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.startswith("blocks."):
            out[f"{name}.weight"] = name
    out["tok_emb.weight"] = "lm_head"
    return out
