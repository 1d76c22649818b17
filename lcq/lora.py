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

import torch
import torch.nn as nn

from . import gptq

# Attention q/k/v/out and MLP up/down of every block. lm_head is left out: its weight is the tied input embedding and it
# is the largest matrix (vocab x d), so a rank-r delta costs r * (vocab + d) parameters, and merging it would need an
# untied copy of the whole embedding. Add "lm_head" to the list to opt in.
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
    """`base(x) + scale * (x @ A^T) @ B^T` around a frozen `nn.Linear`.

    Factors are float32 Parameters and are cast to x's dtype in forward. B starts at zero (so the wrapper equals the
    base exactly) and A is Kaiming-uniform with a = sqrt(5), the init peft uses for its default LoRA; A draws from the
    global torch RNG, so seed it identically on every rank. The base weight is never written to here, which keeps a
    weight that is shared with another module (tied embedding) safe.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear: base must be an nn.Linear, got {type(base).__name__}")
        if rank < 1:
            raise ValueError(f"LoRALinear: rank must be >= 1, got {rank}")
        if not alpha > 0:
            raise ValueError(f"LoRALinear: alpha must be > 0, got {alpha}")
        for p in base.parameters():
            p.requires_grad_(False)
        self.base = base
        self.in_features, self.out_features, self.rank = base.in_features, base.out_features, rank
        self.scale = alpha / rank
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + low_rank(x, self.lora_A, self.lora_B, self.scale)

    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A, (out, in) float32."""
        return self.scale * (self.lora_B @ self.lora_A)

    def merged_weight(self) -> torch.Tensor:
        """base.weight + delta, (out, in) float32 (a new tensor; the base is not touched)."""
        return self.base.weight.float() + self.delta_weight()

    @torch.no_grad()
    def set_factors(self, B: torch.Tensor, A: torch.Tensor) -> None:
        """Copy factors in (e.g. from a closed-form init called with `scale=self.scale`)."""
        want_b, want_a = tuple(self.lora_B.shape), tuple(self.lora_A.shape)
        if tuple(B.shape) != want_b or tuple(A.shape) != want_a:
            raise ValueError(f"LoRALinear.set_factors: want B {want_b} and A {want_a}, "
                             f"got B {tuple(B.shape)} and A {tuple(A.shape)}")
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
            raise ValueError(f"target pattern {pattern!r} matches no module of the model (names look like "
                             "blocks.0.attn.c_q, blocks.0.mlp.fc, lm_head)")
        matched += [n for n in hits if n not in matched]
    return matched


