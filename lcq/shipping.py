"""What ships: model <-> artifact tensors (GPTQ codes, raw control tensors, quantized LoRA factors), and the model a
scorer rebuilds from the artifact file alone."""
from __future__ import annotations

import torch
import torch.nn as nn

from . import artifact
from .attention import resolve_backend
from .config import MODEL_FIELDS, Config, replace
from .gptq import dequantize_state
from .lora import attach_lora, dequantize_factors, lora_modules, merge_lora, quantize_factors
from .model import GPT

FORMAT = "lcq-model-1"
LORA_PREFIX = "lora."
TIED = {"lm_head.weight": "tok_emb.weight"}


def group_of(name: str) -> str:
    """Byte attribution group of an artifact tensor: LoRA factors vs the quantized model."""
    return "lora" if name.startswith(LORA_PREFIX) else "model"


def pack_lora(model: nn.Module, bits: int) -> tuple[dict[str, torch.Tensor], dict[str, int], float]:
    """Quantized factors of every LoRA wrapper -> (artifact tensors, ranks by module, alpha)."""
    tensors, ranks, alpha = {}, {}, None
    for name, m in lora_modules(model).items():
        for key, t in quantize_factors(m.lora_A, m.lora_B, bits).items():
            tensors[f"{LORA_PREFIX}{name}.{key}"] = t.cpu()
        ranks[name] = m.rank
        alpha = m.scale * m.rank
    return tensors, ranks, alpha


def artifact_meta(cfg: Config, bos_id: int, qmeta: dict, lora: dict | None) -> dict:
    return {"format": FORMAT, "model": {f: getattr(cfg, f) for f in MODEL_FIELDS}, "bos_id": bos_id,
            "qmeta": qmeta, "lora": lora}


def model_from_state(cfg: Config, bos_id: int, state: dict[str, torch.Tensor], device: torch.device) -> GPT:
    """A fresh GPT holding exactly `state` (tied weights stay tied)."""
    model = GPT(cfg, bos_id).to(device)
    missing, unexpected = model.load_state_dict({k: v for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise ValueError(f"artifact does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.attn_backend = resolve_backend(cfg.attention_backend, device)
    return model.eval()


def apply_lora(model: GPT, tensors: dict[str, torch.Tensor], lora: dict) -> None:
    """Attach the shipped LoRA (side: an extra low-rank path; fused: folded into the weights at load time)."""
    ranks = {name: int(r) for name, r in lora["ranks"].items()}
    attach_lora(model, list(ranks), ranks, float(lora["alpha"]))
    device = next(model.parameters()).device
    for name, m in lora_modules(model).items():
        packed = {k: tensors[f"{LORA_PREFIX}{name}.{k}"] for k in ("A_q", "A_scale", "Bt_q", "Bt_scale")}
        A, B = dequantize_factors(packed)
        m.set_factors(B.to(device), A.to(device))
    if lora["merge"] == "fused":
        merge_lora(model)
    model.requires_grad_(False)


def load_shipped(path: str, cfg: Config, device: torch.device, with_lora: bool = True) -> tuple[GPT, dict, Config]:
    """Decode the artifact at `path` into a fresh model (LoRA applied as shipped unless with_lora is False).

    The network shape comes from the artifact; everything else (data, eval knobs, backend) from `cfg`."""
    tensors, meta = artifact.load(path)
    if meta.get("format") != FORMAT:
        raise artifact.ArtifactError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}; "
                                     "was it written by this version of lcq?")
    model_cfg = replace(cfg, **meta["model"])
    lora = meta.get("lora")
    base = {k: v for k, v in tensors.items() if group_of(k) == "model"}
    model = model_from_state(model_cfg, int(meta["bos_id"]), dequantize_state(base, meta["qmeta"]), device)
    if with_lora and lora:
        apply_lora(model, tensors, lora)
    return model, meta, model_cfg
