"""LoRA on a quantized model (LCQ): the wrapper, attach/merge, shipped factors, closed-form inits, rank allocation.

After GPTQ the model runs on dequantized weights W_hat; a rank-r LoRA on chosen linear layers then compensates the
quantization error (trained by lcq/distill.py against the float teacher). Everything here is mechanics and linear
algebra: pure functions of their arguments, float64 inside the closed forms, float32 factors out.

Convention: a LoRA delta is `scale * B @ A` with B (out, r), A (r, in), scale = alpha / r (peft / the LoRA paper). The
closed-form inits return `(B, A)` with that scale already divided out, singular values split as sqrt between B and A.
"""
from __future__ import annotations

import fnmatch
import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import gptq

# Attention q/k/v/out and MLP up/down of every block. lm_head is left out: it is the largest matrix (vocab x d), so a
# rank-r delta costs r * (vocab + d) parameters. Add "lm_head" to the list to opt in; its weight is the tied input
# embedding, and its delta then corrects both uses (attach_lora).
DEFAULT_TARGETS: tuple[str, ...] = (
    "blocks.*.attn.c_q",
    "blocks.*.attn.c_k",
    "blocks.*.attn.c_v",
    "blocks.*.attn.proj",
    "blocks.*.mlp.fc",
    "blocks.*.mlp.proj",
)


