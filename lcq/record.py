"""submission.json for a run: a pure function of the run's JSON summary, and an atomic writer.

Bundled with the training script (every run writes the root submission.json); lcq/tools/submission.py builds record folders and
audits them on top of it. Field names follow the challenge's own records (openai/parameter-golf,
records/track_10min_16mb/*/submission.json); ours sit beside them.
"""
from __future__ import annotations

import json
import math
import os
import statistics

from .files import atomic_write

# The competition's limits. The audit holds every run to these, whatever caps the run configured for itself.
CAP_BYTES = 16_000_000
TRAIN_SECONDS = 600.0
EVAL_SECONDS = 600.0
RECORD_TRACK, NON_RECORD_TRACK = "10min_16mb", "non_record_16mb"

class SubmissionError(ValueError):
    """A run or a folder that cannot become (or is not) a valid record folder."""


# ---------------------------------------------------------------------------------------------- the record (pure)

def _r8(x) -> float | None:
    """A loss/bpb exactly as the log's 8-decimal `_exact` lines print it (None for missing, NaN or inf)."""
    if not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return float(f"{x:.8f}")


def _finite(x):
    """NaN/inf are not JSON; a number that is not finite becomes null."""
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def mean8(values: list) -> float | None:
    """Mean over seeds, rounded like the per-seed values; None if any seed has no value."""
    return None if not values or any(v is None for v in values) else _r8(statistics.mean(values))


def std8(values: list) -> float | None:
    """Sample standard deviation over seeds (n-1), as the challenge's multi-seed records report it."""
    return None if len(values) < 2 or any(v is None for v in values) else _r8(statistics.stdev(values))


def _within(x, limit) -> bool:
    return x is not None and limit is not None and x <= limit


def on_record_hardware(device: str | None, world_size) -> bool:
    """The 10min_16mb track is timed on 8xH100: a run on any other hardware is a non-record run, however fast."""
    return world_size == 8 and isinstance(device, str) and "H100" in device


def seed_result(summary: dict) -> dict:
    """One run's JSON summary (logs/<run_id>.json) -> its entry in seed_results."""
    cfg = summary.get("config")
    if not isinstance(cfg, dict) or "seed" not in cfg or "run_id" not in cfg:
        raise SubmissionError("run summary has no config with seed and run_id; pass the logs/<run_id>.json of a run")
    final, scores = summary.get("final") or {}, summary.get("scores") or {}
    for key in ("val_bpb", "val_loss"):
        value = final.get(key)
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
            # NaN/inf is not a score: never let it become `null` in a record (issue 10)
            raise SubmissionError(f"run {cfg['run_id']}: final {key} is {value}, not a finite score; a run whose score "
                                  "is NaN/inf is never submitted")
    size, train, lcq = summary.get("bytes") or {}, summary.get("train") or {}, summary.get("lcq")
    pre, quant = scores.get("pre_quant") or {}, scores.get("quantized") or {}
    entry = dict(
        run_id=cfg["run_id"], val_loss=_r8(final.get("val_loss")), val_bpb=_r8(final.get("val_bpb")),
        final_stage=final.get("stage"), artifact_bytes=size.get("total"), bytes_code=size.get("code"),
        bytes_model=size.get("model"), bytes_lora=size.get("lora"), steps=train.get("steps"),
        step_avg_ms=train.get("step_avg_ms"),
        # the charged training clock (train + GPTQ + LCQ + serialize): what the 600 s limit applies to
        train_time_s=summary.get("train_clock_s"), train_loop_s=train.get("train_time_s"),
        eval_time_s=final.get("eval_time_s"),
        pre_quant_val_loss=_r8(pre.get("val_loss")), pre_quant_val_bpb=_r8(pre.get("val_bpb")),
        quantized_val_loss=_r8(quant.get("val_loss")), quantized_val_bpb=_r8(quant.get("val_bpb")),
        ledger=summary.get("ledger") or {}, status=summary.get("status"), command=summary.get("command"),
        budgets={k: cfg.get(k) for k in ("max_wallclock_seconds", "eval_budget_seconds", "artifact_cap_bytes")},
        lcq=None)
    if lcq:
        gap = None if entry["quantized_val_bpb"] is None or entry["pre_quant_val_bpb"] is None else \
            _r8(entry["quantized_val_bpb"] - entry["pre_quant_val_bpb"])
        entry["lcq"] = dict(rank=lcq.get("rank"), init=lcq.get("init"), merge=lcq.get("merge"), steps=lcq.get("steps"),
                            seconds=lcq.get("seconds"), final_kl=_finite(lcq.get("kl_end")),
                            lora_bytes=lcq.get("lora_bytes"), quant_gap_bpb=gap,
                            recovered_fraction=_finite(lcq.get("recovered_fraction")))
    budgets = entry["budgets"]
    entry["compliance"] = dict(
        train_under_600s=_within(entry["train_time_s"], TRAIN_SECONDS),
        eval_under_600s=_within(entry["eval_time_s"], EVAL_SECONDS),
        artifact_under_16mb=_within(entry["artifact_bytes"], CAP_BYTES),
        # issue 28: one meaning per field (gate_passed was "exit status 0" while the log's gate said ok)
        train_within_run_cap=_within(entry["train_time_s"], budgets["max_wallclock_seconds"]),
        eval_within_run_budget=_within(entry["eval_time_s"], budgets["eval_budget_seconds"]),
        gate_passed=_within(entry["artifact_bytes"], budgets["artifact_cap_bytes"]),  # the byte gate, as the log's `gate:`
        exit_status_0=entry["status"] == 0,
        hardware_8xh100=on_record_hardware(summary.get("device"), summary.get("world_size")))
    return entry


