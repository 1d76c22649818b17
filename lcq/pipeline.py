"""The pipeline's stages as functions over one Run record; train_gpt.py calls them top to bottom.

Training clock (MAX_WALLCLOCK_SECONDS): train + GPTQ + LCQ + serialize. The eval clock (EVAL_BUDGET_SECONDS) covers the
score of what ships. The artifact's model section compresses on host threads during LCQ (issue 8), so serialize is
charged only for the LoRA section and any wait. Accounting that produces nothing shipped (reading the section sizes,
hashing evidence) runs after the training clock stops.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import signal
import sys
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from . import artifact
from . import dist as D
from .clock import PostTrainProbe
from .clock import probe as clock_probe
from .clock import stop_budget
from . import grouping
from .checks import (StartupError, check_disk, check_output_folders, check_reserve, check_shards,
                     check_submission_json, claim, release, run_outputs, sweep_temp_files,
                     check_tokenizer_file, check_train_ids, check_val_ids, demo_layout)
from .config import Config, ConfigError
from .data import TrainLoader, file_sha256, load_val_bytes, load_val_tokens, sidecar_files, train_pattern
from .distill import DistillResult, lcq_diagnostic, lcq_stage, lcq_target_names
from .evaluate import EvalResult, dump_path, evaluate
from .files import atomic_write
from .from_repo import ensure_demo
from .gptq import QuantSpec, collect_hessians, dequantize_state, quant_error_report, quantize_state
from .guards import NonFiniteError, finite
from .model import GPT, autocast_for, build_model, configure_runtime, gptq_targets
from .ngram import Tilt, build_tilt
from .record import run_record, write_submission_json
from .runlog import RunLog
from .script import shipped_script
from .shipping import TIED, artifact_meta, check_artifact_fits, fit_to_cap, load_shipped, model_from_state
from .tokenizer import ByteTables, byte_tables, check_byte_source, load_tokenizer
from .train import TrainResult, train
from .ttt import adapter_names as ttt_adapter_names
from .ttt import evaluate_ttt, load_for_ttt
from .ttt import spec_from_config as ttt_spec
from .ttt import stage_name as ttt_stage_name
from .ttt import zero_targets as ttt_zero_targets

# Train shards are hashed over their first 4 MiB: enough to identify the file, cheap for 100M-token shards.
TRAIN_HASH_BYTES = 4 << 20
# Exit statuses (README, "Exit statuses"): 0 ok; 1 an unexpected error (traceback on stderr); 2 a config error or a
# failed start-up check (nothing trained); 3 over the byte cap; 4 the training clock or the eval budget exceeded;
# 5 a non-finite loss, weights or score; 128 + N killed by signal N (130 SIGINT, 143 SIGTERM).
ERROR_EXIT_CODE = 1
CONFIG_EXIT_CODE = 2
GATE_EXIT_CODE = 3
CLOCK_EXIT_CODE = 4
NONFINITE_EXIT_CODE = 5


class Interrupted(BaseException):
    """SIGTERM/SIGINT, raised in the main thread so that every `finally`/`except` on the way out runs (temp files are
    removed, the log says why it stopped). A BaseException like KeyboardInterrupt: `except Exception` never eats it."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


def install_signal_handlers() -> None:
    """SIGTERM (torchrun stopping its workers, a scheduler's kill) and SIGINT raise Interrupted. The entry point calls
    this; importing lcq installs nothing."""
    def handler(signum, frame):
        raise Interrupted(signum)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


def exit_status(exc: BaseException) -> int:
    if isinstance(exc, Interrupted):
        return 128 + exc.signum
    if isinstance(exc, KeyboardInterrupt):
        return 128 + signal.SIGINT
    if isinstance(exc, (StartupError, ConfigError, artifact.ArtifactError)):
        return getattr(exc, "status", CONFIG_EXIT_CODE)
    if isinstance(exc, NonFiniteError):
        return NONFINITE_EXIT_CODE
    return ERROR_EXIT_CODE


# Errors whose message names the file or knob and the fix: stderr gets the message, not a traceback.
NAMED_ERRORS = (StartupError, ConfigError, NonFiniteError, artifact.ArtifactError)


def failure_line(exc: BaseException) -> str:
    return "interrupted" if isinstance(exc, (Interrupted, KeyboardInterrupt)) else "error"


def failure_message(exc: BaseException) -> str:
    if isinstance(exc, (Interrupted, KeyboardInterrupt)):
        return f"{str(exc) or 'interrupted by SIGINT'}; temp files removed, nothing submitted"
    if isinstance(exc, NAMED_ERRORS):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def fail(run: Run | None, exc: BaseException, t_launch: float) -> int:
    """End a run on an error or a signal: the message on stderr (with the traceback for an unexpected error), and, if
    this run's log is open, one `error:` (or `interrupted:`) line in it and the JSON summary with status and error.
    Returns the exit status."""
    status = exit_status(exc)
    if failure_line(exc) == "interrupted" or isinstance(exc, NAMED_ERRORS):
        print(f"{failure_line(exc)}: {failure_message(exc)}", file=sys.stderr, flush=True)
    else:
        traceback.print_exception(exc, file=sys.stderr)
    if run is not None:
        release(run.claims)  # an empty artifact or script claim is not left to block the next run
        run.log.summary["wall_time_s"] = round(time.perf_counter() - t_launch, 3)
        run.log.fail(failure_message(exc), status, line=failure_line(exc))
    return status