def attach_lora(model: nn.Module, targets: list[str] | tuple[str, ...], rank: int | dict[str, int],
                alpha: float) -> dict[str, LoRALinear]:
    """Wrap every nn.Linear whose qualified name matches a pattern of `targets` (fnmatch, `*` also crosses dots).

    `rank` is one rank for all, or a rank per matched name (every matched name must be listed; 0 leaves it unwrapped).
    Every parameter of the model except the new factors is frozen. Returns the wrappers by module name.
    """
    if not targets:
        raise ValueError("attach_lora: targets is empty; pass patterns such as lcq.lora.DEFAULT_TARGETS")
    if not alpha > 0:
        raise ValueError(f"attach_lora: alpha must be > 0, got {alpha}")
    matched = match_targets(model, targets)
    modules = dict(model.named_modules())
    for n in matched:
        if not isinstance(modules[n], nn.Linear):
            raise TypeError(f"attach_lora: module {n!r} matched by targets is a {type(modules[n]).__name__}, "
                            "not an nn.Linear (narrow the pattern; a module can be wrapped only once)")
    if isinstance(rank, dict):
        missing = [n for n in matched if n not in rank]
        unknown = [n for n in rank if n not in matched]
        if missing or unknown:
            raise ValueError(f"attach_lora: rank dict must list exactly the matched modules; "
                             f"missing {missing}, not matched by targets {unknown}")
        ranks = {n: rank[n] for n in matched}
    else:
        ranks = {n: rank for n in matched}
    bad = {n: r for n, r in ranks.items() if not isinstance(r, int) or r < 0}
    if bad:
        raise ValueError(f"attach_lora: ranks must be ints >= 0, got {bad}")

    for p in model.parameters():
        p.requires_grad_(False)
    wrappers = {}
    for n in matched:
        if ranks[n] == 0:
            continue
        wrappers[n] = LoRALinear(modules[n], ranks[n], alpha)
        _set_submodule(model, n, wrappers[n])
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
        _set_submodule(model, n, m.base)


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Fold each delta into its base weight and unwrap.

    The merged weight is always a fresh Parameter (in the base weight's dtype), never an in-place write: a tied lm_head
    thereby becomes an untied copy for the merged module only, and the input embedding keeps its values.
    """
    for n, m in lora_modules(model).items():
        old = m.base.weight
        m.base.weight = nn.Parameter(m.merged_weight().to(old.dtype), requires_grad=old.requires_grad)
        _set_submodule(model, n, m.base)


# ---- shipped factors ---------------------------------------------------------------------------------------------

def _balance(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale each rank component (A[k] / c_k, B[:, k] * c_k; B @ A unchanged) so both share max-abs sqrt(a_k b_k)."""
    a, b = A.abs().amax(1), B.abs().amax(0)
    c = torch.where((a > 0) & (b > 0), (a / b).sqrt(), torch.ones_like(a))
    return A / c[:, None], B * c


def quantize_factors(A: torch.Tensor, B: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """Round-to-nearest factors with one fp16 scale per rank component (rows of A and of B^T), max-abs clipping.

    Quantizing B^T rather than B gives r scales instead of `out` scales. Each component is first balanced between A and
    B: per-row rounding does not care how a row is scaled, but the fp16 scale does (a B that grew from zero can have
    a step below fp16's normal range), and balancing keeps both factors' steps near the geometric mean. So
    `dequantize_factors` returns the balanced factors, whose product is B @ A up to rounding.
    """
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(f"quantize_factors: want A (r, in) and B (out, r), got {tuple(A.shape)} and {tuple(B.shape)}")
    A, B = _balance(A.detach().float(), B.detach().float())
    a_q, a_s = gptq.quantize_rtn(A, bits, 0.0)
    bt_q, bt_s = gptq.quantize_rtn(B.T.contiguous(), bits, 0.0)
    return {"A_q": a_q, "A_scale": a_s, "Bt_q": bt_q, "Bt_scale": bt_s}


def dequantize_factors(packed: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of quantize_factors: (A, B) float32 (the balanced factors; B @ A is what is preserved)."""
    missing = [k for k in ("A_q", "A_scale", "Bt_q", "Bt_scale") if k not in packed]
    if missing:
        raise ValueError(f"dequantize_factors: packed factors lack {missing}")
    A = gptq.dequantize(packed["A_q"], packed["A_scale"])
    B = gptq.dequantize(packed["Bt_q"], packed["Bt_scale"]).T.contiguous()
    return A, B


# ---- closed-form inits -------------------------------------------------------------------------------------------

def _check_init_args(fn: str, E: torch.Tensor, r: int, scale: float) -> None:
    if E.dim() != 2:
        raise ValueError(f"{fn}: the error matrix must be 2-D (out, in), got shape {tuple(E.shape)}")
    if not 1 <= r <= min(E.shape):
        raise ValueError(f"{fn}: rank r must be in [1, {min(E.shape)}] for shape {tuple(E.shape)}, got {r}")
    if not scale > 0:
        raise ValueError(f"{fn}: scale must be > 0 (the wrapper's alpha / r), got {scale}")


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
        raise ValueError(f"init_grail: W and W_hat must be 2-D of one shape, "
                         f"got {tuple(W.shape)} and {tuple(W_hat.shape)}")
    n_in = W.shape[1]
    for label, M in (("H_hat", H_hat), ("C", C)):
        if M.shape != (n_in, n_in):
            raise ValueError(f"init_grail: {label} must be (in, in) = {(n_in, n_in)}, got {tuple(M.shape)}")
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
        raise ValueError(f"error matrix E must be (out, in) and its H (in, in); "
                         f"got {tuple(E.shape)} and {tuple(H.shape)}")
    S, _ = _hessian_root(H.to(E.device), 0.0)
    return torch.linalg.svdvals(E.double() @ S).square()


def recoverable_energy(E: torch.Tensor, H: torch.Tensor, r: int) -> float:
    """Share of tr(E H E^T) that the best rank-r correction removes, in [0, 1] (1.0 when E carries no energy)."""
    if r < 0:
        raise ValueError(f"recoverable_energy: r must be >= 0, got {r}")
    energy = _weighted_energies(E, H)
    total = energy.sum().item()
    return 1.0 if total == 0 else energy[:r].sum().item() / total


def allocate_ranks(errors: dict[str, tuple[torch.Tensor, torch.Tensor]], budget_params: int,
                   candidates: tuple[int, ...] = (0, 2, 4, 8, 16, 32, 64, 128, 256)) -> dict[str, int]:
    """Per-tensor LoRA ranks from `candidates` under a budget of sum r * (in + out) <= budget_params.

    Greedy: repeatedly take the one-step rank increase with the most captured weighted error energy per parameter that
    still fits. Each tensor's energies are sorted, so its gain per parameter only falls as its rank grows and the greedy
    order is the efficient one. Ties go to the name that sorts first. Ranks above min(out, in) are never given.
    """
    if budget_params < 0:
        raise ValueError(f"allocate_ranks: budget_params must be >= 0, got {budget_params}")
    if not candidates or candidates[0] != 0 or any(b <= a for a, b in zip(candidates, candidates[1:])):
        raise ValueError(f"allocate_ranks: candidates must start at 0 and strictly increase, got {candidates}")
    steps, cum, width = {}, {}, {}
    for name, (E, H) in errors.items():
        energy = _weighted_energies(E, H)
        cum[name] = [0.0] + torch.cumsum(energy, 0).tolist()
        steps[name] = [c for c in candidates if c <= min(E.shape)]
        width[name] = E.shape[0] + E.shape[1]
    level = {name: 0 for name in errors}
    spent = 0
    while True:
        best, best_ratio = None, 0.0
        for name in sorted(errors):
            k, ladder = level[name], steps[name]
            if k + 1 == len(ladder):
                continue
            cost = (ladder[k + 1] - ladder[k]) * width[name]
            gain = cum[name][ladder[k + 1]] - cum[name][ladder[k]]
            if spent + cost <= budget_params and gain / cost > best_ratio:
                best, best_ratio = name, gain / cost
        if best is None:
            return {name: steps[name][level[name]] for name in errors}
        k = level[best]
        spent += (steps[best][k + 1] - steps[best][k]) * width[best]
        level[best] = k + 1
