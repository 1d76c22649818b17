"""One frozen config for a run: presets, overrides from the environment and the command line, validation.

Precedence (lowest to highest): field defaults < preset < environment (FIELD_NAME) < --field_name=value.
The preset itself comes from --preset NAME or PRESET=NAME and defaults to `record`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from dataclasses import dataclass, fields

from .seq_schedule import parse_seq_schedule


class ConfigError(ValueError):
    """A knob with a value that does not parse or is out of range."""




# Range checks by field (Config.__post_init__): each entry is (test, what the message says, the fields it holds for).
# What 0 means where it is special (off, all, TRAIN_SEQ_LEN) is in the field's comment and the README.
_BOUNDS = (
    (lambda v: v > 0, "> 0", "vocab_size max_wallclock_seconds eval_budget_seconds iterations mlp_mult gptq_damp "
     "artifact_cap_bytes lcq_alpha lcq_temperature ttt_eps"),
    (lambda v: v >= 0, ">= 0", "gptq_min_seconds warmup_steps lr_warmup_steps val_loss_every logit_softcap "
     "grad_clip_norm eval_seq_len val_max_tokens ttt_steps ttt_lr ttt_weight_decay ttt_phases ttt_phase_lr "
     "gptq_calib_batches serialize_reserve_seconds serialize_threads lcq_lr lcq_max_steps lcq_seconds "
     "lcq_safety_seconds lcq_grail_ridge lcq_auto_headroom_bytes matrix_lr embed_lr scalar_lr embed_weight_decay "
     "scalar_weight_decay muon_weight_decay ttt_alpha ttt_phase_momentum ttt_phase_clip ttt_phase_tokens"),
    (lambda v: v >= 1, ">= 1", "grad_accum_steps train_log_every num_layers recur_passes muon_backend_steps "
     "ttt_chunk_tokens ttt_rank gptq_block_size lcq_factor_group lcq_grail_tokens "
     "lcq_log_every ttt_batch_docs"),
    (lambda v: v >= 2, ">= 2", "train_seq_len"),
    (lambda v: 0 <= v < 1, "in [0, 1)", "muon_momentum muon_momentum_warmup_start adam_beta1 adam_beta2 ema_decay "
     "ttt_beta1 ttt_beta2"),
    (lambda v: 0 <= v <= 1, "in [0, 1]", "warmdown_frac recur_from_progress min_lr_frac lcq_warmdown_frac"),
    (lambda v: 2 <= v <= 8, "in 2..8", "matrix_bits embed_bits lcq_factor_bits"),
)
# The values a string field may take.
_CHOICES = dict(mlp_act="relu2 leaky_relu2", smear_gate="off blend input", init="default orthogonal",
                muon_ns_coeffs="jordan polar_express", ttt_init="auto artifact zero", quant_method="gptq rtn",
                lcq_init="zero svd act_svd grail", lcq_merge="side fused baked",
                attention_backend="auto fa3 fa2 sdpa", compressor="brotli lzma auto group")


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
    # issue 10: the start-up check wants TRAIN_RESERVE_SECONDS >= SERIALIZE_RESERVE_SECONDS + LCQ_SAFETY_SECONDS + this,
    # so GPTQ never gets a negative share. A floor, not an estimate: the ledger's gptq row shows the real time
    gptq_min_seconds: float = 1.0

    # --- training ---
    iterations: int = 20000
    warmup_steps: int = 20  # compile/warm-up steps on synthetic tokens; state is restored afterwards, not charged
    lr_warmup_steps: int = 0
    warmdown_frac: float = 0.45  # final fraction of the (step or wallclock) progress over which the LR decays to 0
    train_seq_len: int = 2048
    # progressive context (#2014): LENGTH@PROGRESS stages, each from that training progress on, e.g.
    # 1024@0,2048@0.1,3072@0.7 (lcq/seq_schedule.py); the last length is TRAIN_SEQ_LEN and tokens per step stay
    # TRAIN_BATCH_TOKENS. Empty = off (TRAIN_SEQ_LEN throughout); off in the record preset (see RECORD_FEATURES)
    train_seq_schedule: str = ""
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
    # blend: each normed token moves toward the previous one by a per-channel sigmoid gate (0.5 at init) | input:
    # #1855's x + lam * sigmoid(W x[:12]) * previous x on the raw embedding, before the norm (lam = W = 0: identity at
    # init) | off. BOS-masked either way (issue 19)
    smear_gate: str = "blend"
    logit_softcap: float = 30.0  # 0 disables
    tied_embed_init_std: float = 0.005
    # record-stack features (openai/parameter-golf #1855 and the PRs it stacks); the field defaults leave each one off
    xsa_last_n: int = 0  # exclusive self-attention (output minus its own-value component) on the last N layers (#478)
    ln_scale: bool = False  # scale each block's normed inputs by 1/sqrt(layer+1) (#315)
    skip_gates: bool = False  # learned sigmoid gate between each U-Net skip and the residual stream (#289)
    # depth recurrence (#1344): layers RECUR_START_LAYER..RECUR_END_LAYER run RECUR_PASSES times (weights stored once)
    # once training progress reaches RECUR_FROM_PROGRESS; 1 = off
    recur_passes: int = 1
    recur_start_layer: int = 0
    recur_end_layer: int = 0
    recur_from_progress: float = 0.0
    parallel_start_layer: int = 0  # two residual lanes (attention / MLP) with a learned mix from this layer on (#1530); 0 = off
    attn_gate_window: int = 0  # sparse attention output gate: per-head sigmoid of the first N input dims (#1787); 0 = off
    attn_gate_scale: float = 1.0  # pre-sigmoid scale of that gate (#1855: 0.5)
    # issue 19: #1855's own variants; the field defaults are ours (better at demo scale), the record preset #1855's
    resid_mix: bool = False  # each block reads m0 * stream + m1 * x0 (the normed embedding), m learned per channel
    init: str = "default"  # default (nn.Linear's) | orthogonal (q/k/v and MLP-up weights, gain 1, as #1855)
    # auto = fa3, else fa2; on CUDA an error if neither imports (issue 8: a silent SDPA fallback ran much slower) | sdpa
    attention_backend: str = "auto"  # auto | fa3 | fa2 | sdpa
    compile: bool = True  # torch.compile the training loss and the eval forward on CUDA (ignored on CPU)
    # bf16 autocast on CPU too (issue 8): runs on CPU the mixed precision CUDA always runs, for tests; slower on most CPUs
    autocast_cpu_bf16: bool = False

    # --- optimizer ---
    matrix_lr: float = 0.025
    embed_lr: float = 0.035
    scalar_lr: float = 0.025
    muon_momentum: float = 0.99
    muon_momentum_warmup_start: float = 0.85
    muon_momentum_warmup_steps: int = 500
    muon_backend_steps: int = 5
    muon_ns_coeffs: str = "jordan"  # jordan (fixed quintic, modded-nanogpt) | polar_express (per-step tuples, #1344/#1787)
    muon_weight_decay: float = 0.04
    # Muon row normalisation (issue 18/19): each row of the momentum update scaled to unit norm before Newton-Schulz,
    # as #1855's MUON_ROW_NORMALIZE (its default 1)
    muon_row_normalize: bool = False
    embed_weight_decay: float = 0.0  # decoupled (AdamW) weight decay on the tied embedding (#1855: 0.085)
    scalar_weight_decay: float = 0.0  # decoupled weight decay on gains, gates and mixes (#1855: 0.02)
    min_lr_frac: float = 0.0  # warmdown floor: the LR multiplier never falls below this (#1787: 0.10)
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
    # every scored stage writes its per-target records (doc, pos, target, nll, bytes) to PATH with the stage name before
    # the suffix (dump.npz -> dump.quantized_lcq_ttt.npz): compare runs document by document (issue 9); empty = off
    eval_dump: str = ""

    # --- score-first test-time training at eval (lcq/ttt.py; the records' phased TTT, PRs #1626 -> #1736 -> #1855) ---
    ttt_enabled: bool = False  # 1: one more scored stage, <as shipped>_ttt, after the sliding eval of what ships
    ttt_init: str = "auto"  # artifact (continue the shipped LCQ LoRA) | zero (fresh adapter) | auto (artifact if it has one)
    ttt_chunk_tokens: int = 48  # targets scored per chunk before the adapter steps on them (#1855: 48)
    ttt_steps: int = 1  # adapter steps per chunk, each after the chunk is scored
    ttt_rank: int = 80  # rank of a zero-started adapter (#1855: 80)
    # module patterns of a zero-started adapter; empty = LCQ's defaults + lm_head. blocks.*.attn / blocks.*.mlp name a whole
    # branch: its adapter reads the block's normed input and adds to the branch output (#1855's o and MLP adapters)
    ttt_targets: str = ""
    ttt_lr: float = 1e-4  # Adam on the adapter (#1855: 1e-4)
    ttt_beta1: float = 0.9
    ttt_beta2: float = 0.999
    ttt_weight_decay: float = 0.0  # decoupled (AdamW); it pulls a shipped start toward zero
    ttt_phases: int = 0  # global SGD phases on the base weights over documents already scored (#1855: 3); 0 = none
    ttt_phase_docs: int = 0  # documents scored before the last phase boundary (#1855: 2500); boundaries split it evenly
    ttt_phase_lr: float = 1e-3  # SGD learning rate of the global phases
    # --- batched score-first TTT (issue 15; #1855's per-document adapters as batched tensors, its global phases) ---
    ttt_batch_docs: int = 1  # documents a rank adapts together, each with its own adapter and Adam state (#1855: 64)
    ttt_alpha: float = 0.0  # LoRA alpha of a zero-started adapter; 0 = LCQ_ALPHA (#1855: 144 at rank 80)
    ttt_eps: float = 1e-8  # Adam eps of the adapter (#1855: 1e-10)
    ttt_warm_start_a: bool = False  # keep each slot's A across its batches, zero only B (#1855's TTT_WARM_START_A)
    ttt_phase_momentum: float = 0.0  # SGD momentum of a global phase (#1855: 0.9)
    ttt_phase_clip: float = 0.0  # grad-norm clip of a global phase step; 0 = none (#1855: 1.0)
    ttt_phase_cosine: bool = False  # phase lr cosine from TTT_PHASE_LR to 0 over the phase's steps (#1855)
    ttt_phase_tokens: int = 0  # tokens per phase SGD step, all ranks together; 0 = EVAL_BATCH_TOKENS (#1855: 32,768)

    # --- quantization (GPTQ) ---
    quant_method: str = "gptq"  # gptq | rtn (round-to-nearest: the baseline GPTQ must beat)
    matrix_bits: int = 6
    embed_bits: int = 8
    # SDClip settings of public records (openai/parameter-golf PR #1394): clip rows at k standard deviations
    matrix_clip_sigmas: float = 12.85
    # per-role clips (#1855: attention 13.0, MLP 11.5); negative = MATRIX_CLIP_SIGMAS
    attn_clip_sigmas: float = -1.0
    mlp_clip_sigmas: float = -1.0
    embed_clip_sigmas: float = 20.0
    gptq_damp: float = 0.01
    gptq_block_size: int = 128
    gptq_act_order: bool = True
    gptq_calib_tokens: int = 131_072  # train tokens per rank for the Hessians (never val)
    # > 0: calibrate on this many train batches of TRAIN_BATCH_TOKENS / world per rank instead (#1855: 16)
    gptq_calib_batches: int = 0

    # --- artifact and gate ---
    # brotli | lzma | auto (both on every section, keep the smaller: twice the host work). brotli by default (issue 8):
    # on the record-size int6 payload brotli gave 13,741,407 bytes and lzma 14,622,035, so auto's lzma half only
    # takes host cores from the base section compressing beside LCQ. group (issue 11, after #1855's per-group
    # compressor): the model section split into role buckets, each in its best layout (column-major, rows in
    # similarity order) and back-end (lrzip when its binary is on PATH, else brotli); lcq/grouping.py
    compressor: str = "brotli"
    artifact_cap_bytes: int = 16_000_000  # decimal bytes: code + model + LoRA
    # planned for serialization before anything is measured (the budget split, GPTQ's share, the start-up check). LCQ's
    # own budget keeps back what serialization is projected to need from the compression rate measured in the run
    # (issue 8: the base section compresses during LCQ, the LoRA section after it); this is the fallback when no rate
    # was measured. Whole-artifact brotli-11 on a 16 MB payload took 31 s on the 2-core CI machine.
    serialize_reserve_seconds: float = 35.0
    # host threads that compress artifact sections (0 = the host's cores less two per local rank, at least one: the ranks
    # still run LCQ meanwhile, issue 18); the bytes never depend on it (issue 8)
    serialize_threads: int = 0

    # --- LCQ: post-quantization LoRA distillation ---
    lcq_rank: str = "8"  # rank per adapter; 0 turns LCQ off; auto = the largest rank that fits under the cap
    lcq_alpha: float = 16.0  # LoRA scale = alpha / rank
    lcq_init: str = "act_svd"  # zero | svd | act_svd | grail
    lcq_merge: str = "side"  # side | fused | baked
    lcq_targets: str = ""  # comma-separated module patterns (fnmatch); empty = lcq.lora.DEFAULT_TARGETS
    lcq_temperature: float = 1.0
    lcq_lr: float = 1e-3
    lcq_warmdown_frac: float = 0.5  # LR decays linearly to 0 over this last fraction of the LCQ steps/time
    lcq_batch_tokens: int = 131_072  # global train tokens per distillation step
    lcq_max_steps: int = 100_000  # 0 = closed-form init only, no training (LQER, issue 16)
    lcq_seconds: float = 0.0  # 0: whatever GPTQ left of the reserve; > 0: at most this many seconds
    lcq_safety_seconds: float = 5.0
    # Factor storage (issue 16): A (r, in) at LCQ_FACTOR_BITS; B (out, r) at the same bits (symmetric, one fp16 scale
    # per rank component) or, with LCQ_FACTOR_ASYM, at int2 with one scale per tensor and A's scales per
    # LCQ_FACTOR_GROUP inputs: #1797/#1855's LQER storage (LCQ_FACTOR_BITS=4 LCQ_FACTOR_ASYM=1 is its "2+4").
    # Distillation trains on this grid (fake-quant forward, straight-through gradients), so what ships is what trained.
    lcq_factor_bits: int = 8
    lcq_factor_asym: bool = False
    lcq_factor_group: int = 64
    # Byte-budgeted allocation (issue 16): spend this many bytes of factors (auto = what the code and the real compressed
    # model section leave under the cap, less LCQ_AUTO_HEADROOM_BYTES) a rank unit at a time where the closed form
    # removes the most Hessian-weighted error per byte (lcq.lora.allocate_bytes); the closed-form fits are the init and
    # LCQ_RANK caps any one tensor's rank (auto: 64). 0 = off: uniform/rho ranks from LCQ_RANK
    lcq_bytes: str = "0"
    lcq_grail_ridge: float = 1e-3
    lcq_grail_tokens: int = 16_384  # calibration tokens per rank for the grail init (holds every layer's inputs)
    lcq_log_every: int = 25
    lcq_auto_headroom_bytes: int = 20_000  # auto rank leaves this much under the cap

    def __post_init__(self) -> None:
        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"{name.upper()}={getattr(self, name)!r}: {msg}")

        need(self.preset in PRESETS, "preset", f"unknown preset; choose one of {sorted(PRESETS)}")
        # A run's name names files in LOG_DIR, never a path (issue 17: RUN_ID=../x wrote outside LOG_DIR; 240
        # characters failed on the artifact's temp name after LCQ).
        need(re.fullmatch(r"\w[\w.-]{,99}", self.run_id or "x", re.A), "run_id", r"must match \w[\w.-]{,99}")
        need(0 <= self.train_reserve_seconds < self.max_wallclock_seconds, "train_reserve_seconds",
             "must be >= 0 and less than MAX_WALLCLOCK_SECONDS (main training needs some time)")
        need(self.train_batch_tokens >= self.train_seq_len * self.grad_accum_steps, "train_batch_tokens",
             "must be at least TRAIN_SEQ_LEN * GRAD_ACCUM_STEPS (one sequence per micro-step)")
        try:
            parse_seq_schedule(self.train_seq_schedule, self.train_seq_len)
        except ValueError as e:
            need(False, "train_seq_schedule", str(e))
        need(self.num_heads >= 1 and self.model_dim % self.num_heads == 0, "model_dim",
             f"must be divisible by NUM_HEADS={self.num_heads}")
        need(self.num_kv_heads >= 1 and self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
             f"must divide NUM_HEADS={self.num_heads}")
        head_dim = self.model_dim // self.num_heads
        need(head_dim % 2 == 0, "model_dim", "MODEL_DIM / NUM_HEADS must be even for RoPE")
        need(0 <= self.rope_dims <= head_dim and self.rope_dims % 2 == 0, "rope_dims",
             f"must be even and in [0, head_dim={head_dim}] (0 = full RoPE)")
        if isinstance(self.smear_gate, bool):  # artifacts written before issue 19 record the on/off bool
            object.__setattr__(self, "smear_gate", "blend" if self.smear_gate else "off")
        for test, what, names in _BOUNDS:
            for name in names.split():
                need(test(getattr(self, name)), name, "must be " + what)
        for name, values in _CHOICES.items():
            need(getattr(self, name) in values.split(), name, "choose one of " + values)
        need(0 <= self.xsa_last_n <= self.num_layers, "xsa_last_n", f"must be in [0, NUM_LAYERS={self.num_layers}]")
        if self.recur_passes > 1:
            need(0 <= self.recur_start_layer <= self.recur_end_layer < self.num_layers, "recur_end_layer",
                 f"need 0 <= RECUR_START_LAYER={self.recur_start_layer} <= RECUR_END_LAYER < NUM_LAYERS={self.num_layers}")
        if self.parallel_start_layer:
            # Lanes only in the decoder half and after the looped span, so a lane never feeds an encoder skip or loop.
            first = max(self.num_layers // 2 if self.unet_skips else 1,
                        self.recur_end_layer + 1 if self.recur_passes > 1 else 1)
            need(first <= self.parallel_start_layer < self.num_layers, "parallel_start_layer",
                 f"must be 0 (off) or in [{first}, NUM_LAYERS={self.num_layers}): the decoder half, after any looped layer")
        need(0 <= self.attn_gate_window <= self.model_dim, "attn_gate_window",
             f"must be in [0, MODEL_DIM={self.model_dim}] (0 = off)")
        need(math.isfinite(self.attn_gate_scale) and self.attn_gate_scale > 0, "attn_gate_scale", "must be > 0")
        need(isinstance(self.autocast_cpu_bf16, bool), "autocast_cpu_bf16", "must be 0 or 1")
        need(1 <= self.eval_stride <= self.window, "eval_stride", f"must be in [1, eval window={self.window}]")
        need(self.eval_batch_tokens >= self.window, "eval_batch_tokens",
             f"must hold at least one eval window ({self.window} tokens)")
        need(self.ttt_phase_docs >= self.ttt_phases and (self.ttt_phases > 0 or self.ttt_phase_docs == 0),
             "ttt_phase_docs", f"must be >= TTT_PHASES={self.ttt_phases} (one document per phase at least) when "
             "TTT_PHASES > 0, and 0 when TTT_PHASES=0")
        # Known before training: a start from the artifact needs shipped factors (fail now, not after a paid run).
        need(self.eval_only or not self.ttt_enabled or self.ttt_init != "artifact"
             or (self.lcq_rank != "0" and self.lcq_merge != "baked"), "ttt_init",
             "artifact needs LoRA factors in the artifact: LCQ on (LCQ_RANK != 0) with LCQ_MERGE=side or fused; "
             "or set TTT_INIT=zero/auto")
        need(self.gptq_calib_tokens >= self.train_seq_len, "gptq_calib_tokens", "must hold at least one TRAIN_SEQ_LEN sequence")
        for name in ("matrix_clip_sigmas", "attn_clip_sigmas", "mlp_clip_sigmas", "embed_clip_sigmas"):
            need(math.isfinite(getattr(self, name)), name, "must be a finite number of row standard deviations")
        need(self.lcq_rank == "auto" or (self.lcq_rank.isdigit() and int(self.lcq_rank) >= 0), "lcq_rank",
             "must be an integer >= 0 (0 turns LCQ off) or auto")
        need(self.lcq_batch_tokens >= self.train_seq_len, "lcq_batch_tokens", "must hold at least one TRAIN_SEQ_LEN sequence")
        need(self.lcq_bytes == "auto" or self.lcq_bytes.isdigit(), "lcq_bytes", "must be a byte count or auto (0 = off)")
        need(self.lcq_bytes == "0" or self.lcq_merge != "baked", "lcq_bytes",
             "counts shipped factor bytes, which LCQ_MERGE=baked does not ship; use side or fused, or LCQ_BYTES=0")

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

    def gptq_calib_tokens_per_rank(self, world_size: int) -> int:
        """Train tokens each rank feeds the GPTQ Hessians: GPTQ_CALIB_BATCHES local batches, else GPTQ_CALIB_TOKENS."""
        if self.gptq_calib_batches:
            return self.gptq_calib_batches * max(self.train_seq_len, self.train_batch_tokens // world_size)
        return self.gptq_calib_tokens

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


# The fields that define the network: an artifact records them, and --eval_only rebuilds the model from them.
MODEL_FIELDS = ("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult", "mlp_act",
                "leaky_relu_slope", "rope_dims", "rope_base", "qk_norm", "qk_gain_init", "unet_skips", "smear_gate",
                "logit_softcap", "tied_embed_init_std", "xsa_last_n", "ln_scale", "skip_gates", "recur_passes",
                "recur_start_layer", "recur_end_layer", "parallel_start_layer", "attn_gate_window", "attn_gate_scale", "resid_mix")

_DEMO_DATA = "./data/demo/datasets/demo_sp1024"
_DEMO_TOKENIZER = "./data/demo/tokenizers/demo_sp1024.model"

# The record stack's features (openai/parameter-golf #1855, val_bpb 1.0611, and the PRs named), one group per feature so
# `python -m lcq.bench features` can switch each off in turn (off = the field default). Layer indices are for 11 layers.
RECORD_FEATURES: dict[str, dict] = {
    "xsa": dict(xsa_last_n=11),  # #478; #1855 uses it on all 11 layers
    "ln_scale": dict(ln_scale=True),  # #315
    "qk_gain_5": dict(qk_gain_init=5.0),  # #1276
    "skip_gates": dict(skip_gates=True),  # #289
    # #1344: layers 3-5 looped from 35% of training; #1855 runs them 3 times (NUM_LOOPS=2 extra passes)
    "recurrence": dict(recur_passes=3, recur_start_layer=3, recur_end_layer=5, recur_from_progress=0.35),
    "parallel_lanes": dict(parallel_start_layer=8),  # #1530
    "sparse_attn_gate": dict(attn_gate_window=12, attn_gate_scale=0.5),  # #1787; scale 0.5 from #1855
    "polar_express": dict(muon_ns_coeffs="polar_express"),  # #1344 -> #1787
    "min_lr": dict(min_lr_frac=0.10),  # #1787
    # #1855 (its default); issue 19's CPU port of #1855 (4 layers, d=128, demo corpus, 300 steps, seed 1337): turning it
    # on took 2.3075 to 2.2794 bpb there
    "muon_row_normalize": dict(muon_row_normalize=True),
    "role_clips": dict(attn_clip_sigmas=13.0, mlp_clip_sigmas=11.5),  # #1855
    "int7_embed": dict(embed_bits=7, embed_clip_sigmas=14.0),  # int7 from #1586, 14 sigmas from #1855
    # #1855's per-group compressor (lcq/grouping.py): each role section is never larger than brotli of its plain layout;
    # on a trained demo model's GPTQ codes it took 1.9% off brotli alone (2.7% with lrzip), on random-init record-size
    # codes 0.01% (0.9% with lrzip) (BENCHMARKS.md)
    "group_compression": dict(compressor="group"),
    # #1855's own variants (openai/parameter-golf #1855; issue 19's CPU comparison: a port of #1855's script at 4 layers,
    # d=128, 300 demo steps scored 2.3075 bpb at seed 1337, 2.1859 with our SmearGate, 2.2788 without resid_mix, 2.2836
    # with our init: ours are better at demo scale, the last two within the port's seed spread, 2.3075 vs 2.2714).
    # #1855's are the ones validated at record scale (1.06108, 3 seeds), so the record preset runs them until a GPU run
    # says otherwise; each one's no_<name> bench arm is ours, one knob away
    "input_smear": dict(smear_gate="input"),
    "resid_mix": dict(resid_mix=True),
    "orthogonal_init": dict(init="orthogonal"),
}
# Left out of the record stack: progressive training context (TRAIN_SEQ_SCHEDULE, #2014). #2014's 1.05759 (3 seeds)
# against #1855's 1.06108 comes with eval and TTT at 3072 tokens (stride 1536), TTT changes, QK gain 5.25, AWQ-lite, an
# asymmetric logit rescale and an LR re-warm after each switch, and no run of the schedule alone; the schedule bought no
# steps (4,885 in 596 s against #1855's 4,931 in 600 s: the 1k start pays for the 3k finish). Off until an ablation on
# our stack supports it.

# Presets override field defaults. `record` is the 8xH100 submission configuration.
PRESETS: dict[str, dict] = {
    "record": dict(
        # CaseOps sp8192 with its val byte sidecar (#1729, the data of #1855): `download --variant caseops`
        vocab_size=8192, data_path="./data/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved",
        tokenizer_path="./data/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model",
        **{k: v for group in RECORD_FEATURES.values() for k, v in group.items()},
        # Sized for the cap: `python -m lcq.bench sizing --preset record` (brotli-11 on Gaussian codes at these bits
        # and clips: 0.422 B/param int6 attention, 0.441 int6 MLP, 0.536 int7 embedding) projects #1855's 4x MLP
        # (35.9 M params) to 16.15 MB, over the cap (#1855 fit only through its lrzip per-group compressor, ~280 KB;
        # ours with lrzip took 0.87% off brotli on such codes, not enough), and MLP hidden 1984 (3.875x, 35.2 M params)
        # to 15.86 MB with the code: under 16,000,000, above 15.5 MB, the rest for the LoRA below.
        mlp_mult=3.875,
        # #1855's optimizer and schedule (its README's hyperparameter table and its train_gpt.py defaults)
        matrix_lr=0.026, embed_lr=0.03, scalar_lr=0.02, muon_momentum=0.97, muon_momentum_warmup_start=0.92,
        muon_momentum_warmup_steps=1500, muon_weight_decay=0.095, embed_weight_decay=0.085, scalar_weight_decay=0.02,
        adam_beta2=0.99, warmdown_frac=0.85, ema_decay=0.9965,
        gptq_calib_batches=16,  # #1855: GPTQ_CALIBRATION_BATCHES=16
        # The model fills the cap to ~15.89 MB, so a fixed rank-8 LoRA (~0.69 MB on these shapes) would fail the gate.
        # Issue 16: the LoRA gets what the real compressed model section and the code leave (LCQ_BYTES=auto, ~117 KB
        # under the projection after the 20 KB headroom), spent a rank unit at a time where the closed form removes
        # the most Hessian-weighted error per byte, in LQER's 2+4-bit storage (#1855; a unit over an MLP matrix is
        # ~0.77 KB instead of int8's ~2.5 KB). It costs no model bytes: the ~117 KB is what the MLP's 64-wide steps leave
        # (3.875x = 1984 hidden; the next step, 4x, projects 16.15 MB). The equal-bytes bench (BENCHMARKS.md, issue 16;
        # demo, 2 seeds) says where a LoRA byte beats a model byte: the tied embedding's correction (lm_head, which
        # also corrects the token lookup) gained 0.0009-0.0014 bpb/KB against a wider MLP's 0.0003, a 32 KB LoRA only
        # 0.0001-0.00015. So the head is a target and the allocation reaches it first; the model is not narrowed to
        # give the LoRA more.
        lcq_rank="auto", lcq_bytes="auto", lcq_factor_bits=4, lcq_factor_asym=True,
        lcq_targets="blocks.*.attn.c_q,blocks.*.attn.c_k,blocks.*.attn.c_v,blocks.*.attn.proj,blocks.*.mlp.fc,"
                    "blocks.*.mlp.proj,lm_head",
        # #1855's score-first TTT (its train_seed42.log hyperparameters; batched as in #1855, lcq/ttt.py)
        ttt_enabled=True, ttt_rank=80, ttt_alpha=144.0, ttt_lr=1e-4, ttt_beta1=0.0, ttt_beta2=0.99, ttt_eps=1e-10,
        ttt_weight_decay=0.5, ttt_chunk_tokens=48, ttt_batch_docs=64,
        ttt_phases=3, ttt_phase_docs=2500, ttt_phase_lr=1e-3, ttt_phase_momentum=0.9, ttt_phase_clip=1.0,
        ttt_phase_cosine=True, ttt_phase_tokens=32_768,
        ttt_targets="blocks.*.attn.c_[qkv],blocks.*.attn,blocks.*.mlp,lm_head",  # #1855: q, k, v, o, MLP + lm_head
    ),
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
        ttt_chunk_tokens=64, ttt_rank=8, ttt_lr=1e-3,
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
        ttt_chunk_tokens=32, ttt_rank=4, ttt_lr=1e-3,
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
    gone = [k for k, v in env.items() if k.startswith("LQER_") and v]
    if gone:  # issue 16: README "LQER is LCQ's closed form" maps each knob
        raise ConfigError(f"{gone[0]}: LQER is now LCQ with no distillation; use LCQ_BYTES, LCQ_FACTOR_BITS=4, "
                          "LCQ_FACTOR_ASYM=1, LCQ_MAX_STEPS=0")
    gone = [k for k in ("LCQ_OBJECTIVE", "LCQ_TEACHER_TOPK", "LCQ_RANK_ALLOC") if env.get(k)]
    if gone:  # removed in issue 16's round (BENCHMARKS: the first two lost on the demo; LCQ_BYTES allocates by bytes)
        raise ConfigError(f"{gone[0]}: this knob is gone; unset it (LCQ_BYTES replaces LCQ_RANK_ALLOC=rho)")
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


def knob_docs() -> list[dict]:
    """Every knob in field order: group (its `# --- name ---` heading), name (the environment form), default, record
    (the record preset's value) and comment (the field's source comment: the lines above it, then the one after it)."""
    import inspect

    group, notes, out = "", [], []
    for line in inspect.getsource(Config).split("\n"):
        line = line.strip()
        m = re.match(r"(\w+): *\w+ *= *.*?(?:  # (.*))?$", line)
        if line.startswith("def "):
            break
        if line.startswith("# ---"):
            group, notes = line.strip("# -"), []
        elif line.startswith("#"):
            notes.append(line[1:].strip())
        elif m and m[1] in _FIELDS:
            default = _FIELDS[m[1]].default
            out.append(dict(group=group, name=m[1].upper(), default=default,
                            record=PRESETS["record"].get(m[1], default), comment=" ".join(notes + [m[2] or ""]).strip()))
            notes = []
        else:
            notes = []
    return out


def replace(cfg: Config, **changes) -> Config:
    return dataclasses.replace(cfg, **changes)


def make_config(preset: str = "tiny", **overrides) -> Config:
    """A config from a preset plus explicit overrides, ignoring the environment (for tests and benchmarks)."""
    values = dict(PRESETS[preset], preset=preset, **overrides)
    values.setdefault("run_id", f"{preset}_run")
    return Config(**values)