@dataclass
class Run:
    cfg: Config
    dinfo: D.DistInfo
    log: RunLog
    bos_id: int
    tables: ByteTables
    val_tokens: np.ndarray
    val_bytes: np.ndarray | None = None  # bytes of val token i as a target, from the data's byte sidecar (CaseOps)
    model: GPT | None = None  # the float model; after training it holds the EMA weights (the LCQ teacher)
    train_result: TrainResult | None = None
    ledger: list[tuple[str, float, float | None]] = field(default_factory=list)  # (stage, seconds, budget)
    hessians: dict[str, torch.Tensor] = field(default_factory=dict)
    qtensors: dict[str, torch.Tensor] = field(default_factory=dict)
    qmeta: dict = field(default_factory=dict)
    gptq_state: dict[str, torch.Tensor] | None = None  # dequantized GPTQ weights before LCQ (for the `quantized` score)
    lora_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    lora_meta: dict | None = None
    distill_result: DistillResult | None = None
    size: artifact.SizeReport | None = None
    scores: dict[str, EvalResult] = field(default_factory=dict)
    calib_files: list[str] = field(default_factory=list)
    lcq_ranks: dict[str, int] = field(default_factory=dict)
    # rank 0: the quantized base model's artifact section, compressed on host threads from the end of GPTQ (issue 8)
    base_job: artifact.CompressJob | None = None
    script_job: Future | None = None  # rank 0: the single-file train_gpt.py (its bytes are the code bytes), built beside it
    claims: list[str] = field(default_factory=list)  # rank 0: outputs created empty at start-up (issue 17)
    serialize_budget: float | None = None  # seconds, projected by LCQ from the compression rate measured in this run
    tilt: Tilt | None = None  # NGRAM_TILT's hints, built at the first scored stage (lcq/ngram.py)
    post: PostTrainProbe | None = None  # what the stages after the training stop were timed to need (lcq/clock.py)

    @property
    def clock_used(self) -> float:
        return sum(s for _, s, _ in self.ledger)

    @property
    def clock_left(self) -> float:
        return self.cfg.max_wallclock_seconds - self.clock_used

    def charge(self, stage: str, seconds: float, budget: float | None = None, **fields) -> None:
        self.ledger.append((stage, seconds, budget))
        self.log.stage(stage, seconds, budget_left=self.clock_left, **fields)


def open_run(cfg: Config, dinfo: D.DistInfo) -> Run:
    """Build the demo data if asked and missing (rank 0 builds, others wait), open the log, run every start-up check
    (lcq.checks: files, shards, token ids, reserve split, disk, outputs) before anything trains, load tokenizer and
    val. A failure after the log is open is logged (an `error:` line, the JSON summary with status and error) and
    raised as StartupError; nothing a previous run wrote is touched."""
    # The build is a tool (lcq/tools/corpus.py), reached from the repo only (lcq/from_repo.py).
    if cfg.auto_build_demo and not (os.path.isdir(cfg.data_path) and os.path.exists(cfg.tokenizer_path)) and \
            demo_layout(cfg.data_path, cfg.tokenizer_path):
        if dinfo.is_master:
            t = time.perf_counter()
            ensure_demo(cfg.data_path, cfg.tokenizer_path)
            print(f"built demo dataset in {time.perf_counter() - t:.1f}s: {cfg.data_path}", flush=True)
        D.barrier()
    # Before the log opens (issue 17): every folder the run writes takes a file, and rank 0 claims the run's names with
    # exclusive create, so of two runs given one RUN_ID exactly one goes on and the other's files are never touched.
    claims, problem = [], None
    if dinfo.is_master:
        try:
            check_output_folders(cfg, log_dir=True)
            for knob, path in run_outputs(cfg, training=not cfg.eval_only)[:3]:
                claims.append(claim(knob, path))
        except StartupError as e:
            release(claims)
            problem = (CONFIG_EXIT_CODE, str(e))
    agree(problem)
    log = RunLog(cfg, dinfo)
    try:
        log.header()
        problem = None
        try:
            sp, bos_id, extra = startup_checks(cfg)
            val_tokens = load_val_tokens(cfg.data_path, cfg.val_max_tokens)
            check_val_split(cfg, val_tokens, bos_id)
            # A byte sidecar shipped with the data is the byte count (CaseOps pieces are not the scored text); else the table.
            val_bytes = load_val_bytes(cfg.data_path, val_tokens.size)
            check_byte_source(sp, val_bytes is not None, cfg.tokenizer_path, cfg.data_path)
            if dinfo.is_master:
                check_output_folders(cfg, log_dir=False)
                check_submission_json(cfg)
                if not cfg.eval_only:
                    claims.append(claim("ARTIFACT_PATH", cfg.artifact_file))
        except Exception as e:
            # input that fails to load here (a tokenizer that does not parse, an unpaired byte sidecar) is a start-up fault
            err = StartupError(str(e)) if isinstance(e, (OSError, ValueError)) and not isinstance(e, StartupError) else e
            problem = (exit_status(err), failure_message(err))
        agree(problem)
        if dinfo.is_master:
            removed, stale = sweep_temp_files(cfg)
            extra["temp_files_removed"], extra["temp_files_of_other_runs"] = " ".join(removed), " ".join(stale)
        for k, v in extra.items():
            if v:
                log(f"{k}: {v}")
        if val_bytes is not None:
            log("val bytes from sidecar " + " ".join(os.path.basename(f) for f in sidecar_files(cfg.data_path)))
        tables = byte_tables(sp, cfg.vocab_size).to(dinfo.device)
    except BaseException as e:
        release(claims)
        log.fail(failure_message(e), exit_status(e), line=failure_line(e))
        raise
    return Run(cfg=cfg, dinfo=dinfo, log=log, bos_id=bos_id, tables=tables, val_tokens=val_tokens, val_bytes=val_bytes,
               claims=claims)


