"""One frozen config for a run: presets, overrides from the environment and the command line, validation.

Precedence (lowest to highest): field defaults < preset < environment (FIELD_NAME) < --field_name=value.
The preset itself comes from --preset NAME or PRESET=NAME and defaults to `record`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, fields


class ConfigError(ValueError):
    """A knob with a value that does not parse or is out of range."""


@dataclass(frozen=True)
class Config:
    # --- run identity and files ---
    preset: str = "record"
    run_id: str = ""  # empty -> a timestamp, filled in by resolve()
    seed: int = 1337
    data_path: str = "./data/datasets/fineweb10B_sp1024"
    tokenizer_path: str = "./data/tokenizers/fineweb_1024_bpe.model"
    vocab_size: int = 1024
    log_dir: str = "logs"
    artifact_path: str = ""  # where the artifact is written (or read with --eval_only); empty = <log_dir>/<run_id>.lcq
    eval_only: bool = False  # score an existing artifact (--eval_only --artifact PATH) instead of training
    print_config: bool = False  # print the resolved config as JSON and exit (what the audit runs on a bundled script)
    # submission.json identity (the record folder's metadata)
    author: str = ""
    github_id: str = ""
    submission_name: str = ""  # empty -> derived from the run id
    submission_blurb: str = ""
    submission_json: str = "submission.json"  # every run (re)writes this file atomically; empty = do not write
    # build the embedded demo dataset if data_path is missing (demo/tiny presets only)
    auto_build_demo: bool = False

    # --- budgets ---
    max_wallclock_seconds: float = 600.0  # the challenge's training cap (train + GPTQ + LCQ + serialize)
    # seconds of the cap kept back from main training for the post-training stages (GPTQ, LCQ, serialize)
    train_reserve_seconds: float = 80.0
    eval_budget_seconds: float = 600.0

    # --- training ---
    iterations: int = 20000
    warmup_steps: int = 20  # compile/warm-up steps on synthetic tokens; state is restored afterwards, not charged
    lr_warmup_steps: int = 0
    warmdown_frac: float = 0.45  # final fraction of the (step or wallclock) progress over which the LR decays to 0
    train_seq_len: int = 2048
    train_batch_tokens: int = 786_432  # global tokens per optimizer step, all ranks and micro-steps together
    grad_accum_steps: int = 1
    val_loss_every: int = 0  # 0: only the final evaluation
    train_log_every: int = 50

    # --- model ---
    num_layers: int = 11
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: float = 4.0
    mlp_act: str = "leaky_relu2"  # relu2 (baseline) | leaky_relu2
    leaky_relu_slope: float = 0.5
    rope_dims: int = 16  # partial RoPE: rotate only this many of each head's dims (0 = head_dim, full RoPE)
    rope_base: float = 10000.0
    qk_norm: bool = True
    qk_gain_init: float = 1.5
    unet_skips: bool = True
    smear_gate: bool = True
    logit_softcap: float = 30.0  # 0 disables
    tied_embed_init_std: float = 0.005
    attention_backend: str = "auto"  # auto | fa3 | fa2 | sdpa
    compile: bool = True  # torch.compile the model on CUDA (ignored on CPU)

    # --- optimizer ---
    matrix_lr: float = 0.025
    embed_lr: float = 0.035
    scalar_lr: float = 0.025
    muon_momentum: float = 0.99
    muon_momentum_warmup_start: float = 0.85
    muon_momentum_warmup_steps: int = 500
    muon_backend_steps: int = 5
    muon_weight_decay: float = 0.04
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip_norm: float = 0.3  # 0 disables
    ema_decay: float = 0.997  # 0 disables; the EMA weights become the final model

    # --- evaluation ---
    eval_seq_len: int = 0  # sliding window length; 0 -> train_seq_len
    eval_stride: int = 64
    eval_batch_tokens: int = 131_072  # tokens per forward pass per rank during evaluation
    val_max_tokens: int = 0  # 0: the whole val split; >0: only the first N tokens (demo/tests)

    # --- quantization (GPTQ) ---
    quant_method: str = "gptq"  # gptq | rtn (round-to-nearest: the baseline GPTQ must beat)
    matrix_bits: int = 6
    embed_bits: int = 8
    # SDClip settings of public records (openai/parameter-golf PR #1394): clip rows at k standard deviations
    matrix_clip_sigmas: float = 12.85
    embed_clip_sigmas: float = 20.0
    gptq_damp: float = 0.01
    gptq_block_size: int = 128
    gptq_act_order: bool = True
    gptq_calib_tokens: int = 131_072  # train tokens per rank for the Hessians (never val)

    # --- artifact and gate ---
    compressor: str = "auto"  # auto (smallest of lzma/brotli) | lzma | brotli
    artifact_cap_bytes: int = 16_000_000  # decimal bytes: code + model + LoRA
    # kept back from LCQ for writing the artifact: brotli at quality 11 on a 16 MB payload took 31 s on the 2-core CI
    # machine (lzma 17 s; `auto` runs both in parallel); check the serialize row of the ledger on your hardware
    serialize_reserve_seconds: float = 35.0

    # --- LCQ: post-quantization LoRA distillation ---
    lcq_rank: str = "8"  # rank per adapter; 0 turns LCQ off; auto = the largest rank that fits under the cap
    lcq_alpha: float = 16.0  # LoRA scale = alpha / rank
    lcq_init: str = "act_svd"  # zero | svd | act_svd | grail
    lcq_merge: str = "side"  # side | fused | baked
    lcq_targets: str = ""  # comma-separated module patterns (fnmatch); empty = lcq.lora.DEFAULT_TARGETS
    lcq_rank_alloc: str = "uniform"  # uniform | rho (same parameter budget, ranks where the error is recoverable)
    lcq_temperature: float = 1.0
    lcq_lr: float = 1e-3
    lcq_warmdown_frac: float = 0.5  # LR decays linearly to 0 over this last fraction of the LCQ steps/time
    lcq_batch_tokens: int = 131_072  # global train tokens per distillation step
    lcq_max_steps: int = 100_000  # 0 = closed-form init only, no training
    lcq_seconds: float = 0.0  # 0: whatever GPTQ left of the reserve; > 0: at most this many seconds
    lcq_safety_seconds: float = 5.0
    lcq_factor_bits: int = 8
    lcq_grail_ridge: float = 1e-3
    lcq_grail_tokens: int = 16_384  # calibration tokens per rank for the grail init (holds every layer's inputs)
    lcq_log_every: int = 25
    lcq_auto_headroom_bytes: int = 20_000  # auto rank leaves this much under the cap

    def __post_init__(self) -> None:
        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"{name.upper()}={getattr(self, name)!r}: {msg}")

        need(self.preset in PRESETS, "preset", f"unknown preset; choose one of {sorted(PRESETS)}")
        need(self.vocab_size > 0, "vocab_size", "must be > 0")
        need(self.max_wallclock_seconds > 0, "max_wallclock_seconds", "must be > 0")
        need(0 <= self.train_reserve_seconds < self.max_wallclock_seconds, "train_reserve_seconds",
             "must be >= 0 and less than MAX_WALLCLOCK_SECONDS (main training needs some time)")
        need(self.eval_budget_seconds > 0, "eval_budget_seconds", "must be > 0")
        need(self.iterations > 0, "iterations", "must be > 0")
        need(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        need(self.lr_warmup_steps >= 0, "lr_warmup_steps", "must be >= 0")
        need(0.0 <= self.warmdown_frac <= 1.0, "warmdown_frac", "must be in [0, 1]")
        need(self.train_seq_len >= 2, "train_seq_len", "must be >= 2")
        need(self.grad_accum_steps >= 1, "grad_accum_steps", "must be >= 1")
        need(self.train_batch_tokens >= self.train_seq_len * self.grad_accum_steps, "train_batch_tokens",
             "must be at least TRAIN_SEQ_LEN * GRAD_ACCUM_STEPS (one sequence per micro-step)")
        need(self.val_loss_every >= 0, "val_loss_every", "must be >= 0 (0 disables)")
        need(self.train_log_every >= 1, "train_log_every", "must be >= 1")
        need(self.num_layers >= 1, "num_layers", "must be >= 1")
        need(self.num_heads >= 1 and self.model_dim % self.num_heads == 0, "model_dim",
             f"must be divisible by NUM_HEADS={self.num_heads}")
        need(self.num_kv_heads >= 1 and self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
             f"must divide NUM_HEADS={self.num_heads}")
        head_dim = self.model_dim // self.num_heads
        need(head_dim % 2 == 0, "model_dim", "MODEL_DIM / NUM_HEADS must be even for RoPE")
        need(0 <= self.rope_dims <= head_dim and self.rope_dims % 2 == 0, "rope_dims",
             f"must be even and in [0, head_dim={head_dim}] (0 = full RoPE)")
        need(self.mlp_mult > 0, "mlp_mult", "must be > 0")
        need(self.mlp_act in ("relu2", "leaky_relu2"), "mlp_act", "choose relu2 or leaky_relu2")
        need(self.logit_softcap >= 0, "logit_softcap", "must be >= 0 (0 disables)")
        need(self.attention_backend in ("auto", "fa3", "fa2", "sdpa"), "attention_backend",
             "choose auto, fa3, fa2 or sdpa")
        for name in ("matrix_lr", "embed_lr", "scalar_lr"):
            need(getattr(self, name) >= 0, name, "must be >= 0")
        need(0 <= self.muon_momentum < 1, "muon_momentum", "must be in [0, 1)")
        need(0 <= self.muon_momentum_warmup_start < 1, "muon_momentum_warmup_start", "must be in [0, 1)")
        need(self.muon_backend_steps >= 1, "muon_backend_steps", "must be >= 1")
        need(0 <= self.adam_beta1 < 1, "adam_beta1", "must be in [0, 1)")
        need(0 <= self.adam_beta2 < 1, "adam_beta2", "must be in [0, 1)")
        need(self.grad_clip_norm >= 0, "grad_clip_norm", "must be >= 0 (0 disables)")
        need(0 <= self.ema_decay < 1, "ema_decay", "must be in [0, 1) (0 disables)")
        need(self.eval_seq_len >= 0, "eval_seq_len", "must be >= 0 (0 = TRAIN_SEQ_LEN)")
        need(1 <= self.eval_stride <= self.window, "eval_stride", f"must be in [1, eval window={self.window}]")
        need(self.eval_batch_tokens >= self.window, "eval_batch_tokens",
             f"must hold at least one eval window ({self.window} tokens)")
        need(self.val_max_tokens >= 0, "val_max_tokens", "must be >= 0 (0 = all)")
        need(self.quant_method in ("gptq", "rtn"), "quant_method", "choose gptq or rtn")
        need(2 <= self.matrix_bits <= 8, "matrix_bits", "must be in 2..8")
        need(2 <= self.embed_bits <= 8, "embed_bits", "must be in 2..8")
        need(self.gptq_damp > 0, "gptq_damp", "must be > 0")
        need(self.gptq_block_size >= 1, "gptq_block_size", "must be >= 1")
        need(self.gptq_calib_tokens >= self.train_seq_len, "gptq_calib_tokens", "must hold at least one TRAIN_SEQ_LEN sequence")
        need(self.compressor in ("auto", "lzma", "brotli"), "compressor", "choose auto, lzma or brotli")
        need(self.artifact_cap_bytes > 0, "artifact_cap_bytes", "must be > 0")
        need(self.serialize_reserve_seconds >= 0, "serialize_reserve_seconds", "must be >= 0")
        need(self.lcq_rank == "auto" or (self.lcq_rank.isdigit() and int(self.lcq_rank) >= 0), "lcq_rank",
             "must be an integer >= 0 (0 turns LCQ off) or auto")
        need(self.lcq_alpha > 0, "lcq_alpha", "must be > 0")
        need(self.lcq_init in ("zero", "svd", "act_svd", "grail"), "lcq_init", "choose zero, svd, act_svd or grail")
        need(self.lcq_merge in ("side", "fused", "baked"), "lcq_merge", "choose side, fused or baked")
        need(self.lcq_rank_alloc in ("uniform", "rho"), "lcq_rank_alloc", "choose uniform or rho")
        need(self.lcq_temperature > 0, "lcq_temperature", "must be > 0")
        need(self.lcq_lr >= 0, "lcq_lr", "must be >= 0")
        need(0 <= self.lcq_warmdown_frac <= 1, "lcq_warmdown_frac", "must be in [0, 1]")
        need(self.lcq_batch_tokens >= self.train_seq_len, "lcq_batch_tokens", "must hold at least one TRAIN_SEQ_LEN sequence")
        need(self.lcq_max_steps >= 0, "lcq_max_steps", "must be >= 0")
        need(self.lcq_seconds >= 0, "lcq_seconds", "must be >= 0 (0 = what the reserve leaves)")
        need(self.lcq_safety_seconds >= 0, "lcq_safety_seconds", "must be >= 0")
        need(2 <= self.lcq_factor_bits <= 8, "lcq_factor_bits", "must be in 2..8")
        need(self.lcq_grail_ridge >= 0, "lcq_grail_ridge", "must be >= 0")
        need(self.lcq_grail_tokens >= 1, "lcq_grail_tokens", "must be >= 1")
        need(self.lcq_log_every >= 1, "lcq_log_every", "must be >= 1")
        need(self.lcq_auto_headroom_bytes >= 0, "lcq_auto_headroom_bytes", "must be >= 0")

    @property
    def artifact_file(self) -> str:
        return self.artifact_path or os.path.join(self.log_dir, f"{self.run_id}.lcq")

    @property
    def lcq_enabled(self) -> bool:
        return self.lcq_rank != "0"

    @property
    def window(self) -> int:
        return self.eval_seq_len or self.train_seq_len

    @property
    def train_budget_seconds(self) -> float:
        """Wall seconds main training may use: the cap minus the reserve for post-training stages."""
        return self.max_wallclock_seconds - self.train_reserve_seconds

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


# The fields that define the network: an artifact records them, and --eval_only rebuilds the model from them.
MODEL_FIELDS = ("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult", "mlp_act",
                "leaky_relu_slope", "rope_dims", "rope_base", "qk_norm", "qk_gain_init", "unet_skips", "smear_gate",
                "logit_softcap", "tied_embed_init_std")

_DEMO_DATA = "./data/demo/datasets/demo_sp1024"
_DEMO_TOKENIZER = "./data/demo/tokenizers/demo_sp1024.model"

# Presets override field defaults. `record` is the 8xH100 submission configuration.
PRESETS: dict[str, dict] = {
    "record": {},
    # CPU, a few minutes end to end on the embedded demo corpus.
    "demo": dict(
        data_path=_DEMO_DATA, tokenizer_path=_DEMO_TOKENIZER, auto_build_demo=True,
        max_wallclock_seconds=150.0, train_reserve_seconds=30.0, iterations=3000, warmup_steps=2,
        train_seq_len=256, train_batch_tokens=4096, train_log_every=25,
        num_layers=4, model_dim=128, num_heads=4, num_kv_heads=2, rope_dims=16,
        matrix_lr=0.04, embed_lr=0.05, scalar_lr=0.04, muon_momentum_warmup_steps=50,
        ema_decay=0.99, eval_stride=64, eval_batch_tokens=16384, val_max_tokens=60_000, compile=False,
        gptq_calib_tokens=16_384, serialize_reserve_seconds=5.0, lcq_safety_seconds=2.0, lcq_batch_tokens=4096,
        lcq_lr=2e-3, lcq_log_every=10, lcq_grail_tokens=4096,
    ),
    # Tests: seconds on CPU.
    "tiny": dict(
        data_path=_DEMO_DATA, tokenizer_path=_DEMO_TOKENIZER, auto_build_demo=True,
        max_wallclock_seconds=60.0, train_reserve_seconds=10.0, iterations=12, warmup_steps=1,
        train_seq_len=64, train_batch_tokens=1024, train_log_every=4,
        num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, rope_dims=8,
        muon_momentum_warmup_steps=5, ema_decay=0.9, eval_stride=32, eval_batch_tokens=2048,
        val_max_tokens=4096, compile=False,
        gptq_calib_tokens=2048, serialize_reserve_seconds=2.0, lcq_safety_seconds=1.0, lcq_batch_tokens=1024,
        lcq_max_steps=10, lcq_log_every=5, lcq_lr=5e-3, lcq_grail_tokens=1024,
    ),
}

_FIELDS = {f.name: f for f in fields(Config)}
# Short command-line spellings: --artifact PATH is --artifact_path PATH.
_CLI_ALIASES = {"artifact": "artifact_path"}


def _parse(name: str, raw: str, source: str):
    typ = _FIELDS[name].type
    try:
        if typ in ("bool", bool):
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected one of 1/0/true/false/yes/no/on/off")
        if typ in ("int", int):
            return int(raw.replace("_", ""))
        if typ in ("float", float):
            return float(raw)
        return raw
    except ValueError as e:
        raise ConfigError(f"{source}: cannot parse {raw!r} as {typ}: {e}") from None


def parse_args(argv: list[str]) -> tuple[dict, list[str]]:
    """Split argv into config overrides (--field=value / --field value) and the rest (flags the caller handles)."""
    overrides: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            key = key.replace("-", "_")
            key = _CLI_ALIASES.get(key, key)
            if key in _FIELDS:
                if not eq:
                    if _FIELDS[key].type in ("bool", bool) and (i + 1 >= len(argv) or argv[i + 1].startswith("--")):
                        value = "1"
                    elif i + 1 < len(argv):
                        i += 1
                        value = argv[i]
                    else:
                        raise ConfigError(f"--{key}: missing value")
                overrides[key] = value
                i += 1
                continue
        rest.append(arg)
        i += 1
    return overrides, rest


def resolve(argv: list[str] | None = None, env: dict | None = None, allow_extra: tuple[str, ...] = ()) -> tuple[Config, list[str]]:
    """Build the Config from preset, environment and argv. Returns (config, leftover argv).

    Leftover arguments must be in allow_extra (their names, e.g. '--eval_only'); anything else is an error, so a typo in a
    knob name never silently runs with the default."""
    env = dict(os.environ if env is None else env)
    argv = list(argv or [])
    cli, rest = parse_args(argv)
    for arg in rest:
        if arg.split("=", 1)[0] not in allow_extra:
            raise ConfigError(f"unknown argument {arg!r}; knobs are --field_name=value with fields: {', '.join(sorted(_FIELDS))}")
    preset = cli.get("preset") or env.get("PRESET") or "record"
    if preset not in PRESETS:
        raise ConfigError(f"PRESET={preset!r}: unknown preset; choose one of {sorted(PRESETS)}")
    values: dict = dict(PRESETS[preset])
    values["preset"] = preset
    for name in _FIELDS:
        if name == "preset":
            continue
        if name.upper() in env and env[name.upper()] != "":
            values[name] = _parse(name, env[name.upper()], f"environment variable {name.upper()}")
        if name in cli:
            values[name] = _parse(name, cli[name], f"--{name}")
    if not values.get("run_id"):
        values["run_id"] = time.strftime("%Y%m%d_%H%M%S") + f"_{preset}"
    return Config(**values), rest


def replace(cfg: Config, **changes) -> Config:
    return dataclasses.replace(cfg, **changes)


def make_config(preset: str = "tiny", **overrides) -> Config:
    """A config from a preset plus explicit overrides, ignoring the environment (for tests and benchmarks)."""
    values = dict(PRESETS[preset], preset=preset, **overrides)
    values.setdefault("run_id", f"{preset}_run")
    return Config(**values)
