"""The GPT, in the shape of the strong public Parameter Golf records.

Tied embeddings, parameter-free RMSNorm, GQA, partial RoPE, QK-norm with a learned per-head gain, MLP with relu^2 or
LeakyReLU(0.5)^2, U-Net style encoder/decoder skips with learned weights, SmearGate with a BOS mask, logit softcap.
The record stack's features (openai/parameter-golf #1855), each behind its own knob in lcq/config.py: exclusive
self-attention, the 1/sqrt(layer+1) norm scale, gated skips, depth recurrence (lcq/recurrence.py), parallel residual
lanes (lcq/lanes.py) and the sparse attention output gate; and #1855's own SmearGate, resid_mix and orthogonal init
(issue 19), each one knob away from ours.
The model works on a flat packed batch: tokens (N,) plus cu_seqlens; positions restart at every segment start and no token
sees another segment. Module names are a stable API: GPTQ and LoRA target `blocks.{i}.attn.{c_q,c_k,c_v,proj}`,
`blocks.{i}.mlp.{fc,proj}` and `lm_head` (which shares its weight with `tok_emb`).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels
from .attention import resolve_backend, varlen_attention
from .config import Config
from .lanes import ParallelLanes
from .recurrence import layer_sequence


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


class CastedLinear(nn.Linear):
    """Weights stay float32 (for the optimizer and EMA); the matmul runs in the activations' dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def segment_positions(cu_seqlens: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(position inside its segment, is-segment-start) for each of the n packed tokens."""
    cu = cu_seqlens.to(torch.long)
    # n + 1 marks: cu_seqlens padded with trailing n's (empty segments, lcq/data.py pad_cu) mark the slot past the end
    marks = torch.zeros(n + 1, dtype=torch.long, device=cu.device)
    marks[cu[1:-1]] = 1
    seg = torch.cumsum(marks[:n], 0)
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