def agree(problem: tuple[int, str] | None) -> None:
    """Every rank raises the lowest failing rank's (status, message): rank 0's log and JSON say what failed where, with
    its status, not the SIGTERM torchrun sends the survivors (issue 17)."""
    first = D.first_error(problem)
    if first:
        rank, (status, message) = first
        err = StartupError(f"rank {rank}: " * (rank > 0) + message)
        err.status = status
        raise err


def check_val_split(cfg: Config, val_tokens: np.ndarray, bos_id: int) -> None:
    """Refused (issue 17): a val split with no target (an empty split failed after the paid run), or without a BOS
    (it was scored as one document)."""
    if val_tokens.size < 2 or not (val_tokens == bos_id).any():
        raise StartupError(f"DATA_PATH={cfg.data_path}: {val_tokens.size} val token(s), " + ("none scored" if
                           val_tokens.size < 2 else f"no BOS id {bos_id}: one document") + ". Fix: rebuild the val shards")


def startup_checks(cfg: Config):
    """Every check that can fail before training, cheapest first; each failure is a StartupError naming the file or
    knob and the fix. Returns (tokenizer, bos_id, header lines)."""
    t0 = time.perf_counter()
    if cfg.eval_only and not os.path.isfile(cfg.artifact_file):
        raise StartupError(f"--artifact {cfg.artifact_file}: no such file. Fix: pass a run's .lcq")
    if cfg.eval_only and cfg.ttt_enabled and cfg.ttt_init == "artifact":
        # before the first scored stage (issue 17: found after the sliding eval); section names only
        with open(cfg.artifact_file, "rb") as f:
            if "lora" not in artifact.sections_of(f.read(), cfg.artifact_file):
                raise StartupError(f"TTT_INIT=artifact: {cfg.artifact_file} ships no LoRA. Fix: TTT_INIT=zero or auto")
    check_tokenizer_file(cfg)
    try:
        sp = load_tokenizer(cfg.tokenizer_path)
    except ValueError as e:
        raise StartupError(str(e)) from None
    if sp.vocab_size() != cfg.vocab_size:
        raise StartupError(f"VOCAB_SIZE={cfg.vocab_size} but the tokenizer {cfg.tokenizer_path} has {sp.vocab_size()} "
                           "tokens; set VOCAB_SIZE to match")
    bos_id = sp.bos_id()
    if bos_id < 0:
        raise StartupError(f"{cfg.tokenizer_path}: no BOS piece, which delimits documents. Fix: set TOKENIZER_PATH")
    train_files, val_files = check_shards(cfg, with_train=not cfg.eval_only)
    check_val_ids(val_files, cfg.vocab_size)
    sampled = check_train_ids(train_files, cfg.vocab_size)
    post = None if cfg.eval_only else check_reserve(cfg)
    free = check_disk(cfg, 0 if cfg.eval_only else cfg.artifact_cap_bytes)
    extra = {"tokenizer": f"{cfg.tokenizer_path} sha256={file_sha256(cfg.tokenizer_path)[:16]} bos_id={bos_id}",
             "data_val_files": " ".join(f"{os.path.basename(f)}:sha256={file_sha256(f)[:16]}" for f in val_files)}
    if not cfg.eval_only:
        extra["data_train_shards"] = f"{len(train_files)} files matching {train_pattern(cfg.data_path)}"
    extra["startup_checks"] = (
        f"ok in {time.perf_counter() - t0:.2f}s: {len(train_files)} train + {len(val_files)} val shard headers and "
        f"sizes, val ids < {cfg.vocab_size}, {sampled} sampled train ids < {cfg.vocab_size}"
        + ("" if post is None else f", GPTQ/LCQ reserve {post:.1f}s >= GPTQ_MIN_SECONDS {cfg.gptq_min_seconds:g}")
        + ", free disk " + " ".join(f"{d}:{b / 1e9:.1f}GB" for d, b in free.items()))
    return sp, bos_id, extra


def build(run: Run) -> GPT:
    cfg = run.cfg
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, run.bos_id, run.dinfo.device)
    configure_runtime(model, cfg, run.dinfo.device)
    n_params = sum(p.numel() for p in model.parameters())
    run.log(f"model_params:{n_params} attention_backend:{model.attn_backend} layers:{cfg.num_layers} dim:{cfg.model_dim} "
            f"heads:{cfg.num_heads}/{cfg.num_kv_heads}")
    run.log.summary.update(model_params=n_params, attention_backend=model.attn_backend)
    run.model = model
    check_before_step_1(run)
    return model


