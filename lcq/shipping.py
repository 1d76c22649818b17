"""What ships: model <-> artifact tensors (GPTQ codes, raw control tensors, quantized LoRA factors), and the model a
scorer rebuilds from the artifact file alone."""
from __future__ import annotations

import functools
import os

import torch
import torch.nn as nn

from . import artifact
from . import dist as D
from .config import MODEL_FIELDS, Config, replace
from .data import file_sha256
from .gptq import dequantize_state
from .lora import FactorFormat, attach_lora, dequantize_factors, lora_modules, merge_lora, quantize_factors
from .model import GPT, configure_runtime

FORMAT = "lcq-model-1"
LORA_PREFIX = "lora."
TIED = {"lm_head.weight": "tok_emb.weight"}


def group_of(name: str) -> str:
    """Byte attribution group of an artifact tensor: LoRA factors vs the quantized model."""
    return "lora" if name.startswith(LORA_PREFIX) else "model"


def pack_lora(model: nn.Module, fmt: FactorFormat) -> tuple[dict[str, torch.Tensor], dict[str, int], float]:
    """Quantized factors of every LoRA wrapper (on its own grid when it has one, else on `fmt`'s from its factors) ->
    (artifact tensors, ranks by module, alpha)."""
    tensors, ranks, alpha = {}, {}, None
    for name, m in lora_modules(model).items():
        packed = m.quantized() if m.fmt is not None else quantize_factors(m.lora_A, m.lora_B, fmt)
        for key, t in packed.items():
            tensors[f"{LORA_PREFIX}{name}.{key}"] = t.cpu()
        ranks[name] = m.rank
        alpha = m.scale * m.rank
    return tensors, ranks, alpha


@functools.lru_cache(maxsize=8)
def _sha256_of(path: str, mtime_ns: int, size: int) -> str:
    return file_sha256(path)


def tokenizer_identity(path: str, vocab_size: int) -> dict:
    """What identifies the tokenizer an artifact was trained with: the .model file's sha256 and the vocabulary size
    (issue 10: bos_id alone let an artifact be scored with another tokenizer). Hashed once per file version."""
    st = os.stat(path)
    return {"sha256": _sha256_of(os.path.abspath(path), st.st_mtime_ns, st.st_size), "vocab_size": vocab_size}


# What --eval_only takes from the artifact where PRESET/--preset, the environment and the command line say nothing
# (issue 28: the demo's artifact was scored with the record preset's CaseOps tokenizer path and refused)
RUN_FIELDS = ("preset", "tokenizer_path", "data_path", "vocab_size")


def artifact_meta(cfg: Config, bos_id: int, qmeta: dict, lora: dict | None) -> dict:
    return {"format": FORMAT, "model": {f: getattr(cfg, f) for f in MODEL_FIELDS}, "bos_id": bos_id,
            "tokenizer": tokenizer_identity(cfg.tokenizer_path, cfg.vocab_size), "qmeta": qmeta, "lora": lora,
            "run": {f: getattr(cfg, f) for f in RUN_FIELDS}}


def recorded_run(path: str) -> dict:
    """The artifact's RUN_FIELDS ({} for a file that does not decode: the start-up checks name what is wrong)."""
    try:
        run = artifact.load(path)[1].get("run")
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in run.items() if k in RUN_FIELDS} if isinstance(run, dict) else {}