def exclusive(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """XSA (exclusive self-attention, openai/parameter-golf PR #478): remove from each head's output its component
    along the token's own value vector, so attention carries context rather than a copy of the token itself.
    y: (N, H, D); v: (N, Hkv, D), each KV head shared by H / Hkv query heads."""
    n, h, d = y.shape
    hkv = v.size(1)
    g = y.reshape(n, hkv, h // hkv, d)
    vn = F.normalize(v, dim=-1).unsqueeze(2)
    return (g - (g * vn).sum(-1, keepdim=True) * vn).reshape(n, h, d)


class SparseAttnGate(nn.Module):
    """Per-head sigmoid gate on the attention output from only the first `window` input dims (PR #1787, after
    modded-nanogpt): window x heads weights per layer instead of a dense d x heads gate. Zero init: every gate starts
    at sigmoid(0) = 0.5. The weight is not named `.weight`, so GPTQ keeps it as a raw (float16) control tensor."""

    def __init__(self, heads: int, window: int, scale: float):
        super().__init__()
        self.window, self.scale = window, scale
        self.w = nn.Parameter(torch.zeros(heads, window))

    def forward(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y: (N, H, D) attention output; x: (N, d) the attention's input."""
        g = torch.sigmoid(self.scale * F.linear(x[:, :self.window], self.w.to(x.dtype)))
        return y * g.to(y.dtype)[:, :, None]


class Attention(nn.Module):
    def __init__(self, cfg: Config, layer: int = 0):
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
        self.xsa = layer >= cfg.num_layers - cfg.xsa_last_n
        self.gate = SparseAttnGate(h, cfg.attn_gate_window, cfg.attn_gate_scale) if cfg.attn_gate_window else None
        self.in_features = self.out_features = d  # a LoRA may wrap the whole branch (#1855's o adapter, lcq/lora.py)

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen: int, backend: str, kv=None):
        n = x.size(0)
        q = self.c_q(x).view(n, self.num_heads, self.head_dim)
        k = self.c_k(x).view(n, self.num_kv_heads, self.head_dim)
        v = self.c_v(x).view(n, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = rms_norm(q), rms_norm(k)
        k_raw = k
        q = apply_rotary(q, cos, sin, self.rope_dims)
        k = apply_rotary(k, cos, sin, self.rope_dims)
        if self.qk_norm:
            q = q * self.q_gain.to(q.dtype)[None, :, None]
        # Autocast may run the norms in float32; flash-attn only takes bf16/fp16, so match the projections' dtype.
        if kv is None:
            y = varlen_attention(q.to(v.dtype), k.to(v.dtype), v, cu_seqlens, max_seqlen, backend)
        else:  # TTT_CONTEXT=reuse: the new tokens attend to their slot's kept keys too (lcq/kvcache.py)
            y = kv.attend(q.to(v.dtype), k_raw, k.to(v.dtype), v, lambda t, c, s: apply_rotary(t, c, s, self.rope_dims))
        if self.xsa:
            y = exclusive(y, v)
        if self.gate is not None:
            y = self.gate(y, x)
        return self.proj(y.reshape(n, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        hidden = int(cfg.mlp_mult * cfg.model_dim)
        self.fc = CastedLinear(cfg.model_dim, hidden, bias=False)
        self.proj = CastedLinear(hidden, cfg.model_dim, bias=False)
        # relu^2 is the baseline; LeakyReLU(0.5)^2 keeps a gradient for negative inputs (public records, e.g. PR #549).
        self.slope = cfg.leaky_relu_slope if cfg.mlp_act == "leaky_relu2" else 0.0
        self.in_features = self.out_features = cfg.model_dim  # #1855's MLP adapter wraps the branch (lcq/lora.py)
        self.fused = cfg.fused_mlp

    def forward(self, x):
        if self.fused and all(type(m) is CastedLinear and not (m._forward_hooks or m._forward_pre_hooks) for m in (self.fc, self.proj)):
            # the fused kernel (lcq/kernels.py); the hooks of GPTQ and LCQ and LoRA's wrappers need the module calls below
            return kernels.mlp(x, self.fc.weight, self.proj.weight, self.slope)
        h = self.fc(x)
        h = F.leaky_relu(h, self.slope) if self.slope else F.relu(h)
        return self.proj(h.square())


class Block(nn.Module):
    def __init__(self, cfg: Config, layer: int = 0):
        super().__init__()
        self.attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.attn_scale = nn.Parameter(torch.ones(cfg.model_dim))
        self.mlp_scale = nn.Parameter(torch.ones(cfg.model_dim))
        # LN scale (PR #315): deeper layers read a smaller normed input, which keeps their updates small early on.
        self.ln_scale = (layer + 1) ** -0.5 if cfg.ln_scale else 1.0
        # resid_mix (#1855, issue 19): the block reads m[0] * stream + m[1] * x0 (x0 = the normed embedding), per channel;
        # [1, 0] at init is the plain stream. Not named `.weight`, so it stays a raw control tensor for GPTQ.
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(cfg.model_dim), torch.zeros(cfg.model_dim)))) \
            if cfg.resid_mix else None

    def mix_in(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        if self.resid_mix is None:
            return x
        m = self.resid_mix.to(x.dtype)
        return m[0] * x + m[1] * x0

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x) * self.ln_scale if self.ln_scale != 1.0 else rms_norm(x)

    def branches(self, attn_in, mlp_in, cos, sin, cu_seqlens, max_seqlen, backend, kv=None):
        """Attention on one stream and MLP on another, side by side (the parallel lanes); scaled branch outputs."""
        a = self.attn_scale.to(attn_in.dtype) * self.attn(self.norm(attn_in), cos, sin, cu_seqlens, max_seqlen, backend,
                                                          kv)
        return a, self.mlp_scale.to(mlp_in.dtype) * self.mlp(self.norm(mlp_in))

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen, backend, x0=None, kv=None):
        x = self.mix_in(x, x0)
        x = x + self.attn_scale.to(x.dtype) * self.attn(self.norm(x), cos, sin, cu_seqlens, max_seqlen, backend, kv)
        return x + self.mlp_scale.to(x.dtype) * self.mlp(self.norm(x))


class SmearGate(nn.Module):
    """Mixes each token's embedding with the previous token's (SMEAR_GATE).

    blend: x + sigmoid(g) * (prev - x) on the normed embedding, g per channel, zero init (an even blend).
    input (#1855, after #1667 / modded-nanogpt): x + lam * sigmoid(w . x[:12]) * prev on the raw embedding, before the
    norm: one scalar gate per token read from its own first 12 channels, lam = w = 0 at init (the identity).
    The previous token is masked out at every segment start and at every BOS, so nothing of document N reaches the first
    token of document N+1 (a leak that got public records flagged). No parameter is named `.weight`: GPTQ keeps them
    as raw control tensors."""

    def __init__(self, dim: int, mode: str = "blend"):
        super().__init__()
        self.before_norm = mode == "input"
        if self.before_norm:
            self.window = min(12, dim)  # #1855: GATE_WINDOW=12
            self.w = nn.Parameter(torch.zeros(1, self.window))
            self.lam = nn.Parameter(torch.zeros(1))
        else:
            self.gate = nn.Parameter(torch.zeros(dim))

    def forward(self, x, input_ids, seg_start, bos_id: int, first=None):
        """first (S, d): the previous token of each of S equal rows' first token (a KV-cache forward), else none."""
        if first is None:
            prev = torch.cat([torch.zeros_like(x[:1]), x[:-1]], dim=0)
        else:
            rows = x.view(first.size(0), -1, x.size(-1))
            prev = torch.cat([first[:, None].to(x.dtype), rows[:, :-1]], 1).view_as(x)
        keep = (~(seg_start | (input_ids == bos_id)))[:, None].to(x.dtype)
        if self.before_norm:
            g = self.lam.to(x.dtype) * torch.sigmoid(F.linear(x[:, :self.window], self.w.to(x.dtype)))
            return x + g * keep * prev
        return x + torch.sigmoid(self.gate).to(x.dtype) * keep * (prev - x)


class GPT(nn.Module):
    def __init__(self, cfg: Config, bos_id: int):
        super().__init__()
        self.bos_id = bos_id
        self.logit_softcap = cfg.logit_softcap
        # Asymmetric logit softcap (LOGIT_SOFTCAP_ASYM, #1923 -> #2130): a learned cap for positive and one for negative
        # logits, both starting at LOGIT_SOFTCAP (the logits are then the scalar cap's, bit for bit). As in #2135,
        # training leaves them there (its fused CE reads the scalar cap; requires_grad off keeps them out of the
        # optimizer) and TTT's global phase adapts them with the other base weights. Not `.weight`: they ship raw.
        self.softcap_pos = self.softcap_neg = None
        if cfg.logit_softcap_asym:
            self.softcap_pos = nn.Parameter(torch.tensor(cfg.logit_softcap), requires_grad=False)
            self.softcap_neg = nn.Parameter(torch.tensor(cfg.logit_softcap), requires_grad=False)
        # Execution settings, set by configure_runtime once the device is known: the attention backend, whether the
        # eval forward is compiled, and CPU bf16 autocast.
        self.attn_backend = "sdpa"
        self.compile_eval = False
        self.autocast_cpu_bf16 = False
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        self.smear = SmearGate(cfg.model_dim, cfg.smear_gate) if cfg.smear_gate != "off" else None
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.unet_skips = cfg.unet_skips
        # Depth recurrence: the looped layer order once `recur_active` (lcq/recurrence.py); train() turns it off until
        # its progress point and back on at the end, so evaluation and every rebuilt model run the loop.
        self.plain_sequence = list(range(cfg.num_layers))
        self.looped_sequence = (layer_sequence(cfg.num_layers, cfg.recur_start_layer, cfg.recur_end_layer,
                                               cfg.recur_passes) if cfg.recur_passes > 1 else self.plain_sequence)
        self.recur_active = True
        n_skips = max(self._num_skips(len(self.plain_sequence)), self._num_skips(len(self.looped_sequence)))
        self.skip_weights = nn.Parameter(torch.ones(n_skips, cfg.model_dim)) if n_skips else None
        # Skip gates (PR #289): x <- lerp(w * skip, x, sigmoid(g)); zero init mixes the two halves equally.
        self.skip_gates = nn.Parameter(torch.zeros(n_skips, cfg.model_dim)) if n_skips and cfg.skip_gates else None
        self.lanes = ParallelLanes(cfg.parallel_start_layer, cfg.num_layers) if cfg.parallel_start_layer else None
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
            if cfg.init == "orthogonal":  # #1855: orthogonal q/k/v and MLP-up weights, gain 1
                for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.fc):
                    nn.init.orthogonal_(lin.weight)

    def _num_skips(self, depth: int) -> int:
        return min(depth // 2, depth - depth // 2) if self.unet_skips else 0

    def layer_order(self) -> list[int]:
        """Stored-layer index of each layer this forward pass runs (the looped order once recurrence is active)."""
        return self.looped_sequence if self.recur_active else self.plain_sequence

    def _add_skip(self, x: torch.Tensor, skip: torch.Tensor, j: int) -> torch.Tensor:
        scaled = self.skip_weights[j].to(x.dtype) * skip
        if self.skip_gates is None:
            return x + scaled
        return torch.lerp(scaled, x, torch.sigmoid(self.skip_gates[j]).to(x.dtype))

    def hidden(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, kv=None) -> torch.Tensor:
        """The head's input (N, d) for packed tokens (N,) with cu_seqlens (S+1,) int32 segment offsets; with a KV cache
        (lcq/kvcache.py) the rows are the S cache slots' new tokens and the cache gives positions and the previous token."""
        pos, seg_start = segment_positions(cu_seqlens, input_ids.numel()) if kv is None else (kv.pos, kv.pos == 0)
        cos, sin = self.rotary(pos)
        # bf16 residual stream under bf16 autocast (#1855): the embedding output, and so every residual add, skip and lane,
        # is in the matmuls' dtype; the fp32 master weights and control tensors stay as they are.
        x, smear = self.tok_emb(input_ids).to(kernels.compute_dtype(self.tok_emb.weight)), self.smear
        first = None if kv is None or smear is None else self.tok_emb(kv.prev_ids).to(x.dtype)
        if smear is not None and smear.before_norm:
            x = smear(x, input_ids, seg_start, self.bos_id, first)
        x = rms_norm(x)
        if smear is not None and not smear.before_norm:
            x = smear(x, input_ids, seg_start, self.bos_id, None if first is None else rms_norm(first))
        x0 = x  # what resid_mix mixes back in
        order = self.layer_order()
        n_enc = self._num_skips(len(order))  # the first half of the order is the encoder (#1855)
        skips, lane1 = [], None  # x is lane 0 once the parallel lanes start
        for v, i in enumerate(order):
            block = self.blocks[i]
            if self.lanes is not None and i >= self.lanes.start and lane1 is None:
                lane1 = x  # #1855: both lanes start from the stream before the skip lands on lane 0
            if n_enc <= v < 2 * n_enc:
                # #1855: decoder position k takes the encoder outputs last-in first-out, from the first decoder position
                # on, with skip weight k; with an odd depth the last decoder position gets none
                k = v - n_enc
                x = self._add_skip(x, skips[n_enc - 1 - k], k)
            if lane1 is not None:
                # #1855 mixes x0 into the attention's read of lane 0 only; the lanes carry on unmixed.
                a, m = block.branches(block.mix_in(x, x0), lane1, cos, sin, cu_seqlens, max_seqlen, self.attn_backend,
                                      kv and kv.layers[v])
                x, lane1 = self.lanes.mix(i, x, lane1, a, m)
            else:
                x = block(x, cos, sin, cu_seqlens, max_seqlen, self.attn_backend, x0, kv and kv.layers[v])
            if v < n_enc:
                skips.append(x)
        if lane1 is not None:
            x = self.lanes.merge(x, lane1)
        return rms_norm(x)

    def forward(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, kv=None) -> torch.Tensor:
        """input_ids: (N,) packed tokens; cu_seqlens: (S+1,) int32 segment offsets; kv: a KV cache (lcq/kvcache.py) or
        None. Returns logits (N, vocab), float32."""
        logits = self.lm_head(self.hidden(input_ids, cu_seqlens, max_seqlen, kv)).float()
        return kernels.softcap(logits, *self.caps()) if self.logit_softcap else logits

    def caps(self) -> tuple:
        """The softcap arguments of lcq.kernels.softcap: (LOGIT_SOFTCAP,) or the learned (positive, negative) caps."""
        return (self.logit_softcap,) if self.softcap_pos is None else (self.softcap_pos, self.softcap_neg)

    def loss(self, input_ids, targets, cu_seqlens, max_seqlen: int) -> torch.Tensor:
        logits = self.lm_head(self.hidden(input_ids, cu_seqlens, max_seqlen))
        if self.logit_softcap:
            return kernels.softcap_ce(logits, targets, *self.caps())  # the fused CE of lcq/kernels.py, the eval's caps
        return F.cross_entropy(logits.float(), targets)


def build_model(cfg: Config, bos_id: int, device: torch.device) -> GPT:
    return GPT(cfg, bos_id).to(device)


def autocast_for(device: torch.device, cpu_bf16: bool = False):
    """bf16 autocast on CUDA (what the record runs). On CPU only with AUTOCAST_CPU_BF16, which runs on CPU the mixed
    precision the GPU runs, so tests can check that statistics stay float32 under autocast."""
    if device.type == "cuda" or cpu_bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def configure_runtime(model: GPT, cfg: Config, device: torch.device) -> GPT:
    """Set the execution settings a GPT carries for `device` (attention backend, compiled eval, CPU autocast)."""
    model.attn_backend = resolve_backend(cfg.attention_backend, device)
    # COMPILE is a CUDA knob (its config comment says so); on CPU the eager forward is what runs.
    model.compile_eval = cfg.compile and device.type == "cuda" and "inductor"  # a backend name, or False
    model.autocast_cpu_bf16 = cfg.autocast_cpu_bf16
    return model


def eval_forward(model: nn.Module, device: torch.device):
    """The function lcq.evaluate gets logits from: `model(input_ids, cu_seqlens, max_seqlen)` under autocast_for, through
    torch.compile(model, dynamic=True) when the model's compile_eval is set (CUDA with COMPILE=1).

    dynamic=True because eval batches differ in length, segment count and max_seqlen (a rank's last batch is short): one
    graph serves them all instead of a recompile per shape. Dynamo keeps the compiled code on GPT.forward's code object,
    so wrapping the same model again (every batch, every monitor eval) finds it instead of compiling anew."""
    backend = getattr(model, "compile_eval", False)
    fwd = torch.compile(model, dynamic=True, backend=backend) if backend else model
    autocast = autocast_for(device, getattr(model, "autocast_cpu_bf16", False))

    def forward(input_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        with autocast:
            return fwd(input_ids, cu_seqlens, max_seqlen)

    return forward


def gptq_targets(model: GPT) -> dict[str, str]:
    """Weight name -> name of the module whose input feeds it (the tied embedding is calibrated at the head).

    A looped layer (depth recurrence) is one stored module, so its hook sees every pass and its Hessian covers them all.
    q, k and v read the same input, so c_q's hook serves all three (issue 18: one Hessian sum instead of three)."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.startswith("blocks."):
            out[f"{name}.weight"] = name[:-1] + "q" if name.endswith((".attn.c_k", ".attn.c_v")) else name
    out["tok_emb.weight"] = "lm_head"
    return out


def stored_weight(module_name: str) -> str:
    """The state-dict and Hessian key of a linear module's weight: lm_head's is the tied embedding's."""
    return "tok_emb.weight" if module_name == "lm_head" else f"{module_name}.weight"