def check_before_step_1(run: Run) -> None:
    """Issue 28: what needs the built model is found here, not after training: LCQ_TARGETS and TTT_TARGETS resolved
    against it (with LCQ_MERGE), and the ids of the calibration batches (each rank's first train tokens) < VOCAB_SIZE."""
    cfg, problem = run.cfg, None
    try:
        if cfg.lcq_enabled:
            lcq_target_names(run.model, cfg)
        if cfg.ttt_enabled:
            ttt_adapter_names(run.model, cfg)
        calibration_runner(run, max(cfg.gptq_calib_tokens_per_rank(run.dinfo.world_size),
                                    cfg.lcq_grail_tokens * (cfg.lcq_enabled and cfg.lcq_init == "grail")))()
    except ValueError as e:
        problem = (CONFIG_EXIT_CODE, f"{e} (found before training)")
    agree(problem)  # a bad id on one rank's batches stops every rank


def stage_dump(cfg: Config, stage: str | None) -> str | None:
    """EVAL_DUMP's file for a scored stage (None: no dump, or an unnamed score such as training-time monitoring)."""
    return dump_path(cfg.eval_dump, stage) if cfg.eval_dump and stage else None


def stage_tilt(run: Run) -> Tilt | None:
    """NGRAM_TILT's hints, built once per run; every scored stage is charged their seconds, as if it ran alone."""
    cfg = run.cfg
    if cfg.ngram_tilt and run.tilt is None:
        run.tilt = build_tilt(run.val_tokens, cfg.ngram_order, cfg.ngram_threshold, cfg.ngram_boost, run.dinfo)
        run.log(run.tilt.describe(cfg.ngram_order, cfg.ngram_threshold, run.dinfo.world_size))
    return run.tilt


def score(run: Run, model: nn.Module, stride: int | None = None, stage: str | None = None) -> EvalResult:
    """A sliding eval; a named stage is tilted when NGRAM_TILT is on (monitoring and benches score untilted)."""
    cfg = run.cfg
    tilt = stage_tilt(run) if stage else None
    res = evaluate(model, run.val_tokens, run.bos_id, run.tables, cfg.window, stride or cfg.eval_stride,
                   cfg.eval_batch_tokens, run.dinfo, val_bytes=run.val_bytes, dump=stage_dump(cfg, stage), tilt=tilt)
    return dataclasses.replace(res, seconds=res.seconds + tilt.seconds) if tilt else res


def score_ttt(run: Run, path: str) -> EvalResult:
    """The TTT stage on the artifact at `path` (lcq/ttt.py holds the policy): a fresh model decoded from the file, its
    adapter started from the shipped LoRA or zero, scored score-first. Everything from the decode on is on its clock."""
    cfg = run.cfg
    t0 = time.perf_counter()
    model, meta, init = load_for_ttt(path, cfg, run.dinfo.device)
    stage = ttt_stage_name(bool(meta.get("lora")))
    spec = ttt_spec(cfg)
    run.log(f"ttt: stage {stage} init {init} rank {cfg.ttt_rank} targets {','.join(ttt_zero_targets(cfg))} {spec}")
    decode_s = time.perf_counter() - t0
    tilt = stage_tilt(run)
    res = evaluate_ttt(model, run.val_tokens, run.bos_id, run.tables, cfg.window, cfg.ttt_chunk_tokens,
                       cfg.eval_batch_tokens, run.dinfo, spec, val_bytes=run.val_bytes,
                       dump=stage_dump(cfg, stage), log=run.log, tilt=tilt)
    # the compile warm-up is not charged (README); the hints are
    res = dataclasses.replace(res, seconds=decode_s + res.seconds + (tilt.seconds if tilt else 0.0))
    record_score(run, stage, res, f"decoded {path}, score-first TTT from {init}")
    return res


def run_training(run: Run) -> TrainResult:
    cfg = run.cfg

    def monitor(step: int) -> str:
        # Monitoring only: non-overlapping windows (stride = window) to keep it cheap; not charged to training.
        r = score(run, run.model, stride=cfg.window)
        return f"step:{step}/{cfg.iterations} val_loss:{r.val_loss:.4f} val_bpb:{r.val_bpb:.4f}"

    post = cfg.train_reserve_seconds - cfg.serialize_reserve_seconds - cfg.lcq_safety_seconds
    run.log(f"budget_split: MAX_WALLCLOCK_SECONDS {cfg.max_wallclock_seconds:.1f}s = train {cfg.train_budget_seconds:.1f}s "
            f"+ GPTQ/LCQ {post:.1f}s (LCQ gets what GPTQ leaves) + serialize {cfg.serialize_reserve_seconds:.1f}s "
            f"+ safety {cfg.lcq_safety_seconds:.1f}s")
    if post <= 0:
        run.log("warning: TRAIN_RESERVE_SECONDS leaves no time for GPTQ/LCQ after SERIALIZE_RESERVE_SECONDS and "
                "LCQ_SAFETY_SECONDS")
    run.post = probe_post_train(run)
    spent = run.clock_used
    budget = stop_budget(cfg, spent, run.post)
    if budget(1.0) < cfg.train_budget_seconds - spent:
        run.log(f"train_stop: at {budget(1.0):.2f}s, before TRAIN_RESERVE_SECONDS's: the later stages need more")
    res = train(run.model, cfg, run.dinfo, run.log, run.bos_id, eval_fn=monitor, budget_fn=budget)
    run.log(run.post.line(res.slowdown))
    run.train_result = res
    run.charge("train", res.train_time_s, cfg.train_budget_seconds, steps=res.steps, stopped_by=res.stopped_by,
               step_avg_ms=f"{res.step_avg_ms:.2f}", train_budget=f"{cfg.train_budget_seconds:.1f}s")
    return res


