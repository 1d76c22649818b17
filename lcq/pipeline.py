"""The pipeline's stages as functions over one Run record; train_gpt.py calls them top to bottom."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from . import dist as D
from .attention import resolve_backend
from .config import Config
from .data import file_sha256, list_shards, load_val_tokens, train_pattern, val_pattern
from .evaluate import EvalResult, evaluate
from .model import GPT, build_model
from .runlog import RunLog
from .tokenizer import byte_tables, load_tokenizer
from .train import TrainResult, train

# Train shards are hashed over their first 4 MiB: enough to identify the file, cheap for 100M-token shards.
TRAIN_HASH_BYTES = 4 << 20


@dataclass
class Run:
    cfg: Config
    dinfo: D.DistInfo
    log: RunLog
    bos_id: int
    tables: tuple
    val_tokens: np.ndarray
    model: GPT | None = None
    train_result: TrainResult | None = None
    scores: dict[str, EvalResult] = field(default_factory=dict)


def prepare_data(cfg: Config, dinfo: D.DistInfo) -> Run:
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
    train_files = list_shards(train_pattern(cfg.data_path), "train")
    val_files = list_shards(val_pattern(cfg.data_path), "val")
    log = RunLog(cfg, dinfo)
    log.header({
        "data_train_shards": f"{len(train_files)} files matching {train_pattern(cfg.data_path)}",
        "data_val_files": " ".join(f"{os.path.basename(f)}:sha256={file_sha256(f)[:16]}" for f in val_files),
        "tokenizer": f"{cfg.tokenizer_path} sha256={file_sha256(cfg.tokenizer_path)[:16]} bos_id={bos_id}",
    })
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


def run_eval(run: Run, model: torch.nn.Module, stride: int | None = None) -> EvalResult:
    cfg = run.cfg
    return evaluate(model, run.val_tokens, run.bos_id, run.tables, cfg.window, stride or cfg.eval_stride,
                    cfg.eval_batch_tokens, run.dinfo)


def run_training(run: Run) -> TrainResult:
    cfg = run.cfg

    def monitor(step: int) -> str:
        # Monitoring only: non-overlapping windows (stride = window) to keep it cheap; not charged to training.
        r = run_eval(run, run.model, stride=cfg.window)
        return f"step:{step}/{cfg.iterations} val_loss:{r.val_loss:.4f} val_bpb:{r.val_bpb:.4f}"

    res = train(run.model, cfg, run.dinfo, run.log, run.bos_id, eval_fn=monitor)
    run.log.stage("train", res.train_time_s, budget_left=cfg.max_wallclock_seconds - res.train_time_s,
                  steps=res.steps, stopped_by=res.stopped_by, step_avg_ms=f"{res.step_avg_ms:.2f}",
                  train_budget=f"{cfg.train_budget_seconds:.1f}s")
    run.train_result = res
    return res


def final_eval(run: Run, stage: str) -> EvalResult:
    result = run_eval(run, run.model)
    run.log.score(stage, result)
    within = result.seconds <= run.cfg.eval_budget_seconds
    run.log.stage(f"eval_{stage}", result.seconds, budget_left=run.cfg.eval_budget_seconds - result.seconds,
                  within_eval_budget="yes" if within else "NO")
    run.scores[stage] = result
    return result


def finish(run: Run, t_launch: float) -> int:
    cfg, log, res = run.cfg, run.log, run.train_result
    read = res.files_read if res else []
    log(f"data_train_read: {len(read)} files " +
        " ".join(f"{os.path.basename(f)}:sha256[:4MiB]={file_sha256(f, TRAIN_HASH_BYTES)[:16]}" for f in read))
    final_stage = list(run.scores)[-1]
    final = run.scores[final_stage]
    log.summary.update(
        train=dict(steps=res.steps, train_time_s=round(res.train_time_s, 3), step_avg_ms=round(res.step_avg_ms, 3),
                   tokens_per_step=res.tokens_per_step, stopped_by=res.stopped_by, train_files_read=len(read)),
        final=dict(stage=final_stage, val_loss=final.val_loss, val_bpb=final.val_bpb, eval_time_s=round(final.seconds, 3)),
        wall_time_s=round(time.perf_counter() - t_launch, 3),
    )
    log(f"final {final_stage} val_loss:{final.val_loss:.4f} val_bpb:{final.val_bpb:.4f} "
        f"train_time:{res.train_time_s:.1f}s eval_time:{final.seconds:.1f}s")
    log(f"final_exact val_loss:{final.val_loss:.8f} val_bpb:{final.val_bpb:.8f}")
    log.write_summary()
    log.close()
    return 0