def check_artifact_fits(path: str, meta: dict, cfg: Config, bos_id: int) -> dict[str, tuple]:
    """Before scoring an artifact with `cfg`'s tokenizer and data: refuse a tokenizer other than the one it was trained
    with (sha256, vocab size, BOS), which would score meaningless ids or index past the embedding. Returns the model
    knobs of `cfg` that differ from the artifact's shape, {knob: (config value, artifact value)}: the artifact's own
    shape is what runs, so these knobs are ignored and the caller logs them."""
    tok = meta.get("tokenizer")
    if not isinstance(tok, dict) or "sha256" not in tok or "vocab_size" not in tok:
        raise artifact.ArtifactError(f"{path}: records no tokenizer (sha256, vocab size). Fix: re-create it")
    mine = tokenizer_identity(cfg.tokenizer_path, cfg.vocab_size)
    if tok["vocab_size"] != mine["vocab_size"] or tok["sha256"] != mine["sha256"] or int(meta["bos_id"]) != bos_id:
        raise artifact.ArtifactError(
            f"{path} was trained with a tokenizer of sha256 {str(tok['sha256'])[:16]}, vocab {tok['vocab_size']}, "
            f"bos_id {meta['bos_id']}, not TOKENIZER_PATH={cfg.tokenizer_path} (sha256 {mine['sha256'][:16]}, "
            f"vocab {mine['vocab_size']}, bos_id {bos_id}). Fix: set TOKENIZER_PATH, VOCAB_SIZE, DATA_PATH to its own")
    return {k: (getattr(cfg, k), v) for k, v in meta["model"].items() if getattr(cfg, k) != v}


def _refuse(path: str, what: str) -> artifact.ArtifactError:
    return artifact.ArtifactError(f"{path}: {what}, refused before allocating")


def model_config(path: str, meta: dict, cfg: Config, tensors: dict[str, torch.Tensor]) -> Config:
    """The network an artifact claims, checked before it sizes anything (issue 17: crafted dims made the loader try
    terabytes; an unknown field raised a TypeError): known fields that pass the config's checks, the weight count they
    imply (computed, never allocated) within 4x of the values the file holds, and LoRA ranks equal to their factors'
    rows."""
    model = meta.get("model")
    unknown = sorted(set(model) - set(MODEL_FIELDS)) if isinstance(model, dict) else "meta.model"
    if unknown:
        raise artifact.ArtifactError(f"{path}: model fields {unknown} are unknown to this lcq; use the one that "
                                     "wrote it")
    try:
        mcfg = replace(cfg, **model)
    except Exception as e:
        raise _refuse(path, f"model fields: {e}") from None
    d = mcfg.model_dim
    claimed = mcfg.vocab_size * d + mcfg.num_layers * d * (2 * d + 2 * d // mcfg.num_heads * mcfg.num_kv_heads
                                                           + 2 * int(mcfg.mlp_mult * d))
    held = sum(t.numel() for t in tensors.values())
    bad = [n for n, r in dict((meta.get("lora") or {}).get("ranks", {})).items()
           if tensors.get(f"{LORA_PREFIX}{n}.A_q", torch.empty(0)).shape[:1] != (r,)]
    if claimed > 4 * held + (1 << 16) or bad:
        raise _refuse(path, f"its model fields imply ~{claimed} weights (it holds {held}), lora ranks {bad} without "
                      "their factors")
    return mcfg