def probe_post_train(run: Run) -> PostTrainProbe:
    """Time what the stages after the training stop do, on the real model before step 1 (lcq/clock.py); charged."""
    cfg, dinfo = run.cfg, run.dinfo
    start_script_job(run)
    batch = calib_batch_tokens(cfg, dinfo.world_size, cfg.gptq_calib_tokens_per_rank(dinfo.world_size))
    runner = calibration_runner(run, batch)
    names = lcq_target_names(run.model, cfg) if cfg.lcq_enabled else []
    post = clock_probe(run.model, cfg, dinfo.world_size, lambda: runner(run.model), batch, quant_spec(cfg), TIED, names)
    run.charge("probe", post.seconds)
    run.log(post.line())
    return post


def calib_batch_tokens(cfg: Config, world_size: int, total_tokens: int) -> int:
    return min(total_tokens, max(cfg.train_seq_len, cfg.train_batch_tokens // (world_size * cfg.grad_accum_steps)))


def calibration_runner(run: Run, total_tokens: int):
    """A function that runs given models over `total_tokens` fresh train tokens per rank (never val), batch by batch."""
    cfg, dinfo = run.cfg, run.dinfo
    batch = calib_batch_tokens(cfg, dinfo.world_size, total_tokens)

    @torch.no_grad()
    def run_models(*models: nn.Module) -> None:
        loader = TrainLoader(train_pattern(cfg.data_path), dinfo.rank, dinfo.world_size, dinfo.device,
                             vocab_size=cfg.vocab_size)
        done = 0
        while done < total_tokens:
            x, _, cu = loader.next_batch(min(batch, total_tokens - done), cfg.train_seq_len, run.bos_id)
            with autocast_for(dinfo.device, cfg.autocast_cpu_bf16):
                for m in models:
                    m(x, cu, cfg.train_seq_len)
            done += x.numel()
        run.calib_files += [f for f in loader.files_read if f not in run.calib_files]

    return run_models


def quant_spec(cfg: Config) -> QuantSpec:
    return QuantSpec(method=cfg.quant_method, matrix_bits=cfg.matrix_bits, embed_bits=cfg.embed_bits,
                     matrix_clip_sigmas=cfg.matrix_clip_sigmas, embed_clip_sigmas=cfg.embed_clip_sigmas,
                     damp=cfg.gptq_damp, block_size=cfg.gptq_block_size, act_order=cfg.gptq_act_order,
                     attn_clip_sigmas=cfg.attn_clip_sigmas if cfg.attn_clip_sigmas >= 0 else None,
                     mlp_clip_sigmas=cfg.mlp_clip_sigmas if cfg.mlp_clip_sigmas >= 0 else None)


def quantize(run: Run) -> None:
    """Hessians from train batches (averaged over ranks), then GPTQ (or RTN) on every matrix and the embedding, GPTQ's
    solves split over the ranks."""
    cfg, model = run.cfg, run.model
    D.sync(run.dinfo.device)
    t0 = time.perf_counter()
    model.eval()
    calib_tokens = cfg.gptq_calib_tokens_per_rank(run.dinfo.world_size)
    runner = calibration_runner(run, calib_tokens)
    run.hessians = collect_hessians(model, gptq_targets(model), lambda: runner(model))
    state = {k: v.detach() for k, v in model.state_dict().items()}
    run.qtensors, run.qmeta = quantize_state(state, run.hessians, quant_spec(cfg), TIED, run.dinfo.world_size, run.log)
    run.gptq_state = dequantize_state(run.qtensors, run.qmeta)
    D.sync(run.dinfo.device)
    seconds = time.perf_counter() - t0
    share = cfg.train_reserve_seconds - cfg.serialize_reserve_seconds - cfg.lcq_safety_seconds
    over = seconds > share
    run.charge("gptq", seconds, share, method=cfg.quant_method, bits=f"{cfg.matrix_bits}/{cfg.embed_bits}",
               calib_tokens_per_rank=calib_tokens, over_share="YES" if over else "no")
    if over:
        run.log(f"warning: GPTQ took {seconds:.1f}s, more than its share {share:.1f}s of TRAIN_RESERVE_SECONDS; "
                "raise TRAIN_RESERVE_SECONDS or lower GPTQ_CALIB_TOKENS")
    worst = quant_error_report(state, run.gptq_state, run.hessians)[:3]
    run.log("gptq_worst_rel_err: " + " ".join(f"{n}:{e:.3e}" for n, e in worst))


def start_base_section(run: Run) -> None:
    """Rank 0: start compressing the quantized model's artifact section on host threads (issue 8), so that it runs
    while LCQ distils on the device. Only rank 0 writes the artifact; other ranks compressing too would slow it."""
    if run.base_job is not None:
        run.base_job.cancel()
    run.base_job = None
    if run.dinfo.is_master:
        start_script_job(run)
        tensors = {k: v.detach().cpu() for k, v in run.qtensors.items()}
        if run.cfg.compressor == "group":
            run.log(grouping.describe_backends())
        # COMPRESSOR=group: the model's sections per role bucket (lcq/grouping.py), planned on the job's own thread
        threads = artifact.serialize_threads(run.cfg.serialize_threads)
        run.log(f"serialize_threads:{threads} host_cores:{os.cpu_count()} "
                f"local_ranks:{os.environ.get('LOCAL_WORLD_SIZE', '1')}")
        # due when the split's LCQ window ends, else lrzip gives way to brotli (issue 17: 95 s on 2 cores)
        run.base_job = grouping.model_job(tensors, artifact_meta(run.cfg, run.bos_id, run.qmeta, None),
                                          run.cfg.compressor, threads, run.clock_left - run.cfg.lcq_safety_seconds
                                          - run.cfg.serialize_reserve_seconds)


def start_script_job(run: Run) -> None:
    """Rank 0: build the shipped script on a host thread, once (packing the sources takes seconds on a loaded box:
    issue 28 starts it before training, where it overlaps the steps instead of the serialize stage)."""
    if run.dinfo.is_master and run.script_job is None:
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lcq-bundle")
        run.script_job = pool.submit(shipped_script)
        pool.shutdown(wait=False)


def lcq(run: Run) -> None:
    """Right after GPTQ: start compressing the base model's artifact section on host threads (issue 8), fit it to the
    cap (lcq.shipping.fit_to_cap, issue 25), then the LCQ stage (lcq.distill.lcq_stage holds its policy), given the
    calibration batches and the GPTQ spec it may need."""
    start_base_section(run)
    fit_to_cap(run)
    lcq_stage(run, calibration_runner(run, run.cfg.lcq_grail_tokens), quant_spec(run.cfg))


def ship(run: Run) -> bool:
    """Write the artifact (rank 0; atomically), count code + model + LoRA bytes and apply the gate. False = over the cap.

    The artifact is the base model's section (compressed on host threads since GPTQ, or now if nothing started it)
    followed by the LoRA's own section, compressed here. The LoRA's bytes are its section's bytes, exactly."""
    cfg, dinfo, log = run.cfg, run.dinfo, run.log
    D.sync(dinfo.device)
    t0 = time.perf_counter()
    path = cfg.artifact_file
    facts = {}

    def write() -> bytes:  # rank 0; its failure ends every rank (D.on_master)
        threads = artifact.serialize_threads(cfg.serialize_threads)
        lora_job = None
        if run.lora_tensors:  # starts first: it compresses while the base section's last chunks finish
            lora_job = artifact.SectionJob("lora", {k: v.detach().cpu() for k, v in run.lora_tensors.items()},
                                           run.lora_meta, grouping.section_compressor(cfg.compressor), threads)
        if run.base_job is None:
            start_base_section(run)
        t_wait = time.perf_counter()
        sections = list(run.base_job.sections())
        facts["base_wait"] = f"{time.perf_counter() - t_wait:.2f}s"
        if lora_job is not None:
            sections.append(lora_job.result())
            facts["lora_compress"] = f"{sections[-1].seconds:.2f}s"
        facts["compressors"] = ",".join(f"{sec.name}:{sec.compressor}" + (f"/{sec.variant}" if sec.variant else "")
                                        for sec in sections)
        if run.base_job.choice:
            log(f"compressor_choice: {run.base_job.choice}")
        artifact.write(path, artifact.assemble(sections))
        script = run.script_job.result()
        atomic_write(os.path.join(cfg.log_dir, f"{cfg.run_id}.train_gpt.py"), script)
        run.base_job = None
        return script
    script = D.on_master(write, "writing the artifact")
    budget = cfg.serialize_reserve_seconds if run.serialize_budget is None else run.serialize_budget
    run.charge("serialize", time.perf_counter() - t0, budget, compressor=cfg.compressor, **facts, path=path)
    # The training clock stops here; the rest is accounting.
    if not dinfo.is_master:
        script = shipped_script()  # only rank 0 writes it; every rank logs the same count
    file_bytes = os.path.getsize(path)
    lora_bytes = 0
    if dinfo.is_master:
        with open(path, "rb") as f:
            sections = artifact.sections_of(f.read(), path)
        lora_bytes = sections["lora"].nbytes if "lora" in sections else 0
    lora_bytes = int(D.all_reduce_sum(torch.tensor(lora_bytes, dtype=torch.int64, device=dinfo.device)).item())
    log(f"code: {len(script)} bytes sha256={hashlib.sha256(script).hexdigest()} "
        f"(the single-file train_gpt.py that ships, written to {cfg.log_dir}/{cfg.run_id}.train_gpt.py)")
    run.size = artifact.SizeReport(code_bytes=len(script), model_bytes=file_bytes - lora_bytes, lora_bytes=lora_bytes,
                                   cap=cfg.artifact_cap_bytes)
    log(run.size.line())
    log.summary["bytes"] = dict(code=run.size.code_bytes, model=run.size.model_bytes, lora=run.size.lora_bytes,
                                total=run.size.total, cap=run.size.cap, artifact=path)
    log_ledger(run)
    if not run.size.ok:
        hint = ("lower LCQ_RANK or LCQ_BYTES (or set either to auto), LCQ_FACTOR_BITS or LCQ_TARGETS" if lora_bytes else "") + \
               ("; " if lora_bytes else "") + "lower MATRIX_BITS/EMBED_BITS or the model size (NUM_LAYERS, MODEL_DIM, MLP_MULT)"
        try:
            artifact.check_gate(run.size, hint)
        except artifact.GateError as e:
            log(f"GATE FAILED: {e}")
            log(f"the artifact and this log are kept: {path}, {log.path}")
        return False
    log(f"gate: ok, {run.size.margin} bytes under the cap")
    return True


def log_ledger(run: Run) -> None:
    cfg = run.cfg
    run.log("training clock (MAX_WALLCLOCK_SECONDS={:.0f}):".format(cfg.max_wallclock_seconds))
    run.log(f"  {'stage':<10} {'seconds':>9} {'budget':>9} {'margin':>9}")
    for stage, s, b in run.ledger:
        budget, margin = ("-", "-") if b is None else (f"{b:.2f}", f"{b - s:.2f}")
        run.log(f"  {stage:<10} {s:9.2f} {budget:>9} {margin:>9}")
    total = run.clock_used
    run.log(f"  {'total':<10} {total:9.2f} {cfg.max_wallclock_seconds:9.2f} {cfg.max_wallclock_seconds - total:9.2f}")
    run.log.summary["ledger"] = {stage: dict(seconds=round(s, 3), budget=None if b is None else round(b, 3))
                                 for stage, s, b in run.ledger}
    run.log.summary["train_clock_s"] = round(total, 3)


def record_score(run: Run, stage: str, result: EvalResult, source: str) -> None:
    run.log.score(stage, result)
    within = result.seconds <= run.cfg.eval_budget_seconds
    run.log.stage(f"eval_{stage}", result.seconds, budget_left=run.cfg.eval_budget_seconds - result.seconds,
                  within_eval_budget="yes" if within else "NO", source=source)
    run.scores[stage] = result


def evaluate_shipped(run: Run) -> None:
    """pre_quant (the float model), quantized (GPTQ weights without LoRA) and quantized_lcq (the artifact as shipped),
    the last two decoded from the artifact file into fresh models."""
    cfg = run.cfg
    rho = lcq_diagnostic(run)
    record_score(run, "pre_quant", score(run, run.model, stage="pre_quant"), "float EMA model in memory")
    run.model = None  # nothing from training is used for the shipped scores
    path = cfg.artifact_file
    if run.lora_meta and run.lora_meta["merge"] == "baked":
        q = model_from_state(cfg, run.bos_id, run.gptq_state, run.dinfo.device)
        record_score(run, "quantized", score(run, q, stage="quantized"),
                     "GPTQ weights before LCQ, in memory (the baked artifact differs)")
    else:
        q, _, _ = load_shipped(path, cfg, run.dinfo.device, with_lora=False)
        record_score(run, "quantized", score(run, q, stage="quantized"), f"decoded {path} without LoRA")
    del q
    if run.lora_meta:
        shipped, _, _ = load_shipped(path, cfg, run.dinfo.device)
        record_score(run, "quantized_lcq", score(run, shipped, stage="quantized_lcq"),
                     f"decoded {path} as shipped ({run.lora_meta['merge']})")
        pre, qu, lc = (run.scores[s].val_bpb for s in ("pre_quant", "quantized", "quantized_lcq"))
        gap = qu - pre
        # A fraction of a gap <= 0 means nothing (issue 8: "recovered 0.5279 of the quantization gap -0.000478").
        recovered = (qu - lc) / gap if gap > 0 else None
        res = run.distill_result
        recovered_text = (f"recovered {recovered:.4f} of the quantization gap {gap:.6f} bpb" if recovered is not None
                          else f"recovered n/a (no quantization gap: {gap:.6f} bpb)")
        run.log(f"lcq_summary: rank {cfg.lcq_rank} init {cfg.lcq_init} merge {cfg.lcq_merge} steps {res.steps} "
                f"time {res.seconds:.2f}s final_kl {res.kl_end:.6f} lora_bytes {run.size.lora_bytes} {recovered_text}")
        run.log.summary["lcq"] = dict(rank=cfg.lcq_rank, ranks=run.lora_meta["ranks"], init=cfg.lcq_init,
                                      merge=cfg.lcq_merge, steps=res.steps, seconds=round(res.seconds, 3),
                                      kl_start=res.kl_start, kl_end=res.kl_end, lora_bytes=run.size.lora_bytes,
                                      rho=rho, recovered_fraction=recovered)
    if cfg.ttt_enabled:
        score_ttt(run, path)


def eval_only(run: Run, t_launch: float) -> int:
    """Score an artifact from the files alone (a run opened with --eval_only): nothing from a training process can
    reach this score. The artifact must have been trained with this tokenizer (sha256, vocab, BOS); the network is the
    artifact's own shape, and model knobs of the config that say otherwise are logged as ignored."""
    cfg, dinfo = run.cfg, run.dinfo
    model, meta, _ = load_shipped(cfg.artifact_file, cfg, dinfo.device)
    ignored = check_artifact_fits(cfg.artifact_file, meta, cfg, run.bos_id)
    if ignored:
        run.log(f"eval_only: the network is the artifact's own shape; {len(ignored)} model knob(s) of the config are "
                "IGNORED (config -> artifact): " + " ".join(f"{k.upper()}={c!r}->{a!r}" for k, (c, a) in ignored.items()))
        run.log.summary["config"].update({k: a for k, (_, a) in ignored.items()})
        run.log.summary["config_ignored"] = {k: c for k, (c, _) in ignored.items()}
    stage = "quantized_lcq" if meta.get("lora") else "quantized"
    record_score(run, stage, score(run, model, stage=stage), f"decoded {cfg.artifact_file} as shipped")
    del model
    if cfg.ttt_enabled:
        score_ttt(run, cfg.artifact_file)
    return finish(run, t_launch)


def finish(run: Run, t_launch: float, status: int = 0) -> int:
    cfg, log, res = run.cfg, run.log, run.train_result
    if res is not None:
        read = res.files_read
        log(f"data_train_read: {len(read)} files " +
            " ".join(f"{os.path.basename(f)}:sha256[:4MiB]={file_sha256(f, TRAIN_HASH_BYTES)[:16]}" for f in read))
        log(f"data_calibration_read: {len(run.calib_files)} train files (GPTQ/LCQ read no val shard)")
        log.summary["train"] = dict(steps=res.steps, train_time_s=round(res.train_time_s, 3),
                                    step_avg_ms=round(res.step_avg_ms, 3), tokens_per_step=res.tokens_per_step,
                                    stopped_by=res.stopped_by, train_files_read=len(read))
    log.summary["wall_time_s"] = round(time.perf_counter() - t_launch, 3)
    problems = []  # (status, message): a non-finite score, a clock overrun
    if run.scores:
        final_stage = list(run.scores)[-1]
        final = run.scores[final_stage]
        log.summary["final"] = dict(stage=final_stage, val_loss=final.val_loss, val_bpb=final.val_bpb,
                                    eval_time_s=round(final.seconds, 3))
        log(f"final {final_stage} val_loss:{final.val_loss:.4f} val_bpb:{final.val_bpb:.4f} "
            f"train_clock:{run.clock_used:.1f}s eval_time:{final.seconds:.1f}s")
        log(f"final_exact val_loss:{final.val_loss:.8f} val_bpb:{final.val_bpb:.8f}")
        problems += [(NONFINITE_EXIT_CODE, f"SCORE NOT FINITE: {stage} val_loss {r.val_loss} val_bpb {r.val_bpb}; never "
                      "submitted. Fix: check the training loss and MATRIX_LR/EMBED_LR/SCALAR_LR")
                     for stage, r in run.scores.items() if not (finite(r.val_loss) and finite(r.val_bpb))]
    problems += [(CLOCK_EXIT_CODE, m) for m in clock_overruns(run)]
    if run.size is not None:
        log(run.size.line())
    for _, message in problems:
        log(message)
    if status == 0 and problems:
        status = problems[0][0]
        log.summary["error"] = problems[0][1]
    log.summary["status"] = status
    log(f"exit_status: {status}")
    log.write_summary()
    if cfg.submission_json and run.dinfo.is_master and not cfg.eval_only:
        # A failed run (gate, clock, non-finite score) never replaces the root submission.json: it may hold a good
        # earlier result (issue 10).
        if status == 0:
            record = run_record(log.summary)
            write_submission_json(cfg.submission_json, record)
            log(f"wrote {cfg.submission_json} (track {record['track']})")
        else:
            log(f"{cfg.submission_json} not written: this run ends with exit status {status}")
    log.close()
    return status


def clock_overruns(run: Run) -> list[str]:
    """CLOCK EXCEEDED lines: the training clock past MAX_WALLCLOCK_SECONDS (with the stage during which it ran out),
    the scored eval past EVAL_BUDGET_SECONDS."""
    cfg, out = run.cfg, []
    used = run.clock_used
    if used > cfg.max_wallclock_seconds:
        t, stage = 0.0, run.ledger[-1][0]
        for name, seconds, _ in run.ledger:
            t += seconds
            if t > cfg.max_wallclock_seconds:
                stage = name
                break
        out.append(f"CLOCK EXCEEDED: training clock {used:.2f}s > MAX_WALLCLOCK_SECONDS={cfg.max_wallclock_seconds:g}, "
                   f"out during stage {stage}. Fix: raise TRAIN_RESERVE_SECONDS or shorten that stage")
    if run.scores:
        stage, final = list(run.scores.items())[-1]
        if final.seconds > cfg.eval_budget_seconds:
            out.append(f"CLOCK EXCEEDED: eval of {stage} took {final.seconds:.2f}s > "
                       f"EVAL_BUDGET_SECONDS={cfg.eval_budget_seconds:g}. Fix: raise EVAL_STRIDE or EVAL_BATCH_TOKENS")
    return out