def combine(summaries: list[dict], date: str) -> dict:
    """submission.json for one or more runs (seeds) of one configuration. Pure: summaries + date -> record.

    val_bpb/val_loss are the seed means of the `final` score (the eval of the decoded artifact, LCQ included);
    bytes_total is the largest seed's total. The track is `10min_16mb` only if every seed kept both its own budgets
    and the competition's limits and passed the gate."""
    if not summaries:
        raise SubmissionError("no runs to combine")
    if not date:
        raise SubmissionError("no date: pass date= (ISO 8601 UTC) or put started_utc in the run summary")
    entries = [seed_result(s) for s in summaries]
    seeds = [s["config"]["seed"] for s in summaries]
    if len(set(seeds)) != len(seeds):
        raise SubmissionError(f"seeds {seeds} repeat; combine runs of different seeds")
    first, cfg = summaries[0], summaries[0]["config"]
    versions = first.get("versions") or {}
    compliance = {k: all(e["compliance"][k] for e in entries) for k in entries[0]["compliance"]}
    totals = [e["artifact_bytes"] for e in entries]
    worst = entries[totals.index(max(totals))] if None not in totals else {}
    rec = dict(author=cfg.get("author", ""), github_id=cfg.get("github_id", ""),
               name=cfg.get("submission_name") or cfg["run_id"], blurb=cfg.get("submission_blurb", ""), date=date,
               track=RECORD_TRACK if all(compliance.values()) else NON_RECORD_TRACK,
               val_loss=mean8([e["val_loss"] for e in entries]), val_bpb=mean8([e["val_bpb"] for e in entries]))
    if len(entries) > 1:
        rec.update(val_loss_std=std8([e["val_loss"] for e in entries]),
                   val_bpb_std=std8([e["val_bpb"] for e in entries]))
    rec.update(
        seeds=seeds, seed_results={str(s): e for s, e in zip(seeds, entries)}, final_stage=entries[0]["final_stage"],
        pre_quant_val_loss=mean8([e["pre_quant_val_loss"] for e in entries]),
        pre_quant_val_bpb=mean8([e["pre_quant_val_bpb"] for e in entries]),
        bytes_total=worst.get("artifact_bytes"), bytes_code=worst.get("bytes_code"),
        bytes_model=worst.get("bytes_model"), bytes_lora=worst.get("bytes_lora"), bytes_cap=CAP_BYTES,
        wallclock_seconds=_max([e["train_time_s"] for e in entries]),
        eval_time_seconds=_max([e["eval_time_s"] for e in entries]),
        hardware=first.get("device"), world_size=first.get("world_size"), pytorch_version=versions.get("torch"),
        cuda_version=versions.get("cuda"), flash_attn_version=versions.get("flash_attn"),
        flash_attn_interface_version=versions.get("flash_attn_interface"), python_version=versions.get("python"),
        compliance=compliance, lcq=None)
    if entries[0]["lcq"]:
        runs = [e["lcq"] for e in entries]
        steps = [r["steps"] for r in runs]
        rec["lcq"] = dict(rank=runs[0]["rank"], init=runs[0]["init"], merge=runs[0]["merge"],
                          steps=steps[0] if len(set(steps)) == 1 else statistics.mean(steps),
                          recovered_fraction=_mean_or_none([r["recovered_fraction"] for r in runs]))
    return rec


def _max(values: list):
    return None if not values or any(v is None for v in values) else max(values)


def _mean_or_none(values: list):
    return None if not values or any(v is None for v in values) else statistics.mean(values)


def run_record(summary: dict, date: str | None = None) -> dict:
    """submission.json for one run, from its JSON summary. Pure. The date is `date`, else summary['started_utc']."""
    return combine([summary], date or summary.get("started_utc"))


def write_submission_json(path: str | os.PathLike, record: dict) -> None:
    """Write `record` as strict JSON (NaN refused before anything is written), atomically: a crash mid-write leaves
    the old file whole (or no file), never a truncated one."""
    atomic_write(path, json.dumps(record, indent=2, allow_nan=False) + "\n")