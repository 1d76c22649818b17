"""The pipeline's stages as functions over one Run record; train_gpt.py calls them top to bottom.

Training clock (MAX_WALLCLOCK_SECONDS): train + GPTQ + LCQ + serialize. The eval clock (EVAL_BUDGET_SECONDS) covers the
score of what ships. Accounting that produces nothing shipped (the LoRA byte attribution, hashing evidence) runs after
the training clock stops.
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from . import artifact
from . import dist as D
from .attention import resolve_backend
from .bundle import shipped_script
from .config import Config
from .data import TrainLoader, file_sha256, list_shards, load_val_tokens, train_pattern, val_pattern
from .distill import DistillResult, distill, energy_report, init_factors
from .evaluate import EvalResult, evaluate
from .gptq import QuantSpec, collect_hessians, dequantize_state, quant_error_report, quantize_state
from .lora import DEFAULT_TARGETS, allocate_ranks, attach_lora, match_targets, merge_lora
from .model import GPT, build_model, gptq_targets
from .record import run_record, write_submission_json
from .runlog import RunLog, atomic_write
from .shipping import TIED, artifact_meta, group_of, load_shipped, model_from_state, pack_lora
from .tokenizer import ByteTables, byte_tables, load_tokenizer
from .train import TrainResult, autocast_for, train

# Train shards are hashed over their first 4 MiB: enough to identify the file, cheap for 100M-token shards.
TRAIN_HASH_BYTES = 4 << 20
GATE_EXIT_CODE = 3


@dataclass
class Run:
    cfg: Config
    dinfo: D.DistInfo
    log: RunLog
    bos_id: int
    tables: ByteTables
    val_tokens: np.ndarray
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
    """Build the demo data if asked and missing (rank 0 builds, others wait), open the log, load tokenizer and val."""
    if cfg.auto_build_demo and not (os.path.isdir(cfg.data_path) and os.path.exists(cfg.tokenizer_path)):
        if dinfo.is_master:
            from .corpus import ensure_demo
            t = time.perf_counter()
            ensure_demo(cfg.data_path, cfg.tokenizer_path)
            print(f"built demo dataset in {time.perf_counter() - t:.1f}s: {cfg.data_path}", flush=True)
        D.barrier()
    sp = load_tokenizer(cfg.tokenizer_path)
    if sp.vocab_size() != cfg.vocab_size:
        raise ValueError(f"VOCAB_SIZE={cfg.vocab_size} but the tokenizer {cfg.tokenizer_path} has {sp.vocab_size()} "
                         "tokens; set VOCAB_SIZE to match the tokenizer")
    bos_id = sp.bos_id()
    if bos_id < 0:
        raise ValueError(f"{cfg.tokenizer_path}: tokenizer has no BOS token; documents are delimited by BOS")
    val_files = list_shards(val_pattern(cfg.data_path), "val")
    extra = {"tokenizer": f"{cfg.tokenizer_path} sha256={file_sha256(cfg.tokenizer_path)[:16]} bos_id={bos_id}",
             "data_val_files": " ".join(f"{os.path.basename(f)}:sha256={file_sha256(f)[:16]}" for f in val_files)}
    if not cfg.eval_only:
        train_files = list_shards(train_pattern(cfg.data_path), "train")
        extra["data_train_shards"] = f"{len(train_files)} files matching {train_pattern(cfg.data_path)}"
    log = RunLog(cfg, dinfo)
    log.header(extra)
    val_tokens = load_val_tokens(cfg.data_path, cfg.val_max_tokens)
    tables = byte_tables(sp, cfg.vocab_size).to(dinfo.device)
    return Run(cfg=cfg, dinfo=dinfo, log=log, bos_id=bos_id, tables=tables, val_tokens=val_tokens)


def build(run: Run) -> GPT:
    cfg = run.cfg
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, run.bos_id, run.dinfo.device)
    model.attn_backend = resolve_backend(cfg.attention_backend, run.dinfo.device)
    n_params = sum(p.numel() for p in model.parameters())
    run.log(f"model_params:{n_params} attention_backend:{model.attn_backend} layers:{cfg.num_layers} dim:{cfg.model_dim} "
            f"heads:{cfg.num_heads}/{cfg.num_kv_heads}")
    run.log.summary.update(model_params=n_params, attention_backend=model.attn_backend)
    run.model = model
    return model


def score(run: Run, model: nn.Module, stride: int | None = None) -> EvalResult:
    cfg = run.cfg
    return evaluate(model, run.val_tokens, run.bos_id, run.tables, cfg.window, stride or cfg.eval_stride,
                    cfg.eval_batch_tokens, run.dinfo)


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
    res = train(run.model, cfg, run.dinfo, run.log, run.bos_id, eval_fn=monitor)
    run.train_result = res
    run.charge("train", res.train_time_s, cfg.train_budget_seconds, steps=res.steps, stopped_by=res.stopped_by,
               step_avg_ms=f"{res.step_avg_ms:.2f}", train_budget=f"{cfg.train_budget_seconds:.1f}s")
    return res


def calibration_runner(run: Run, total_tokens: int):
    """A function that runs given models over `total_tokens` fresh train tokens per rank (never val), batch by batch."""
    cfg, dinfo = run.cfg, run.dinfo
    batch = min(total_tokens, max(cfg.train_seq_len, cfg.train_batch_tokens // (dinfo.world_size * cfg.grad_accum_steps)))

    @torch.no_grad()
    def run_models(*models: nn.Module) -> None:
        loader = TrainLoader(train_pattern(cfg.data_path), dinfo.rank, dinfo.world_size, dinfo.device)
        done = 0
        while done < total_tokens:
            x, _, cu = loader.next_batch(min(batch, total_tokens - done), cfg.train_seq_len, run.bos_id)
            with autocast_for(dinfo.device):
                for m in models:
                    m(x, cu, cfg.train_seq_len)
            done += x.numel()
        run.calib_files += [f for f in loader.files_read if f not in run.calib_files]

    return run_models


def quant_spec(cfg: Config) -> QuantSpec:
    return QuantSpec(method=cfg.quant_method, matrix_bits=cfg.matrix_bits, embed_bits=cfg.embed_bits,
                     matrix_clip_sigmas=cfg.matrix_clip_sigmas, embed_clip_sigmas=cfg.embed_clip_sigmas,
                     damp=cfg.gptq_damp, block_size=cfg.gptq_block_size, act_order=cfg.gptq_act_order)


def quantize(run: Run) -> None:
    """Hessians from train batches (averaged over ranks), then GPTQ (or RTN) on every matrix and the embedding."""
    cfg, model = run.cfg, run.model
    D.sync(run.dinfo.device)
    t0 = time.perf_counter()
    model.eval()
    runner = calibration_runner(run, cfg.gptq_calib_tokens)
    run.hessians = collect_hessians(model, gptq_targets(model), lambda: runner(model))
    state = {k: v.detach() for k, v in model.state_dict().items()}
    run.qtensors, run.qmeta = quantize_state(state, run.hessians, quant_spec(cfg), TIED)
    run.gptq_state = dequantize_state(run.qtensors, run.qmeta)
    D.sync(run.dinfo.device)
    seconds = time.perf_counter() - t0
    share = cfg.train_reserve_seconds - cfg.serialize_reserve_seconds - cfg.lcq_safety_seconds
    over = seconds > share
    run.charge("gptq", seconds, share, method=cfg.quant_method, bits=f"{cfg.matrix_bits}/{cfg.embed_bits}",
               calib_tokens_per_rank=cfg.gptq_calib_tokens, over_share="YES" if over else "no")
    if over:
        run.log(f"warning: GPTQ took {seconds:.1f}s, more than its share {share:.1f}s of TRAIN_RESERVE_SECONDS; "
                "raise TRAIN_RESERVE_SECONDS or lower GPTQ_CALIB_TOKENS")
    worst = quant_error_report(state, run.gptq_state, run.hessians)[:3]
    run.log("gptq_worst_rel_err: " + " ".join(f"{n}:{e:.3e}" for n, e in worst))


def lcq_target_names(model: nn.Module, cfg: Config) -> list[str]:
    patterns = [p.strip() for p in cfg.lcq_targets.split(",") if p.strip()] or list(DEFAULT_TARGETS)
    try:
        names = match_targets(model, patterns)
    except ValueError as e:
        raise ValueError(f"LCQ_TARGETS: {e}") from None
    mods = dict(model.named_modules())
    not_linear = [n for n in names if not isinstance(mods[n], nn.Linear)]
    if not_linear:
        raise ValueError(f"LCQ_TARGETS matches modules that are not linear layers: {not_linear[:3]}; "
                         "name linear layers such as blocks.*.attn.c_q")
    if cfg.lcq_merge == "baked" and "lm_head" in names:
        raise ValueError("LCQ_MERGE=baked cannot target lm_head: its weight is the tied embedding; drop lm_head from "
                         "LCQ_TARGETS or use side/fused")
    return names


def lora_bytes_per_rank(model: nn.Module, names: list[str], bits: int) -> float:
    """Upper estimate of the artifact bytes one unit of rank costs over `names`: the codes as if incompressible plus
    the two fp16 scales per rank component."""
    mods = dict(model.named_modules())
    return sum((mods[n].in_features + mods[n].out_features) * bits / 8 + 4 for n in names)


def auto_rank(run: Run, names: list[str], model: nn.Module) -> int:
    """The largest uniform rank whose factors fit under the cap next to the code and the quantized model.

    It compresses the quantized model once to know its real bytes (an estimate could overshoot the cap and fail the
    gate at the end of a paid run); that compression is charged to LCQ's time."""
    cfg = run.cfg
    code = len(shipped_script())
    model_bytes = len(artifact.encode(run.qtensors, artifact_meta(cfg, run.bos_id, run.qmeta, None), cfg.compressor))
    room = cfg.artifact_cap_bytes - code - model_bytes - cfg.lcq_auto_headroom_bytes
    rank = max(0, int(room // lora_bytes_per_rank(model, names, cfg.lcq_factor_bits)))
    mods = dict(model.named_modules())
    rank = min(rank, min(min(mods[n].in_features, mods[n].out_features) for n in names))
    run.log(f"lcq_auto_rank: code {code} + model {model_bytes} bytes leave {room} under the cap (headroom "
            f"{cfg.lcq_auto_headroom_bytes}); rank {rank}")
    return rank


def quant_errors(run: Run, names: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module: (W - W_hat, H) from the float model and the GPTQ weights."""
    return {n: (run.model.get_submodule(n).weight.detach().float() - run.gptq_state[f"{n}.weight"].float(),
                run.hessians[f"{n}.weight"]) for n in names}


def lcq_diagnostic(run: Run) -> float | None:
    """rho per tensor: the share of its Hessian-weighted quantization error that its LoRA rank can capture at best.
    Pure reporting, so it runs after the training clock stops."""
    ranks = {n: r for n, r in run.lcq_ranks.items() if r}
    if not ranks:
        return None
    report = energy_report(quant_errors(run, list(ranks)), ranks)
    total_energy = sum(v["energy"] for v in report.values()) or 1.0
    rho_total = sum(v["rho"] * v["energy"] for v in report.values()) / total_energy
    worst = sorted(report.items(), key=lambda kv: kv[1]["rho"])[:3]
    run.log(f"lcq_rho: total {rho_total:.4f} (share of the Hessian-weighted error energy the ranks can capture); "
            "lowest: " + " ".join(f"{n}:{v['rho']:.3f}(r={v['rank']})" for n, v in worst))
    run.log.summary["lcq_rho"] = {"total": rho_total, **{n: round(v["rho"], 5) for n, v in report.items()}}
    return rho_total


def lcq(run: Run) -> None:
    """Attach LoRA to the dequantized model, initialise it in closed form, distil it against the float model on train
    tokens until the clock says stop, then pack it as shipped (side/fused: quantized factors; baked: re-quantized)."""
    cfg, dinfo = run.cfg, run.dinfo
    if not cfg.lcq_enabled:
        return
    D.sync(dinfo.device)
    t0 = time.perf_counter()
    teacher = run.model
    student = model_from_state(cfg, run.bos_id, run.gptq_state, dinfo.device)
    names = lcq_target_names(student, cfg)
    rank = auto_rank(run, names, student) if cfg.lcq_rank == "auto" else int(cfg.lcq_rank)
    if rank == 0:
        run.log("lcq: no room for any LoRA rank under the cap; shipping the GPTQ model alone")
        run.charge("lcq", time.perf_counter() - t0, rank=0)
        return
    mods = dict(student.named_modules())
    if cfg.lcq_rank_alloc == "rho":
        budget = rank * sum(mods[n].in_features + mods[n].out_features for n in names)
        ranks = allocate_ranks(quant_errors(run, names), budget,
                               candidates=tuple(sorted({0, 1, 2, 4, 8, 16, 32, 64, 128, 256, rank})))
    else:
        ranks = {n: rank for n in names}
    run.lcq_ranks = ranks
    torch.manual_seed(cfg.seed)  # the same A init on every rank
    attach_lora(student, names, ranks, cfg.lcq_alpha)
    init_factors(student, teacher, cfg.lcq_init, run.hessians,
                 calibration_runner(run, cfg.lcq_grail_tokens), cfg.lcq_grail_ridge)
    elapsed = time.perf_counter() - t0
    seconds = run.clock_left - elapsed - cfg.serialize_reserve_seconds - cfg.lcq_safety_seconds
    if cfg.lcq_merge == "baked":
        # baked re-runs GPTQ on the merged weights after distillation: keep back what the first GPTQ took
        seconds -= next(s for stage, s, _ in run.ledger if stage == "gptq")
    if cfg.lcq_seconds:
        seconds = min(seconds, cfg.lcq_seconds)
    seconds = max(0.0, seconds)
    run.log(f"lcq_budget: {seconds:.2f}s for distillation (clock left {run.clock_left - elapsed:.2f}s, serialize reserve "
            f"{cfg.serialize_reserve_seconds:.1f}s, safety {cfg.lcq_safety_seconds:.1f}s)")
    res = distill(student, teacher, cfg, dinfo, run.log, run.bos_id, seconds if cfg.lcq_max_steps else 0.0)
    lcq_budget = run.clock_left - cfg.serialize_reserve_seconds
    run.distill_result = res
    if cfg.lcq_merge == "baked":
        merge_lora(student)
        state = {k: v.detach() for k, v in student.state_dict().items()}
        run.qtensors, run.qmeta = quantize_state(state, run.hessians, quant_spec(cfg), TIED)
        run.lora_meta = dict(merge="baked", init=cfg.lcq_init, ranks=ranks, alpha=cfg.lcq_alpha)
    else:
        run.lora_tensors, packed_ranks, alpha = pack_lora(student, cfg.lcq_factor_bits)
        run.lora_meta = dict(merge=cfg.lcq_merge, init=cfg.lcq_init, ranks=packed_ranks, alpha=alpha,
                             bits=cfg.lcq_factor_bits)
    D.sync(dinfo.device)
    run.charge("lcq", time.perf_counter() - t0, lcq_budget,
               rank=cfg.lcq_rank if cfg.lcq_rank_alloc == "uniform" else "rho", init=cfg.lcq_init, merge=cfg.lcq_merge,
               steps=res.steps, tokens_per_step=res.tokens_per_step, kl=f"{res.kl_start:.5f}->{res.kl_end:.5f}",
               stopped_by=res.stopped_by)


def ship(run: Run) -> bool:
    """Write the artifact (rank 0; atomically), count code + model + LoRA bytes and apply the gate. False = over the cap."""
    cfg, dinfo, log = run.cfg, run.dinfo, run.log
    D.sync(dinfo.device)
    t0 = time.perf_counter()
    tensors = {k: v.detach().cpu() for k, v in {**run.qtensors, **run.lora_tensors}.items()}
    lora_meta = run.lora_meta if run.lora_tensors else None
    meta = artifact_meta(cfg, run.bos_id, run.qmeta, lora_meta)
    path = cfg.artifact_file
    script = shipped_script()
    if dinfo.is_master:
        artifact.save(path, tensors, meta, cfg.compressor)
        atomic_write(os.path.join(cfg.log_dir, f"{cfg.run_id}.train_gpt.py"), script)
    D.barrier()
    run.charge("serialize", time.perf_counter() - t0, cfg.serialize_reserve_seconds, compressor=cfg.compressor, path=path)
    # The training clock stops here; the rest is accounting.
    file_bytes = os.path.getsize(path)
    lora_bytes = 0
    if run.lora_tensors and dinfo.is_master:
        with open(path, "rb") as f:
            blob = f.read()
        parts = artifact.tensor_bytes_breakdown(tensors, meta, artifact.compressor_of(blob, path), group_of,
                                                base="model", full=blob)
        lora_bytes = parts.get("lora", 0)
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
        hint = ("lower LCQ_RANK (or LCQ_RANK=auto), LCQ_FACTOR_BITS or LCQ_TARGETS" if lora_bytes else "") + \
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
    record_score(run, "pre_quant", score(run, run.model), "float EMA model in memory")
    run.model = None  # nothing from training is used for the shipped scores
    path = cfg.artifact_file
    if run.lora_meta and run.lora_meta["merge"] == "baked":
        q = model_from_state(cfg, run.bos_id, run.gptq_state, run.dinfo.device)
        record_score(run, "quantized", score(run, q), "GPTQ weights before LCQ, in memory (the baked artifact differs)")
    else:
        q, _, _ = load_shipped(path, cfg, run.dinfo.device, with_lora=False)
        record_score(run, "quantized", score(run, q), f"decoded {path} without LoRA")
    del q
    if run.lora_meta:
        shipped, _, _ = load_shipped(path, cfg, run.dinfo.device)
        record_score(run, "quantized_lcq", score(run, shipped), f"decoded {path} as shipped ({run.lora_meta['merge']})")
        pre, qu, lc = (run.scores[s].val_bpb for s in ("pre_quant", "quantized", "quantized_lcq"))
        gap = qu - pre
        recovered = (qu - lc) / gap if gap else float("nan")
        res = run.distill_result
        run.log(f"lcq_summary: rank {cfg.lcq_rank} init {cfg.lcq_init} merge {cfg.lcq_merge} steps {res.steps} "
                f"time {res.seconds:.2f}s final_kl {res.kl_end:.6f} lora_bytes {run.size.lora_bytes} "
                f"recovered {recovered:.4f} of the quantization gap {gap:.6f} bpb")
        run.log.summary["lcq"] = dict(rank=cfg.lcq_rank, ranks=run.lora_meta["ranks"], init=cfg.lcq_init,
                                      merge=cfg.lcq_merge, steps=res.steps, seconds=round(res.seconds, 3),
                                      kl_start=res.kl_start, kl_end=res.kl_end, lora_bytes=run.size.lora_bytes,
                                      rho=rho, recovered_fraction=recovered)


def eval_only(cfg: Config, dinfo: D.DistInfo, t_launch: float) -> int:
    """Score an artifact from the files alone: nothing from a training process can reach this score."""
    if not os.path.exists(cfg.artifact_file):
        raise FileNotFoundError(f"--artifact {cfg.artifact_file}: no such file")
    run = open_run(cfg, dinfo)
    model, meta, _ = load_shipped(cfg.artifact_file, cfg, dinfo.device)
    if meta["bos_id"] != run.bos_id:
        raise ValueError(f"{cfg.artifact_file} was trained with bos_id {meta['bos_id']} but TOKENIZER_PATH "
                         f"{cfg.tokenizer_path} has bos_id {run.bos_id}")
    stage = "quantized_lcq" if meta.get("lora") else "quantized"
    record_score(run, stage, score(run, model), f"decoded {cfg.artifact_file} as shipped")
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
    log.summary["status"] = status
    log.summary["wall_time_s"] = round(time.perf_counter() - t_launch, 3)
    if run.scores:
        final_stage = list(run.scores)[-1]
        final = run.scores[final_stage]
        log.summary["final"] = dict(stage=final_stage, val_loss=final.val_loss, val_bpb=final.val_bpb,
                                    eval_time_s=round(final.seconds, 3))
        log(f"final {final_stage} val_loss:{final.val_loss:.4f} val_bpb:{final.val_bpb:.4f} "
            f"train_clock:{run.clock_used:.1f}s eval_time:{final.seconds:.1f}s")
        log(f"final_exact val_loss:{final.val_loss:.8f} val_bpb:{final.val_bpb:.8f}")
    if run.size is not None:
        log(run.size.line())
    log.write_summary()
    if cfg.submission_json and run.dinfo.is_master and not cfg.eval_only:
        record = run_record(log.summary)
        write_submission_json(cfg.submission_json, record)
        log(f"wrote {cfg.submission_json} (track {record['track']})")
    log.close()
    return status
