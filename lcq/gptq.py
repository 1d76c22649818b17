"""Post-training weight quantization: collect Hessians -> solve (GPTQ or RTN) -> pack.

GPTQ is Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers" (arXiv 2210.17323): quantize one input column at a time and push each column's rounding
error onto the columns not yet quantized, weighted by the inverse Hessian H = E[x x^T] of the layer input.

Per-row scale rule (shared by RTN and GPTQ, fixed from W before any solve), with qmax = 2^(bits-1) - 1:

    a_r     = clip_sigmas * std(W[r, :])   (torch.std, unbiased: divides by cols - 1)   if clip_sigmas > 0
    a_r     = max_j |W[r, j]|              if clip_sigmas <= 0, cols == 1, or the line above is 0 / not finite
    scale_r = float16(clamp(a_r / qmax, 2^-24, 65504))
    q[r, j] = clamp(round_half_even(W[r, j] / float(scale_r)), -qmax, qmax)        (int8)
    W_hat   = float(q) * float(scale_r)                                             (see `dequantize`)

The std rule is "SDClip" from PR #1394 (openai/parameter-golf): with c = 12.85 for int6 matrices
and c = 20 for the int8 embedding, c * std usually exceeds max|W|, so nothing is clipped and the grid
is coarser than max-abs would give. That is deliberate: a wider step puts more of q near zero, which
the compressor turns into fewer bytes; c trades error for bytes, and those defaults are tuned for it.
The integers are always computed against the float16 scale that is stored, so the weights the
evaluation sees in memory and the ones rebuilt from an artifact are the same bits.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping

import torch
import torch.distributed as dist
from torch import nn

EMBED_NAME = "tok_emb.weight"
ALIASES_KEY = "aliases"
# Smallest positive and largest finite float16: a stored scale must be both non-zero and finite.
_SCALE_MIN, _SCALE_MAX = 2.0**-24, 65504.0
_RAW_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_DTYPES_BY_NAME = {
    name: getattr(torch, name)
    for name in ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")
}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_bits(bits: int, where: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"{where}: bits must be an int in 2..8 (values are stored as int8), got {bits!r}")
    return 2 ** (bits - 1) - 1


# ---------------------------------------------------------------------------------------------------
# collect


def collect_hessians(
    model: nn.Module, targets: Mapping[str, str], run_batches: Callable[[], None]
) -> dict[str, torch.Tensor]:
    """Return H = sum(x^T x) / tokens for the input x of each target module, keyed by weight name.

    `targets` maps a weight name to the nn.Linear whose input multiplies it (the tied embedding
    "tok_emb.weight" -> "lm_head"; `lcq.model.gptq_targets`), at least one. Pass the plain (uncompiled)
    model: hooks sit on its submodules.
    Sums are float32 on each module's weight device: the solve runs in float32 and adds 1% of
    mean(diag H) as damping, which dwarfs float32 rounding of the sum, and float64 matmuls are slow
    or missing on many GPUs. Under torch.distributed the sums and token counts are all-reduced, so
    every rank returns the Hessian of the union of all ranks' calibration tokens.
    """
    modules: dict[str, nn.Module] = {}
    for weight_name, module_name in targets.items():
        try:
            modules[module_name] = model.get_submodule(module_name)
        except AttributeError:
            raise KeyError(
                f"collect_hessians: targets[{weight_name!r}] names module {module_name!r}, which the model does not have"
            ) from None
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for module_name, module in modules.items():
        weight = module.weight
        sums[module_name] = torch.zeros(weight.shape[1], weight.shape[1], dtype=torch.float32, device=weight.device)
        counts[module_name] = 0

    def make_hook(module_name: str):
        # A forward hook runs after the forward: the Linear has already taken x, so x is a tensor of in_features columns.
        def hook(_module: nn.Module, args: tuple, _output) -> None:
            acc = sums[module_name]
            x = args[0].detach().reshape(-1, acc.shape[0]).to(device=acc.device, dtype=torch.float32)
            # Calibration runs under bf16 autocast on CUDA: keep the float32 sum out of it, whatever autocast does
            # with in-place matmuls in a given torch release (issue 8).
            with torch.autocast(acc.device.type, enabled=False):
                acc.addmm_(x.T, x)
            counts[module_name] += x.shape[0]  # host-side shape: no device sync inside the forward

        return hook

    handles = [module.register_forward_hook(make_hook(name)) for name, module in modules.items()]
    try:
        run_batches()
    finally:
        for handle in handles:
            handle.remove()

    names = sorted(sums)  # one fixed order so every rank issues the same collectives
    totals = torch.tensor([counts[n] for n in names], dtype=torch.int64, device=sums[names[0]].device)
    if dist.is_available() and dist.is_initialized():
        for n in names:
            dist.all_reduce(sums[n], op=dist.ReduceOp.SUM)
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    hessians_by_module: dict[str, torch.Tensor] = {}
    for n, total in zip(names, totals.tolist()):
        if total == 0:
            feeding = sorted(w for w, m in targets.items() if m == n)
            raise RuntimeError(
                f"collect_hessians: module {n!r} (feeding {feeding}) saw no tokens during run_batches; "
                "run the model forward over at least one batch"
            )
        hessians_by_module[n] = sums[n] / total
    return {w: hessians_by_module[m] for w, m in targets.items()}


# ---------------------------------------------------------------------------------------------------
# solve


def row_scales(W: torch.Tensor, bits: int, clip_sigmas: float) -> torch.Tensor:
    """float16 per-row scales by the rule in the module docstring."""
    qmax = _check_bits(bits, "row_scales")
    W = W.detach().float()
    max_abs = W.abs().amax(dim=1)
    if clip_sigmas > 0 and W.shape[1] > 1:
        clip = clip_sigmas * W.std(dim=1)
        clip = torch.where(torch.isfinite(clip) & (clip > 0), clip, max_abs)
    else:
        clip = max_abs
    return (clip / qmax).clamp(_SCALE_MIN, _SCALE_MAX).to(torch.float16)


def _round_to_grid(w: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """Float integers in [-qmax, qmax]; w and scale broadcast against each other."""
    return torch.clamp(torch.round(w / scale), -qmax, qmax)


def quantize_rtn(W: torch.Tensor, bits: int, clip_sigmas: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest symmetric per-row quantization -> (q int8, scale float16 (rows,))."""
    qmax = _check_bits(bits, "quantize_rtn")
    scale = row_scales(W, bits, clip_sigmas)
    q = _round_to_grid(W.detach().float(), scale.float()[:, None], qmax)
    return q.to(torch.int8), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 weights from int codes and per-row scales; the one decoder for memory and artifact alike."""
    return q.float() * scale.float()[:, None]


def _upper_cholesky_of_inverse(H: torch.Tensor) -> torch.Tensor:
    """Upper-triangular U with U^T U = H^-1 (the GPTQ paper's Cholesky reformulation, section 4 step 3)."""
    L, info = torch.linalg.cholesky_ex(H)
    if info.item() == 0:
        U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if info.item() != 0:
        raise ValueError("quantize_gptq: damped Hessian is not positive definite in float32; raise damp")
    return U


def quantize_gptq(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    clip_sigmas: float,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ solve for W (rows, cols) against the input Hessian H (cols, cols) -> (q int8, scale float16).

    Scales come from the original W (same rule as `quantize_rtn`), so GPTQ and RTN differ only in the
    integers. damp * mean(diag H) is added to the diagonal. Columns with diag(H) = 0 never see input;
    the IST-DASLab gptq code zeroes them, but here they are rounded like RTN (their Hessian row is
    isolated, so no error flows in or out) because the tied embedding's rows are also looked up
    directly, where those columns do matter. act_order quantizes columns in order of decreasing diag(H) (the GPTQ
    repo's --act-order) and returns q in the original column order. damp and block_size are checked where a run sets
    them (QuantSpec).
    """
    qmax = _check_bits(bits, "quantize_gptq")
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise ValueError(f"quantize_gptq: H has shape {tuple(H.shape)}, expected ({cols}, {cols}) for W {tuple(W.shape)}")
    if not torch.isfinite(H).all():
        raise ValueError("quantize_gptq: H has non-finite entries")
    scale = row_scales(W, bits, clip_sigmas)
    codes = _gptq_codes(W, H, scale.float(), -qmax, qmax, damp, block_size, act_order)
    return codes.to(torch.int8).contiguous(), scale


def _damped(H: torch.Tensor, damp: float) -> torch.Tensor:
    """float32 copy of H with dead inputs (diag 0) set to 1 and damp * mean(diag H) added to the diagonal."""
    H = H.detach().to(torch.float32).clone()
    diag = H.diagonal()
    damping = damp * diag.mean()
    dead = (diag == 0).nonzero().squeeze(1)
    H[dead, dead] = 1.0
    H.diagonal().add_(damping)
    return H


def _gptq_codes(W: torch.Tensor, H: torch.Tensor, scale: torch.Tensor, lo: int, hi: int, damp: float,
                block_size: int, act_order: bool) -> torch.Tensor:
    """The GPTQ solve: float integer codes in [lo, hi] for W (rows, cols) on the grid `scale`, which is per row (rows,)
    or per entry (rows, cols) (group scales). Shared by the weights and the LoRA factors' closed form (lcq/lora.py)."""
    cols = W.shape[1]
    # Work on W^T so each column is a contiguous row: the per-column updates below are then
    # contiguous rank-1 updates, several times faster on CPU than strided column slices.
    work = W.detach().to(torch.float32).T.contiguous()
    H = _damped(H.to(W.device), damp)
    per_entry = scale.ndim == 2
    s = scale.T.contiguous() if per_entry else scale
    if act_order:
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)
        work, H = work[perm], H[perm][:, perm]
        if per_entry:
            s = s[perm]
    U = _upper_cholesky_of_inverse(H)

    codes = torch.empty_like(work)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        block = work[i1:i2].clone()
        errors = torch.empty_like(block)
        U_block = U[i1:i2, i1:i2]
        for j in range(i2 - i1):
            w = block[j]
            sj = s[i1 + j] if per_entry else s
            qj = torch.clamp(torch.round(w / sj), lo, hi)
            codes[i1 + j] = qj
            err = (w - qj * sj) / U_block[j, j]
            # Spread this column's error over the block's remaining columns (paper eq. 3 via U's row j).
            block[j:].addr_(U_block[j, j:], err, alpha=-1.0)
            errors[j] = err
        # Lazy batch update: the columns after this block get all its errors in one matmul (paper, step 2).
        work[i2:].addmm_(U[i1:i2, i2:].T, errors, alpha=-1.0)
    if act_order:
        codes = codes[torch.argsort(perm)]
    return codes.T


# ---------------------------------------------------------------------------------------------------
# pack


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How a trained state dict becomes integer codes.

    Defaults: int6 matrices at 12.85 sigmas and an int8 embedding at 20 sigmas are the SDClip
    settings of PR #1394 (openai/parameter-golf), also used by PR #1471; damp 0.01 and block 128
    are the GPTQ paper's; act_order on as in those records' GPTQ (columns by decreasing diag H).
    raw_dtype float16: control tensors (gains, scales, skip weights) are ~1e4 numbers, and their
    float16 rounding (2^-11 relative) is far below the int6 matrices' error; halving them saves bytes.
    """

    method: str = "gptq"
    matrix_bits: int = 6
    embed_bits: int = 8
    matrix_clip_sigmas: float = 12.85
    embed_clip_sigmas: float = 20.0
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    raw_dtype: torch.dtype = torch.float16
    # Per-role clips for block matrices (#1855: attention 13.0, MLP 11.5); None = matrix_clip_sigmas.
    attn_clip_sigmas: float | None = None
    mlp_clip_sigmas: float | None = None

    def __post_init__(self) -> None:
        def fail(field: str, why: str) -> None:
            raise ValueError(f"QuantSpec.{field}: {why}, got {getattr(self, field)!r}")

        if self.method not in ("gptq", "rtn"):
            fail("method", "must be 'gptq' or 'rtn'")
        for field in ("matrix_bits", "embed_bits"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 8:
                fail(field, "must be an int in 2..8 (codes are stored as int8)")
        for field in ("matrix_clip_sigmas", "embed_clip_sigmas", "attn_clip_sigmas", "mlp_clip_sigmas"):
            value = getattr(self, field)
            if value is None and field in ("attn_clip_sigmas", "mlp_clip_sigmas"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                fail(field, "must be a finite number (<= 0 means max-abs scaling)")
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not (
            math.isfinite(self.damp) and self.damp > 0
        ):
            fail("damp", "must be a finite number > 0 (a fraction of mean diag H, e.g. 0.01)")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            fail("block_size", "must be an int >= 1")
        if not isinstance(self.act_order, bool):
            fail("act_order", "must be a bool")
        raw = self.raw_dtype
        if isinstance(raw, str) and raw.removeprefix("torch.") in _RAW_DTYPES:
            object.__setattr__(self, "raw_dtype", _RAW_DTYPES[raw.removeprefix("torch.")])
        elif raw not in _RAW_DTYPES.values():
            fail("raw_dtype", f"must be one of {sorted(_RAW_DTYPES)}")


def clip_for(spec: QuantSpec, name: str, role: str) -> float:
    """The clip (row standard deviations) for one quantized tensor: embedding, attention, MLP, or other matrix."""
    if role == "embed":
        return spec.embed_clip_sigmas
    if ".attn." in name and spec.attn_clip_sigmas is not None:
        return spec.attn_clip_sigmas
    if ".mlp." in name and spec.mlp_clip_sigmas is not None:
        return spec.mlp_clip_sigmas
    return spec.matrix_clip_sigmas


def tensor_role(name: str, tensor: torch.Tensor) -> str:
    """'embed' for the token embedding, 'matrix' for 2-D float Linear weights inside blocks, else 'raw'.

    Only '.weight' entries count as matrices: bare 2-D parameters (mixing coefficients, skip weights)
    are control tensors whose rows are too short or too sensitive for a per-row integer grid.
    """
    if name == EMBED_NAME:
        return "embed"
    if tensor.is_floating_point() and tensor.ndim == 2 and name.startswith("blocks.") and name.endswith(".weight"):
        return "matrix"
    return "raw"


def _check_aliases(state_dict: Mapping[str, torch.Tensor], aliases: Mapping[str, str]) -> None:
    for alias, target in aliases.items():
        a, t = state_dict.get(alias), state_dict.get(target)
        if a is None or t is None or target in aliases or a.dtype != t.dtype or not torch.equal(a, t):
            raise ValueError(f"quantize_state: aliases[{alias!r}] = {target!r}: one is missing or an alias, or they differ")


def solve_cost(rows: int, cols: int) -> int:
    """The estimate solve_plan balances: the flops of the block updates (rows x cols^2) and of the Hessian's Cholesky
    and inverse (~cols^3), plus 2^23 per column for the column loop's small ops, which take about as long whatever the
    size. That constant fits the per-shape solve seconds measured on CPU (BENCHMARKS.md, issue 18: flops alone put the
    record's 4x-wide MLP proj at 0.85 of the cost, measured 0.65), and it leaves a launch-bound GPU's split, where time
    goes as cols, within 5% of the best at 2-8 ranks (a projection: no GPU measured it)."""
    return cols * (cols * (rows + cols) + 2**23)


def solve_plan(costs: Mapping[str, float], world_size: int) -> list[list[str]]:
    """Each rank's share of the solves: costliest first, each to the least loaded rank (lower rank on ties; LPT, Graham
    1969: the largest share is within 4/3 of the best split's), names in a fixed order so every rank makes one plan."""
    shares, loads = [[] for _ in range(world_size)], [0.0] * world_size
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        r = loads.index(min(loads))
        shares[r].append(name)
        loads[r] += costs[name]
    return shares


def _solve(state_dict, hessians, spec, aliases, world_size, log) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(q, scale) of every tensor quantize_state quantizes. On world_size > 1 ranks GPTQ is split (issue 18):
    each rank solves its share and the codes and scales are gathered to every rank (one all_gather_object, as
    lcq.dist.first_error uses). Every rank then holds the bits one rank alone computes: a solve reads only W and its Hessian, which
    collect_hessians made the same on every rank."""
    jobs = {n: t for n, t in state_dict.items() if n not in aliases and tensor_role(n, t) != "raw"}

    def solve(name):
        t = jobs[name]
        role = tensor_role(name, t)
        bits, clip = spec.embed_bits if role == "embed" else spec.matrix_bits, clip_for(spec, name, role)
        if spec.method != "gptq":
            return quantize_rtn(t, bits, clip)
        # a weight collect_hessians was not given raises KeyError(name) here
        return quantize_gptq(t, hessians[name], bits, clip, spec.damp, spec.block_size, spec.act_order)

    if world_size == 1 or spec.method != "gptq":
        return {n: solve(n) for n in jobs}
    shares, got = solve_plan({n: solve_cost(*t.shape) for n, t in jobs.items()}, world_size), [None] * world_size
    try:  # as host tensors: a pickled CUDA tensor would unpickle on the sender's device
        mine = {n: [x.cpu() for x in solve(n)] for n in shares[dist.get_rank()]}
    except Exception as e:  # sent instead: every rank raises it, none waits at the gather for codes that never come
        mine = RuntimeError(f"GPTQ on rank {dist.get_rank()}: {e!r}")
    dist.all_gather_object(got, mine)
    for g in got:
        if isinstance(g, Exception):
            raise g
    if log:
        log(f"gptq_split: matrices per rank {[len(s) for s in shares]}, "
            f"{sum(x.nbytes for g in got for v in g.values() for x in v)} bytes gathered")
    return {n: tuple(x.to(jobs[n].device) for x in v) for g in got for n, v in g.items()}


def quantize_state(
    state_dict: Mapping[str, torch.Tensor],
    hessians: Mapping[str, torch.Tensor] | None,
    spec: QuantSpec,
    aliases: Mapping[str, str],
    world_size: int = 1,
    log: Callable[[str], None] | None = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Quantize a state dict -> (tensors, qmeta); see `tensor_role` for which tensors are quantized.

    Quantized weight n -> n+".q" (int8) and n+".scale" (float16); raw tensor n -> n, floats cast to spec.raw_dtype.
    Alias keys are not stored; qmeta["aliases"] records them. qmeta is JSON-ready. world_size > 1 (the process
    group's size) splits GPTQ's solves over the ranks, and every rank must then call it (see `_solve`); `log` gets the
    split's line. A caller on one rank alone passes world_size 1.
    """
    _check_aliases(state_dict, aliases)
    solved = _solve(state_dict, hessians, spec, aliases, world_size, log)
    tensors: dict[str, torch.Tensor] = {}
    qmeta: dict = {}

    def put(key: str, value: torch.Tensor) -> None:
        if key in tensors:
            raise ValueError(f"quantize_state: stored key {key!r} is produced twice; rename the parameter")
        tensors[key] = value

    for name, t in state_dict.items():
        if name in aliases:
            continue
        if name == ALIASES_KEY:
            raise ValueError(f"quantize_state: a tensor may not be named {ALIASES_KEY!r} (reserved in qmeta)")
        role = tensor_role(name, t)
        meta = {"shape": list(t.shape), "dtype": _dtype_name(t.dtype)}
        if t.dtype not in _DTYPES_BY_NAME.values():
            raise ValueError(f"quantize_state: {name!r} has unsupported dtype {t.dtype}")
        if role == "raw":
            stored = t.detach()
            if stored.is_floating_point():
                stored = stored.to(spec.raw_dtype)
                if not torch.isfinite(stored).all() and torch.isfinite(t).all():
                    raise ValueError(f"quantize_state: {name!r} overflows raw_dtype {spec.raw_dtype}; use float32")
            put(name, stored.contiguous())
            qmeta[name] = {"kind": "raw", "bits": stored.element_size() * 8, **meta}
            continue
        bits = spec.embed_bits if role == "embed" else spec.matrix_bits
        q, scale = solved[name]
        put(name + ".q", q)
        put(name + ".scale", scale)
        qmeta[name] = {"kind": "quant", "bits": bits, **meta}
    qmeta[ALIASES_KEY] = dict(aliases)
    return tensors, qmeta


def dequantize_state(tensors: Mapping[str, torch.Tensor], qmeta: Mapping) -> dict[str, torch.Tensor]:
    """Inverse of `quantize_state`: float32 for quantized weights, original dtype for raw ones.

    Each alias maps to the very tensor object of its target, so tied weights stay tied.
    """
    if ALIASES_KEY not in qmeta:
        raise KeyError(f"dequantize_state: qmeta has no {ALIASES_KEY!r} entry; it was not made by quantize_state")
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(key: str, name: str) -> torch.Tensor:
        if key not in tensors:
            raise KeyError(f"dequantize_state: {name!r} needs tensor {key!r}, which is missing")
        used.add(key)
        return tensors[key]

    for name, meta in qmeta.items():
        if name == ALIASES_KEY:
            continue
        shape = tuple(meta["shape"])
        if meta["dtype"] not in _DTYPES_BY_NAME:
            raise ValueError(f"dequantize_state: {name!r} has unknown dtype {meta['dtype']!r}")
        if meta["kind"] == "quant":
            q, scale = take(name + ".q", name), take(name + ".scale", name)
            qmax = _check_bits(meta["bits"], f"dequantize_state[{name!r}]")
            if q.dtype != torch.int8 or tuple(q.shape) != shape or len(shape) != 2:
                raise ValueError(f"dequantize_state: {name}.q must be int8 of shape {shape}, got {q.dtype} {tuple(q.shape)}")
            if scale.dtype != torch.float16 or tuple(scale.shape) != shape[:1]:
                raise ValueError(f"dequantize_state: {name}.scale must be float16 of shape {shape[:1]}")
            if q.numel() and int(q.abs().max()) > qmax:
                raise ValueError(f"dequantize_state: {name}.q has codes outside +-{qmax} for {meta['bits']} bits")
            out[name] = dequantize(q, scale)
        elif meta["kind"] == "raw":
            t = take(name, name)
            if tuple(t.shape) != shape:
                raise ValueError(f"dequantize_state: {name!r} has shape {tuple(t.shape)}, qmeta says {shape}")
            out[name] = t.to(_DTYPES_BY_NAME[meta["dtype"]])
        else:
            raise ValueError(f"dequantize_state: {name!r} has unknown kind {meta['kind']!r}")
    for alias, target in qmeta[ALIASES_KEY].items():
        if target not in out:
            raise KeyError(f"dequantize_state: alias {alias!r} points at {target!r}, which is not stored")
        out[alias] = out[target]
    stray = sorted(set(tensors) - used)
    if stray:
        raise ValueError(f"dequantize_state: tensors not described by qmeta: {stray[:5]}")
    return out


def quant_error_report(
    state_dict: Mapping[str, torch.Tensor],
    dequantized: Mapping[str, torch.Tensor],
    hessians: Mapping[str, torch.Tensor],
) -> list[tuple[str, float]]:
    """(name, tr(E H E^T) / tr(W H W^T)) with E = W - W_hat for each weight with a Hessian, worst first."""
    report = []
    for name, H in hessians.items():
        W = state_dict[name].detach().float()  # a weight missing here raises KeyError(name)
        H = H.to(device=W.device, dtype=torch.float32)
        E = W - dequantized[name].to(W.device).float()
        num = float(((E @ H) * E).sum())
        den = float(((W @ H) * W).sum())
        report.append((name, num / den if den > 0 else (0.0 if num == 0 else math.inf)))
    return sorted(report, key=lambda item: item[1], reverse=True)