def low_rank(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """The LoRA term scale * (x @ A^T) @ B^T, factors cast to x's dtype. Factors may carry leading batch dims (one LoRA per
    document slot in lcq/ttt_lora.py: A (S, r, in), B (S, out, r), x (S, L, in)); matmul broadcasts them."""
    return scale * torch.matmul(torch.matmul(x, A.to(x.dtype).mT), B.to(x.dtype).mT)


class LoRALinear(nn.Module):
    """`base(x) + scale * (x @ A^T) @ B^T` around a frozen `nn.Linear`, or around a block's whole attention or MLP
    branch (base(x, *rest): lcq.model.Attention / MLP, whose x is the branch's normed input): #1855's o and MLP TTT
    adapters read the block's normed input and add to the branch output. A branch LoRA has no weight to merge into; only
    TTT attaches one (TTT_TARGETS), LCQ_TARGETS takes linear layers only.

    Factors are float32 Parameters and are cast to x's dtype in forward. B starts at zero (so the wrapper equals the
    base exactly) and A is Kaiming-uniform with a = sqrt(5), the init peft uses for its default LoRA; A draws from the
    global torch RNG, so seed it identically on every rank. The base weight is never written to here, which keeps a
    weight that is shared with another module (tied embedding) safe.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRALinear: rank must be >= 1, got {rank}")
        if not alpha > 0:
            raise ValueError(f"LoRALinear: alpha must be > 0, got {alpha}")
        for p in base.parameters():
            p.requires_grad_(False)
        self.base = base
        self.in_features, self.out_features, self.rank = base.in_features, base.out_features, rank
        self.scale = alpha / rank
        device = next(base.parameters()).device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

        # Quantization-aware factors (issue 16): with a format set, forward sees the factors on their integer grid
        # (straight-through gradients), exactly what `quantized` ships; None = plain float factors (TTT, a decoded LoRA).
        self.fmt: FactorFormat | None = None
        self.grid: tuple[torch.Tensor, torch.Tensor] | None = None  # frozen (A, B) scales; None = from the factors
        self.tied = None  # (embedding, hook handle) when base.weight is an embedding's weight (attach_lora)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) as forward uses them: the float Parameters, or with a format their fake-quantized values."""
        if self.fmt is None:
            return self.lora_A, self.lora_B
        (A, sA), (B, sB) = on_grid(self.lora_A, self.lora_B, self.fmt, self.grid)
        (alo, ahi), (blo, bhi) = code_ranges(self.fmt)
        return fake_quant(A, sA, alo, ahi), fake_quant(B, sB, blo, bhi)

    def quantized(self) -> dict[str, torch.Tensor]:
        """The shipped factors: int8 codes and fp16 scales whose `dequantize_factors` is bit for bit what forward uses."""
        return quantize_factors(self.lora_A, self.lora_B, self.fmt, self.grid)

    def forward(self, x: torch.Tensor, *rest) -> torch.Tensor:
        A, B = self.factors()
        return self.base(x, *rest) + low_rank(x, A, B, self.scale)

    def lookup(self, emb, args, out):
        """Forward hook on the tied embedding: W_hat[ids] + scale * B[ids] @ A, the rows of the head's corrected weight."""
        A, B = self.factors()
        return out + self.scale * F.embedding(args[0], B.to(out.dtype)) @ A.to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A, (out, in) float32 (the fake-quantized factors when a format is set)."""
        A, B = self.factors()
        return self.scale * (B @ A)

    def merged_weight(self) -> torch.Tensor:
        """base.weight + delta, (out, in) float32 (a new tensor; the base is not touched)."""
        return self.base.weight.float() + self.delta_weight()

    @torch.no_grad()
    def set_factors(self, B: torch.Tensor, A: torch.Tensor) -> None:
        """Copy factors in (e.g. from a closed-form init called with `scale=self.scale`)."""
        want_b, want_a = tuple(self.lora_B.shape), tuple(self.lora_A.shape)
        if tuple(B.shape) != want_b or tuple(A.shape) != want_a:
            raise ValueError(f"set_factors: want B {want_b}, A {want_a}; got {tuple(B.shape)}, {tuple(A.shape)}")
        self.lora_B.copy_(B)
        self.lora_A.copy_(A)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scale={self.scale:g}"


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def match_targets(model: nn.Module, targets: list[str] | tuple[str, ...]) -> list[str]:
    """Module names matching any fnmatch pattern (`*` also crosses dots), in pattern order, each once. A pattern that
    matches nothing is an error: a typo must not silently shrink the adapter set."""
    names = [n for n, _ in model.named_modules() if n]
    matched: list[str] = []
    for pattern in targets:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(f"target pattern {pattern!r} matches no module (e.g. blocks.0.attn.c_q, lm_head)")
        matched += [n for n in hits if n not in matched]
    return matched


def attach_lora(model: nn.Module, targets: list[str] | tuple[str, ...], rank: int | dict[str, int],
                alpha: float) -> dict[str, LoRALinear]:
    """Wrap every nn.Linear whose qualified name matches a pattern of `targets` (fnmatch, `*` also crosses dots).

    `rank` is one rank for all, or a rank per matched name (every matched name must be listed; 0 leaves it unwrapped).
    Every parameter of the model except the new factors is frozen. Returns the wrappers by module name.
    """
    if not targets:
        raise ValueError("attach_lora: no targets")
    matched = match_targets(model, targets)
    modules = dict(model.named_modules())
    for n in matched:
        if not hasattr(modules[n], "in_features") or isinstance(modules[n], LoRALinear):  # a linear layer or a branch
            raise TypeError(f"attach_lora: {n!r} is a {type(modules[n]).__name__}; targets are linear layers or "
                            "branches, each wrapped only once")
    if isinstance(rank, dict):
        missing = [n for n in matched if n not in rank]
        unknown = [n for n in rank if n not in matched]
        if missing or unknown:
            raise ValueError(f"attach_lora: rank dict: missing {missing}, not matched {unknown}")
        ranks = {n: rank[n] for n in matched}
    else:
        ranks = {n: rank for n in matched}
    bad = {n: r for n, r in ranks.items() if not isinstance(r, int) or r < 0}
    if bad:
        raise ValueError(f"attach_lora: ranks must be ints >= 0, got {bad}")

    for p in model.parameters():
        p.requires_grad_(False)
    wrappers = {}
    # A tied head's weight is also the token lookup (LQER corrected that shared weight, issue 16): the delta reaches
    # both uses, so the side path scores what merge_lora folds into the one weight.
    lookups = {id(e.weight): e for e in modules.values() if isinstance(e, nn.Embedding)}
    for n in sorted(matched, key=lambda n: -n.count(".")):  # inner layers first: a branch LoRA wraps them as they are
        if ranks[n] == 0:
            continue
        wrappers[n] = w = LoRALinear(modules[n], ranks[n], alpha)
        _set_submodule(model, n, w)
        e = lookups.get(id(getattr(w.base, "weight", None)))
        if e is not None:
            w.tied = e, e.register_forward_hook(w.lookup)
    return wrappers


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRA wrappers by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """All factor Parameters (A then B per wrapper), for the optimizer."""
    return [p for m in lora_modules(model).values() for p in (m.lora_A, m.lora_B)]


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the factors: {"NAME.lora_A": (r, in), "NAME.lora_B": (out, r)}."""
    state = {}
    for n, m in lora_modules(model).items():
        state[f"{n}.lora_A"] = m.lora_A.detach().clone()
        state[f"{n}.lora_B"] = m.lora_B.detach().clone()
    return state


def load_lora_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy factors from `lora_state` output into an already attached model (same names, ranks and shapes)."""
    mods = lora_modules(model)
    want = {f"{n}.lora_{f}" for n in mods for f in "AB"}
    if set(state) != want:
        raise ValueError(f"load_lora_state: keys differ from the attached wrappers; "
                         f"missing {sorted(want - set(state))}, unexpected {sorted(set(state) - want)}")
    for n, m in mods.items():
        m.set_factors(state[f"{n}.lora_B"], state[f"{n}.lora_A"])


def detach_lora(model: nn.Module) -> None:
    """Put the plain base modules back (factors dropped). requires_grad flags stay as attach_lora left them."""
    for n, m in lora_modules(model).items():
        if m.tied:
            m.tied[1].remove()
        _set_submodule(model, n, m.base)


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Fold each delta into its base weight and unwrap.

    The merged weight is always a fresh Parameter (in the base weight's dtype), never an in-place write; a tied head's
    embedding gets the same Parameter (the tie holds and the lookup sees the correction, as the hook made it).
    """
    for n, m in lora_modules(model).items():
        old = m.base.weight
        m.base.weight = nn.Parameter(m.merged_weight().to(old.dtype), requires_grad=old.requires_grad)
        if m.tied:
            m.tied[0].weight = m.base.weight
    detach_lora(model)


# ---- shipped factors ---------------------------------------------------------------------------------------------
# Formats (issue 16; one mechanism for LCQ's int8 factors and #1855's LQER storage):
# - symmetric (group 0): A (r, in) at a_bits with one fp16 scale per rank component (row), B (out, r) at b_bits = a_bits
#   with one per component (column); codes +-(2^(bits-1) - 1), scale max|x| / (2^(bits-1) - 1);
# - asymmetric (group > 0, #1797/#1855's LQER): A at a_bits in groups of `group` consecutive inputs of each row (the
#   whole row when group does not divide it), B at int2 with one scale for the tensor; codes [-2^(b-1), 2^(b-1) - 1],
#   scale max|x| / (2^(b-1) - 1/2). A is the factor that multiplies the layer input (LQER's B).
# The artifact bit-packs codes whose range fits 2 or 4 bits (lcq/artifact.py), so 4- and 2-bit factors ship at 4 and 2.


class FactorFormat(NamedTuple):
    a_bits: int
    b_bits: int
    group: int  # 0 = symmetric per component


def factor_format(bits: int, asym: bool, group: int) -> FactorFormat:
    """LCQ_FACTOR_BITS / LCQ_FACTOR_ASYM / LCQ_FACTOR_GROUP as a format."""
    return FactorFormat(bits, 2, group) if asym else FactorFormat(bits, bits, 0)


def config_format(cfg) -> FactorFormat:
    return factor_format(cfg.lcq_factor_bits, cfg.lcq_factor_asym, cfg.lcq_factor_group)


def _stored_bits(bits: int) -> float:
    return bits if bits in (2, 4) else 8  # the artifact bit-packs 2- and 4-bit codes, else one byte a code


def factor_bytes(n_in: int, n_out: int, r: int, fmt: FactorFormat) -> float:
    """Uncompressed bytes of one wrapper's shipped factors at rank r: codes at their stored width plus fp16 scales."""
    if r == 0:
        return 0.0
    codes = r * (n_in * _stored_bits(fmt.a_bits) + n_out * _stored_bits(fmt.b_bits)) / 8
    if fmt.group:
        return codes + 2 * r * (n_in // fmt.group if n_in % fmt.group == 0 else 1) + 2
    return codes + 4 * r


def set_format(model: nn.Module, fmt: FactorFormat) -> None:
    """Train every wrapper's factors on `fmt`'s grid from now on (fake-quant forward, straight-through backward)."""
    for m in lora_modules(model).values():
        m.fmt, m.grid = fmt, None


def code_ranges(fmt: FactorFormat) -> tuple[tuple[int, int], tuple[int, int]]:
    """((lo, hi) of A's codes, (lo, hi) of B's)."""
    if fmt.group:
        return tuple((-(2 ** (b - 1)), 2 ** (b - 1) - 1) for b in (fmt.a_bits, fmt.b_bits))
    return tuple((-(2 ** (b - 1) - 1), 2 ** (b - 1) - 1) for b in (fmt.a_bits, fmt.b_bits))


def _fp16_scale(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(2.0**-24, 65504.0).to(torch.float16)


def factor_grid(A: torch.Tensor, B: torch.Tensor, fmt: FactorFormat, clip_a: float = 1.0,
                clip_b: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 scales (A's (r, groups), B's (1, r) or (1, 1)) by the rules above, at `clip` of the max-abs. A component of
    B that is all zero (a LoRA started at B = 0) takes A's step, so it can leave zero under straight-through training."""
    A, B = A.detach().float(), B.detach().float()
    (_, ahi), (_, bhi) = code_ranges(fmt)
    if fmt.group:
        g = fmt.group if A.shape[1] % fmt.group == 0 else A.shape[1]
        top_a, top_b = ahi + 0.5, bhi + 0.5
        sA = A.reshape(A.shape[0], -1, g).abs().amax(2) * clip_a / top_a
        sB = B.abs().amax().reshape(1, 1) * clip_b / top_b
        fallback = sA.amax().reshape(1, 1)
    else:
        sA = A.abs().amax(1, keepdim=True) * clip_a / ahi
        sB = (B.abs().amax(0, keepdim=True) * clip_b / bhi)
        fallback = sA.T
    return _fp16_scale(sA), _fp16_scale(torch.where(sB > 0, sB, fallback.expand_as(sB)))


def on_grid(A: torch.Tensor, B: torch.Tensor, fmt: FactorFormat, grid: tuple[torch.Tensor, torch.Tensor] | None):
    """((A, sA), (B, sB)): the factors and their grid, frozen (`grid`) or, when None, from the factors with each
    component first balanced between A and B (A[k] / c_k, B[:, k] * c_k; B @ A unchanged; per-row rounding ignores
    a row's scale but the fp16 scale does not, and a B grown from zero can have a step below fp16's normal range)."""
    if grid is not None:
        return (A, grid[0]), (B, grid[1])
    with torch.no_grad():
        a, b = A.abs().amax(1), B.abs().amax(0)
        c = torch.where((a > 0) & (b > 0), (a / b).sqrt(), torch.ones_like(a))
    A, B = A / c[:, None], B * c
    sA, sB = factor_grid(A, B, fmt)
    return (A, sA), (B, sB)


@torch.no_grad()
def quantize_factors(A: torch.Tensor, B: torch.Tensor, fmt: FactorFormat,
                     grid: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A (r, in), B (out, r) -> {"A_q", "A_scale", "B_q", "B_scale"}: int8 codes and fp16 scales on `fmt`'s grid."""
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(f"quantize_factors: want A (r, in) and B (out, r), got {tuple(A.shape)} and {tuple(B.shape)}")
    (A, sA), (B, sB) = on_grid(A.detach().float(), B.detach().float(), fmt, grid)
    (alo, ahi), (blo, bhi) = code_ranges(fmt)
    return {"A_q": grid_codes(A, sA, alo, ahi).to(torch.int8), "A_scale": sA,
            "B_q": grid_codes(B, sB, blo, bhi).to(torch.int8), "B_scale": sB}


def _expand(s: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A scale tensor broadcast to its factor's shape (groups repeated along rows)."""
    s = s.float()
    if s.shape[0] == shape[0] and s.shape[1] != shape[1]:
        s = s.repeat_interleave(shape[1] // s.shape[1], 1)
    return s.expand(shape)


def grid_codes(x: torch.Tensor, s: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Round-to-nearest float codes of x on the grid s, clamped to [lo, hi]."""
    return torch.clamp(torch.round(x.detach().float() / _expand(s, x.shape)), lo, hi)


def fake_quant(x: torch.Tensor, s: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """x rounded onto its grid in the forward, identity in the backward (straight-through, Bengio et al. 2013). The
    value is `codes * scale` with the same float ops as `dequantize_factors`, plus an exact zero, so the two agree bit
    for bit."""
    return grid_codes(x, s, lo, hi) * _expand(s, x.shape) + (x - x.detach())


def dequantize_factors(packed: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) float32 from `LoRALinear.quantized` output."""
    missing = [k for k in ("A_q", "A_scale", "B_q", "B_scale") if k not in packed]
    if missing:
        raise ValueError(f"dequantize_factors: packed factors lack {missing}")
    A_q, B_q = packed["A_q"], packed["B_q"]
    return (A_q.float() * _expand(packed["A_scale"], A_q.shape), B_q.float() * _expand(packed["B_scale"], B_q.shape))


def weighted_error(E: torch.Tensor, H: torch.Tensor | None) -> float:
    """tr(E H E^T) in float64 (the output error a layer input with Hessian H sees); ||E||_F^2 when H is None."""
    E = E.detach().double()
    if H is None:
        return float((E * E).sum())
    return float(((E @ H.to(E.device, torch.float64)) * E).sum())


def weighted_fit(E: torch.Tensor, r: int, H: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-r fit U @ M of E under tr(. H_d .^T), H_d = H damped as GPTQ damps it (Eckart-Young on E L with
    L L^T = H_d) -> U (out, r) with orthonormal columns, M = Sigma_r V_r^T L^-1 (r, in) holding the magnitudes."""
    L = torch.linalg.cholesky(gptq._damped(H.to(E.device), damp).double())
    U, S, Vh = torch.linalg.svd(E.detach().double() @ L, full_matrices=False)
    M = torch.linalg.solve_triangular(L.T, (S[:r, None] * Vh[:r]).T, upper=True).T  # solves L^T X = (S V^T)^T
    return U[:, :r].float().contiguous(), M.float().contiguous()


# Clips of B's int2 scale, as fractions of max|B|: with only 4 codes, max-abs scaling rounds most of B to 0.
_INT2_CLIPS = (1.0, 0.85, 0.7, 0.55, 0.4)


# The closed form is issue 11's LQER fit, now LCQ's only one (issue 16: LQER = LCQ with no distillation steps, in the
# same `lora` section). Why not #1855's LQER rule (top-k tensors by ||E||_F, plain SVD of E, both factors rounded to
# nearest; records/track_10min_16mb/2026-04-27_SP8192_LQER_..._1.0611/train_gpt.py): on our demo model it made bpb
# worse (BENCHMARKS.md, issue 11). The layer inputs have one dominant direction (~90% of tr H) and GPTQ parks its error
# where H is small, so the largest ||E||_F are the tensors with the least output error per unit of norm and E's top
# singular vectors are almost orthogonal to H's top eigenvector; rounding the input-side factor to int4 leaks a little
# of it into that direction, which H weighs thousands of times more: the rounded correction added 2.6-3.2x the output
# error tr(E H E^T) it was meant to remove. Hence the Hessian-weighted fit, GPTQ rounding against H, and the refusal of
# any correction that does not lower tr(E H E^T). Which tensors get one is allocate_bytes's choice, by that same error.
@torch.no_grad()
def closed_form(E: torch.Tensor, H: torch.Tensor | None, r: int, scale: float, fmt: FactorFormat,
                damp: float = 0.01) -> dict | None:
    """The rank-r correction of E = W - W_hat on `fmt`'s grid that LCQ ships with no distillation steps and starts
    distillation from:

    - E L = U Sigma V^T with L L^T = H damped as GPTQ damps it (act_svd); A = Sigma_r V_r^T L^-1 / scale holds the
      magnitudes (its group scales absorb them), B = U_r keeps balanced columns for its few scales;
    - A is rounded by GPTQ against H (it multiplies the layer input as a weight does), then B is refit by weighted least
      squares to the rounded A and rounded by GPTQ against scale^2 A_hat H A_hat^T, its clip (int2) chosen by the error.

    Returns {"A", "B" (float32, on the grid), "grid" (sA, sB), "error" tr((E - scale B A) H (.)^T)} or None when the
    rounded correction does not lower tr(E H E^T): a tensor never gets a correction that makes it worse. H None = the
    identity (plain SVD, rounding to nearest)."""
    r = min(r, *E.shape)
    H32 = torch.eye(E.shape[1], device=E.device) if H is None else H.detach().to(E.device, torch.float32)
    Hd = gptq._damped(H32, damp).double()
    U, A0 = weighted_fit(E, r, H32, damp)
    A0 = A0 / scale
    (alo, ahi), (blo, bhi) = code_ranges(fmt)
    sA, _ = factor_grid(A0, U, fmt)
    A = gptq._gptq_codes(A0, H32, _expand(sA, A0.shape), alo, ahi, damp, 128, True) * _expand(sA, A0.shape)
    E64 = E.detach().double()
    G = A.double() @ Hd @ A.double().T
    Bf = (E64 @ Hd @ A.double().T @ torch.linalg.pinv(G, hermitian=True) / scale).float()
    before, best = weighted_error(E, H), None
    for clip in _INT2_CLIPS if fmt.b_bits <= 2 else (1.0,):
        _, sB = factor_grid(A, Bf, fmt, clip_b=clip)
        B = (gptq._gptq_codes(Bf, (G * scale**2).float(), _expand(sB, Bf.shape), blo, bhi, damp, 128, True)
             * _expand(sB, Bf.shape))
        err = weighted_error(E - scale * (B @ A).to(E.device), H)
        if best is None or err < best["error"]:
            best = {"A": A.contiguous(), "B": B.contiguous(), "grid": (sA, sB), "error": err}
    return best if best["error"] < before else None


# Raw bytes of one wrapper's manifest entries in the LoRA section (four tensors: names, shapes, layouts), charged once
# to a tensor that gets any rank: lcq.distill.lora_raw_bytes's per-target allowance.
LORA_ENTRY_BYTES = 200
# The LoRA section's frame and meta (merge, init, ranks by name, alpha, format) and a compressor's worst-case overhead
# on near-incompressible packed codes: what a byte budget keeps back before pricing any factor.
LORA_SECTION_BYTES = 512


def allocate_bytes(errors: dict[str, tuple[torch.Tensor, torch.Tensor | None]], budget: int, fmt: FactorFormat,
                   alpha: float, max_rank: int) -> tuple[dict[str, int], dict[str, dict], list[tuple]]:
    """Per-tensor ranks (0 = none) under `budget` raw bytes (factor_bytes, plus LORA_ENTRY_BYTES for a tensor given
    any rank), a rank unit at a time: each unit goes to the tensor whose next rank removes the most Hessian-weighted
    output error per added byte, that error being closed_form's exactly (rounding on `fmt`'s grid included). A tensor
    whose next unit would not lower its error gets no more. Ties go to the name that sorts first.

    Returns (ranks, the closed-form fits of the tensors given a rank, rows (name, rank, bytes, error removed))."""
    if budget < 0:
        raise ValueError(f"allocate_bytes: budget must be >= 0 bytes, got {budget}")
    rank = dict.fromkeys(errors, 0)
    error = {n: weighted_error(E, H) for n, (E, H) in errors.items()}
    start, fits, nxt, spent = dict(error), {}, {}, 0

    def cost(n: str) -> float:
        E = errors[n][0]
        r = rank[n]
        return (factor_bytes(E.shape[1], E.shape[0], r + 1, fmt) - factor_bytes(E.shape[1], E.shape[0], r, fmt)
                + (LORA_ENTRY_BYTES if r == 0 else 0))

    while True:
        best, best_ratio = None, 0.0
        for n in sorted(errors):
            E, H = errors[n]
            if rank[n] >= min(max_rank, *E.shape) or spent + cost(n) > budget:
                continue
            if n not in nxt:
                nxt[n] = closed_form(E, H, rank[n] + 1, alpha / (rank[n] + 1), fmt)
            fit = nxt[n]
            gain = error[n] - fit["error"] if fit is not None else 0.0
            if gain > 0 and gain / cost(n) > best_ratio:
                best, best_ratio = n, gain / cost(n)
        if best is None:
            break
        spent += cost(best)
        rank[best] += 1
        fits[best] = nxt.pop(best)
        error[best] = fits[best]["error"]
    rows = [(n, rank[n], factor_bytes(errors[n][0].shape[1], errors[n][0].shape[0], rank[n], fmt) + LORA_ENTRY_BYTES,
             start[n] - error[n]) for n in sorted(errors) if rank[n]]
    return rank, fits, rows


# ---- closed-form inits -------------------------------------------------------------------------------------------

def _check_init_args(fn: str, E: torch.Tensor, r: int, scale: float) -> None:
    if E.dim() != 2:
        raise ValueError(f"{fn}: E must be 2-D, got {tuple(E.shape)}")
    if not 1 <= r <= min(E.shape) or not scale > 0:
        raise ValueError(f"{fn}: need rank r in [1, {min(E.shape)}] and scale > 0, got {r}, {scale}")


def _top_r_factors(M: torch.Tensor, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) float64 with scale * B @ A the best rank-r approximation of M, singular values split as sqrt."""
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    root = torch.sqrt(S[:r] / scale)
    return U[:, :r] * root, root[:, None] * Vh[:r]


def _hessian_root(H: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, S_pinv) float64 with S S^T = H + eps * mean(diag H) * I.

    Cholesky when that succeeds; otherwise (singular H and eps = 0, or an H that float error left slightly indefinite)
    the eigen factor Q sqrt(w), whose pseudo-inverse drops the directions with no weight.
    """
    H = H.double()
    H = (H + H.T) / 2
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    H = H + eps * H.diagonal().mean() * eye
    L, info = torch.linalg.cholesky_ex(H)
    if info.item() == 0:
        return L, torch.linalg.solve_triangular(L, eye, upper=False)
    w, Q = torch.linalg.eigh(H)
    keep = w > w.max().clamp(min=0) * H.shape[0] * torch.finfo(H.dtype).eps
    root = torch.where(keep, w, torch.ones_like(w)).sqrt()
    return Q * (keep * root), (Q * (keep / root)).T


def init_svd(E: torch.Tensor, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Data-free init: top-r SVD of the quantization error E = W - W_hat (LQER, arXiv 2402.02446). Returns (B, A)."""
    _check_init_args("init_svd", E, r, scale)
    B, A = _top_r_factors(E.double(), r, scale)
    return B.float(), A.float()


def init_act_svd(E: torch.Tensor, H: torch.Tensor, r: int, scale: float,
                 eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r minimiser of ||X (E - scale B A)^T||_F with H = X^T X / n. Returns (B, A).

    With H = S S^T the loss is ||(E - M) S||_F, so M S is the top-r SVD of E S (Eckart-Young) and M = that @ S^-1
    (EoRA arXiv 2410.21271, QERA arXiv 2410.06040, ASER). eps damps H by eps * mean(diag H) for H that is singular;
    eps = 0 gives the exact minimiser on full-rank H.
    """
    _check_init_args("init_act_svd", E, r, scale)
    if H.shape != (E.shape[1], E.shape[1]):
        raise ValueError(f"init_act_svd: H must be (in, in) = {(E.shape[1], E.shape[1])}, got {tuple(H.shape)}")
    if eps < 0:
        raise ValueError(f"init_act_svd: eps must be >= 0, got {eps}")
    S, S_pinv = _hessian_root(H.to(E.device), eps)
    B, A = _top_r_factors(E.double() @ S, r, scale)
    return B.float(), (A @ S_pinv).float()


def init_grail(W: torch.Tensor, W_hat: torch.Tensor, H_hat: torch.Tensor, C: torch.Tensor, r: int, scale: float,
               ridge: float, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """GRAIL-style compensation that also corrects the shift of the layer's inputs caused by quantizing earlier layers.

    X_hat are the quantized model's inputs to this layer, X the teacher's on the same tokens; H_hat = X_hat^T X_hat / n,
    C = X_hat^T X / n. The ridge regression argmin ||X_hat W*^T - X W^T||^2 + lam ||W* - W_hat||^2 with
    lam = ridge * tr(H_hat) / in has W*^T = (H_hat + lam I)^-1 (C W^T + lam W_hat^T). At ridge 0 the loss of W_hat + M
    is ||X_hat (M - D)^T||^2 + const with D = W* - W_hat, so the best rank-r M is init_act_svd(D, H_hat). ridge > 0
    also keeps the solve well posed when H_hat is singular. Returns (B, A).
    """
    if W.shape != W_hat.shape or W.dim() != 2:
        raise ValueError(f"init_grail: W {tuple(W.shape)} and W_hat {tuple(W_hat.shape)} differ")
    n_in = W.shape[1]
    for label, M in (("H_hat", H_hat), ("C", C)):
        if M.shape != (n_in, n_in):
            raise ValueError(f"init_grail: {label} must be {(n_in, n_in)}, got {tuple(M.shape)}")
    if ridge < 0:
        raise ValueError(f"init_grail: ridge must be >= 0, got {ridge}")
    Hh, W64, Wh64 = H_hat.double(), W.double(), W_hat.double()
    lam = ridge * Hh.diagonal().sum() / n_in
    lhs = Hh + lam * torch.eye(n_in, dtype=Hh.dtype, device=Hh.device)
    W_star_t = torch.linalg.solve(lhs, C.double() @ W64.T + lam * Wh64.T)
    return init_act_svd(W_star_t.T - Wh64, H_hat, r, scale, eps)


# ---- how much a rank buys ----------------------------------------------------------------------------------------

def _weighted_energies(E: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Squared singular values of E S (any S with S S^T = H), descending: the energy of E's weighted directions."""
    if E.dim() != 2 or H.shape != (E.shape[1], E.shape[1]):
        raise ValueError(f"E (out, in) and H (in, in) do not fit: {tuple(E.shape)}, {tuple(H.shape)}")
    S, _ = _hessian_root(H.to(E.device), 0.0)
    return torch.linalg.svdvals(E.double() @ S).square()


def recoverable_energy(E: torch.Tensor, H: torch.Tensor, r: int) -> float:
    """Share of tr(E H E^T) that the best rank-r correction removes, in [0, 1] (1.0 when E carries no energy)."""
    if r < 0:
        raise ValueError(f"recoverable_energy: r must be >= 0, got {r}")
    energy = _weighted_energies(E, H)
    total = energy.sum().item()
    return 1.0 if total == 0 else energy[:r].sum().item() / total