def model_from_state(cfg: Config, bos_id: int, state: dict[str, torch.Tensor], device: torch.device) -> GPT:
    """A fresh GPT holding exactly `state` (tied weights stay tied)."""
    model = GPT(cfg, bos_id).to(device)
    missing, unexpected = model.load_state_dict({k: v for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise ValueError(f"artifact does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return configure_runtime(model, cfg, device).eval()


def apply_lora(model: GPT, tensors: dict[str, torch.Tensor], lora: dict) -> None:
    """Attach the shipped LoRA factors, decoded from the artifact, as wrappers (an extra low-rank path per layer).

    load_shipped folds them into the weights; the wrappers are what the side path computes, kept for comparing the two."""
    ranks = {name: int(r) for name, r in lora["ranks"].items()}
    attach_lora(model, list(ranks), ranks, float(lora["alpha"]))
    device = next(model.parameters()).device
    for name, m in lora_modules(model).items():
        packed = {k: tensors[f"{LORA_PREFIX}{name}.{k}"] for k in ("A_q", "A_scale", "B_q", "B_scale")}
        A, B = dequantize_factors(packed)
        m.set_factors(B.to(device), A.to(device))
    model.requires_grad_(False)


def load_shipped(path: str, cfg: Config, device: torch.device, with_lora: bool = True) -> tuple[GPT, dict, Config]:
    """Decode the artifact at `path` into a fresh model (with its LoRA unless with_lora is False).

    The LoRA factors are folded into the decoded float weights for every merge mode (issue 8): side and fused ship the
    same int8 factors, the decoded base is float anyway, so W_hat + scale * B @ A scores what the side path scores (up
    to float rounding of the order of the sums) without a low-rank matmul in every adapted layer. meta["lora"]["merge"]
    still records how the artifact ships. The network shape comes from the artifact; everything else (data, eval knobs,
    backend) from `cfg`."""
    tensors, meta = artifact.load(path)
    if meta.get("format") != FORMAT:
        raise artifact.ArtifactError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}")
    model_cfg = model_config(path, meta, cfg, tensors)
    lora = meta.get("lora")
    base = {k: v for k, v in tensors.items() if group_of(k) == "model"}
    try:
        model = model_from_state(model_cfg, meta["bos_id"], dequantize_state(base, meta["qmeta"]), device)
    except (KeyError, TypeError, ValueError) as e:
        raise _refuse(path, f"its tensors do not make the model its meta describes ({type(e).__name__}: {e})") from None
    if with_lora and lora:
        apply_lora(model, tensors, lora)
        merge_lora(model)
    return model, meta, model_cfg


# A projection needs one finished chunk of each compressor; LCQ waits at most this long for it.
RATE_WAIT_SECONDS = 5.0
# Assembling, writing and fsyncing the artifact: a 16 MB file took 0.13 s on the 2-core CI machine; twice that.
WRITE_SECONDS = 0.25


def plan_serialize(run, lcq_seconds_left: float, lora_bytes: int) -> tuple[float, float]:
    """The seconds the serialize stage will be charged, projected from the compression rates the base section's job
    has measured in this run (not a constant): compressing the LoRA section after distillation, plus waiting for the
    base section if it is projected to finish after LCQ would (LCQ then gives that time back, so the threads that
    compress share the cores with less), or, for baked LCQ (the model is re-quantized after distillation), the whole
    base section again. Rank 0 projects; every rank gets its number. Logged and shown as the serialize budget in the
    ledger. Returns (serialize budget, projected seconds of the LoRA section)."""
    cfg, job = run.cfg, run.base_job
    budget, lora_s, note = 0.0, 0.0, ""
    if job is not None:
        left = job.seconds_left(RATE_WAIT_SECONDS)
        rates = job.rates()
        if left is None or rates is None:
            budget = cfg.serialize_reserve_seconds
            note = f"no chunk timed within {RATE_WAIT_SECONDS:g}s; SERIALIZE_RESERVE_SECONDS {budget:g}s kept"
        else:
            per_byte = sum(1 / r for c, r in rates.items() if c not in job.dropped)  # thread-seconds, every back-end
            lora_s = lora_bytes * per_byte / min(job.threads, len(rates))
            if cfg.lcq_merge == "baked":
                base_s = job.raw_bytes * per_byte / job.threads
                wait, what = base_s, f"the re-quantized base section again {base_s:.2f}s"
            else:
                wait = max(0.0, left - (lcq_seconds_left - lora_s - WRITE_SECONDS))
                what = f"base section projected done in {left:.2f}s, wait after LCQ {wait:.2f}s"
            budget = wait + lora_s + WRITE_SECONDS
            if wait > 0 and cfg.lcq_merge != "baked":
                run.log(f"warning: the base section is projected {wait:.2f}s past LCQ's end; LCQ gives that back. Fix: "
                        "more SERIALIZE_THREADS or TRAIN_RESERVE_SECONDS")
            note = (f"base section {job.raw_bytes} raw bytes, {job.threads} threads, measured "
                    + " ".join(f"{c} {r / 1e6:.2f}" for c, r in rates.items()) + " MB/s per thread; "
                    f"{what}; LoRA section ~{lora_bytes} raw bytes {lora_s:.2f}s; write {WRITE_SECONDS:g}s")
    budget, lora_s = (float(v) for v in D.all_reduce_max(
        torch.tensor([budget, lora_s], dtype=torch.float64, device=run.dinfo.device)).tolist())
    run.serialize_budget = budget
    if job is not None:
        run.log(f"serialize_plan: {note}; serialize budget {budget:.2f}s")
    return budget, lora_s
