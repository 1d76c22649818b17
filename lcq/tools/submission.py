"""The record folder a submission PR adds, and an audit that re-checks such a folder from its own files.

    python -m lcq.submission build --run RUN_ID [--run RUN_ID ...] [--log-dir logs] [--out submission] [--force]
    python -m lcq.submission audit submission/2026-04-30_my_run

Every run also writes a root submission.json (run_record + write_submission_json, called by the pipeline).

Field names follow the challenge's own records (openai/parameter-golf, records/track_10min_16mb/*/submission.json):
author, github_id, name, blurb, date, track, val_loss, val_bpb, val_loss_std, val_bpb_std, seeds, seed_results
(val_loss, val_bpb, artifact_bytes, steps, step_avg_ms, eval_time_s), pre_quant_val_loss, pre_quant_val_bpb,
bytes_total, bytes_code, wallclock_seconds, eval_time_seconds, hardware, pytorch_version, cuda_version,
flash_attn_version and compliance (train_under_600s, eval_under_600s, artifact_under_16mb). Ours sit beside them.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..record import (CAP_BYTES, EVAL_SECONDS, RECORD_TRACK, TRAIN_SECONDS, SubmissionError, _within, on_record_hardware,
                     combine,
                     mean8, std8, write_submission_json)

# Config fields that say where files were, not what was trained: seeds of one configuration may differ in these.
LOCATION_FIELDS = frozenset({"run_id", "seed", "log_dir", "artifact_path", "submission_json", "data_path",
                             "tokenizer_path"})
REQUIRED_FILES = ("README.md", "submission.json", "train_gpt.py", "requirements.txt")
PIPELINE_ORDER = ("train", "gptq", "fit", "lcq", "serialize")
# JSON keeps times to 3 decimals, the log prints 2: equal up to the log's rounding.
TIME_TOLERANCE_S = 0.0051


# ---------------------------------------------------------------------------------------------- reading run logs

_NUM = r"(-?[0-9.]+(?:[eE][-+]?\d+)?|nan|inf|-inf)"
_TOTAL = re.compile(r"^Total submission size: (\d+) bytes \(code (\d+), model (\d+), lora (\d+), cap (\d+)\)$", re.M)


def parse_log(text: str) -> dict:
    """The facts a reviewer reads off a run log (logs/<run_id>.txt). Missing lines give None, never an exception."""
    def last(pattern: str):
        found = re.findall(pattern, text, re.M)
        return found[-1] if found else None

    out: dict = {}
    head = re.search(r"^lcq run (\S+) started (\d{4}-\d{2}-\d{2}) (\d{2}:\d{2}:\d{2}) UTC$", text, re.M)
    out["run_id"], out["date"] = (head[1], f"{head[2]}T{head[3]}Z") if head else (None, None)
    conf = last(r"^config: (\{.*\})$")
    try:
        out["config"] = json.loads(conf) if conf else None
    except json.JSONDecodeError:
        out["config"] = None
    out["command"] = last(r"^command: (.*)$")
    totals = _TOTAL.findall(text)
    out["totals_agree"] = len(set(totals)) <= 1
    total, code, model, lora, cap = (int(x) for x in totals[-1]) if totals else (None,) * 5
    out.update(code=code, model=model, lora=lora, total=total, cap=cap)
    clock = last(r"^  total\s+([0-9.]+)\s+[0-9.]+\s+-?[0-9.]+\s*$")
    out["train_clock_s"] = float(clock) if clock else None
    fin = last(r"^final (\S+) val_loss:\S+ val_bpb:\S+ train_clock:([0-9.]+)s eval_time:([0-9.]+)s$")
    out["final_stage"], out["final_train_clock_s"], out["final_eval_s"] = \
        (fin[0], float(fin[1]), float(fin[2])) if fin else (None, None, None)
    exact = last(rf"^final_exact val_loss:{_NUM} val_bpb:{_NUM}$")
    out["val_loss"], out["val_bpb"] = (float(exact[0]), float(exact[1])) if exact else (None, None)
    out["exact"] = {s: (float(a), float(b)) for s, a, b in
                    re.findall(rf"^(\w+)_exact val_loss:{_NUM} val_bpb:{_NUM}$", text, re.M) if s != "final"}
    # issue 17: each score block (tokens, bytes, exact line) in log order, for audit's arithmetic cross-checks
    out["scored"] = [(s, int(n), int(b), float(a), float(c)) for n, b, s, a, c in re.findall(
        rf"^val_tokens:(\d+) val_bytes:(\d+)\n(\w+) val_loss:\S+ val_bpb:\S+ eval_time:\S+\n\3_exact val_loss:{_NUM} "
        rf"val_bpb:{_NUM}$", text, re.M)]
    out["eval_s"] = {s: float(t) for s, t in re.findall(r"^stage:eval_(\S+) time:([0-9.]+)s", text, re.M)}
    train = last(r"^stage:train time:[0-9.]+s .*?\bsteps:(\d+)\b.*?\bstep_avg_ms:([0-9.]+)")
    out["steps"], out["step_avg_ms"] = (int(train[0]), float(train[1])) if train else (None, None)
    lcq = last(rf"^lcq_summary: rank (\S+) init (\S+) merge (\S+) steps (\d+) time ([0-9.]+)s final_kl {_NUM} "
               rf"lora_bytes (\d+) recovered (?:{_NUM} of the quantization gap {_NUM} bpb|"
               rf"n/a \(no quantization gap: {_NUM} bpb\))$")
    out["lcq"] = None if not lcq else dict(rank=lcq[0], init=lcq[1], merge=lcq[2], steps=int(lcq[3]),
                                           recovered_fraction=float(lcq[7]) if lcq[7] else None)
    out["gate_failed"] = "GATE FAILED" in text
    status = last(r"^exit_status: (\d+)$")
    out["exit_status"] = int(status) if status else None
    out["code_sha256"] = last(r"^code: \d+ bytes sha256=([0-9a-f]{64}) ")
    dev = last(r"^device: (.*) world_size:(\d+)$")
    out["device"], out["world_size"] = (dev[0], int(dev[1])) if dev else (None, None)
    return out


# ---------------------------------------------------------------------------------------------- the bundled script

def run_print_config(script: Path, env: dict[str, str], argv: list[str]) -> subprocess.CompletedProcess:
    """Run `script --print_config` in a clean temp dir where our package cannot be imported from outside the script:
    the first PYTHONPATH entry holds an `lcq` package that raises ImportError, so any fallback fails loudly."""
    with tempfile.TemporaryDirectory(prefix="lcq_audit_") as tmp:
        shadow = Path(tmp) / "shadow"
        (shadow / "lcq").mkdir(parents=True)
        (shadow / "lcq" / "__init__.py").write_text(
            'raise ImportError("lcq imported from outside the bundled train_gpt.py")\n', encoding="utf-8")
        work = Path(tmp) / "work"
        work.mkdir()
        shutil.copyfile(script, work / "train_gpt.py")
        keep = {k: os.environ[k] for k in ("PATH", "HOME", "LD_LIBRARY_PATH", "LANG", "LC_ALL", "SYSTEMROOT")
                if k in os.environ}
        full_env = {**keep, "PYTHONPATH": str(shadow), "OMP_NUM_THREADS": "1", **env}
        return subprocess.run([sys.executable, "train_gpt.py", *argv, "--print_config"], cwd=work, env=full_env,
                              capture_output=True, text=True, timeout=300)


def _printed_config(proc: subprocess.CompletedProcess) -> dict | None:
    try:
        cfg = json.loads(proc.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return None
    return cfg if isinstance(cfg, dict) else None


def _env_value(value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return repr(value) if isinstance(value, float) else str(value)


def reproduce(config: dict, defaults: dict, world_size: int) -> dict:
    """Env + argv that make train_gpt.py resolve exactly `config`, given the script's own `defaults` for the preset.

    The logged command lacks the environment the run was launched with; this restores it. Empty strings cannot
    travel through the environment (the config ignores empty variables), so they go on the command line."""
    env = {"PRESET": str(config["preset"]), "SEED": _env_value(config["seed"]), "RUN_ID": str(config["run_id"])}
    argv = []
    for key in sorted(config):
        if key in ("preset", "seed", "run_id", "print_config") or config[key] == defaults.get(key):
            continue
        if config[key] == "":
            argv.append(f"--{key}=")
        else:
            env[key.upper()] = _env_value(config[key])
    launcher = ["python"] if world_size == 1 else ["torchrun", "--standalone", f"--nproc_per_node={world_size}"]
    command = " ".join([f"{k}={shlex.quote(v)}" for k, v in env.items()] + launcher + ["train_gpt.py"]
                       + [shlex.quote(a) for a in argv])
    return dict(env=env, argv=argv, command=command)


def requirements_txt(versions: dict) -> str:
    """requirements.txt pinned to the versions the logs were produced with (local builds noted, not pinned)."""
    lines = [f"# the versions that produced these logs (python {versions.get('python')})"]
    for pkg in ("torch", "numpy", "sentencepiece", "brotli", "flash_attn"):
        v = versions.get(pkg)
        if not v:
            continue
        public, _, local = str(v).partition("+")
        lines.append(f"{pkg}=={public}" + (f"  # the run used the {v} build" if local else ""))
    if versions.get("flash_attn_interface"):
        lines.append(f"# flash_attn_interface (FlashAttention 3) {versions['flash_attn_interface']}: "
                     "install the wheel built for your CUDA and torch")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- README

def _fmt(x, spec: str = "") -> str:
    return "-" if x is None else format(x, spec)


def render_readme(record: dict) -> str:
    """README.md of the record folder, generated from submission.json alone."""
    seeds = [str(s) for s in record["seeds"]]
    res = record["seed_results"]
    n = len(seeds)
    std = f", std {_fmt(record.get('val_bpb_std'), '.8f')}" if n > 1 else ""
    out = [f"# {record['name']}", ""]
    if record["blurb"]:
        out += [record["blurb"], ""]
    out += [f"**val_bpb = {_fmt(record['val_bpb'], '.8f')}** ({'mean of ' + str(n) + ' seeds' if n > 1 else 'seed ' + seeds[0]}"
            f"{std}) | **{_fmt(record['bytes_total'], ',')} bytes** (cap {CAP_BYTES:,}) | {record['hardware']} | "
            f"track `{record['track']}`", "",
            f"Author: {record['author'] or '-'} (GitHub: {record['github_id'] or '-'}). Date: {record['date']}. "
            f"Scored stage: `{record['final_stage']}` (the eval of the decoded artifact, as shipped).", "",
            "## Results", "",
            "| Seed | val_bpb | val_loss | pre_quant bpb | quantized bpb | steps | step_avg ms | train clock s "
            "| eval s | artifact bytes |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in seeds:
        e = res[s]
        out.append(f"| {s} | {_fmt(e['val_bpb'], '.8f')} | {_fmt(e['val_loss'], '.8f')} | "
                   f"{_fmt(e['pre_quant_val_bpb'], '.8f')} | {_fmt(e['quantized_val_bpb'], '.8f')} | {_fmt(e['steps'])} | "
                   f"{_fmt(e['step_avg_ms'], '.2f')} | {_fmt(e['train_time_s'], '.2f')} | {_fmt(e['eval_time_s'], '.2f')} | "
                   f"{_fmt(e['artifact_bytes'], ',')} |")
    if n > 1:
        out.append(f"| **Mean** | **{_fmt(record['val_bpb'], '.8f')}** | {_fmt(record['val_loss'], '.8f')} | "
                   f"{_fmt(record['pre_quant_val_bpb'], '.8f')} | | | | | | |")
        out.append(f"| Std | {_fmt(record['val_bpb_std'], '.8f')} | {_fmt(record['val_loss_std'], '.8f')} | | | | | | | |")
    out += ["", "Train clock = main training + GPTQ + LCQ + serialization (what the 600 s limit applies to); "
            "eval = the scored stage's evaluation.", "",
            "## Bytes", "", "| Seed | code | model | LoRA | total | run cap | margin to 16,000,000 |",
            "|---:|---:|---:|---:|---:|---:|---:|"]
    for s in seeds:
        e = res[s]
        margin = None if e["artifact_bytes"] is None else CAP_BYTES - e["artifact_bytes"]
        out.append(f"| {s} | {_fmt(e['bytes_code'], ',')} | {_fmt(e['bytes_model'], ',')} | {_fmt(e['bytes_lora'], ',')} "
                   f"| {_fmt(e['artifact_bytes'], ',')} | {_fmt(e['budgets']['artifact_cap_bytes'], ',')} | "
                   f"{_fmt(margin, ',')} |")
    # the JSON summary sorts its keys; show the stages in pipeline order
    stages = sorted(dict.fromkeys(k for s in seeds for k in res[s]["ledger"]),
                    key=lambda k: (PIPELINE_ORDER.index(k) if k in PIPELINE_ORDER else len(PIPELINE_ORDER), k))
    out += ["", "## Stage timings (training clock, seconds used / budget)", "",
            "| Stage | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---:|" * n]
    for st in stages:
        cells = []
        for s in seeds:
            row = res[s]["ledger"].get(st)
            cells.append("-" if not row else f"{row['seconds']:.2f} / {_fmt(row.get('budget'), '.2f')}")
        out.append(f"| {st} | " + " | ".join(cells) + " |")
    out.append("| **total** | " + " | ".join(f"**{_fmt(res[s]['train_time_s'], '.2f')}** / "
                                           f"{_fmt(res[s]['budgets']['max_wallclock_seconds'], '.0f')}" for s in seeds) + " |")
    out.append(f"| eval ({record['final_stage']}) | " + " | ".join(
        f"{_fmt(res[s]['eval_time_s'], '.2f')} / {_fmt(res[s]['budgets']['eval_budget_seconds'], '.0f')}" for s in seeds) + " |")
    if record["lcq"]:
        out += ["", "## LCQ (LoRA-compensated quantization)", "",
                "| Seed | rank | init | merge | steps | time s | final KL | LoRA bytes | quantization gap bpb | recovered |",
                "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|"]
        for s in seeds:
            q = res[s]["lcq"]
            out.append(f"| {s} | {q['rank']} | {q['init']} | {q['merge']} | {_fmt(q['steps'])} | {_fmt(q['seconds'], '.2f')} | "
                       f"{_fmt(q['final_kl'], '.6f')} | {_fmt(q['lora_bytes'], ',')} | {_fmt(q['quant_gap_bpb'], '.8f')} | "
                       f"{_fmt(q['recovered_fraction'], '.4f')} |")
        out += ["", "Recovered = (quantized bpb - quantized_lcq bpb) / (quantized bpb - pre_quant bpb)."]
    c = record["compliance"]

    def yes(ok: bool) -> str:
        return "yes" if ok else "**NO**"
    out += ["", "## Compliance", "",
            f"- Training clock <= 600 s on every seed: {yes(c['train_under_600s'])} (max {_fmt(record['wallclock_seconds'], '.2f')} s)",
            f"- Evaluation <= 600 s on every seed: {yes(c['eval_under_600s'])} (max {_fmt(record['eval_time_seconds'], '.2f')} s)",
            f"- Code + model + LoRA <= 16,000,000 bytes on every seed: {yes(c['artifact_under_16mb'])} "
            f"(max {_fmt(record['bytes_total'], ',')})",
            f"- Training clock within the run's own MAX_WALLCLOCK_SECONDS: {yes(c['train_within_run_cap'])}",
            f"- Evaluation within the run's own EVAL_BUDGET_SECONDS: {yes(c['eval_within_run_budget'])}",
            f"- Byte gate passed (bytes within the run's ARTIFACT_CAP_BYTES, the log's `gate: ok`): {yes(c['gate_passed'])}",
            f"- Exit status 0: {yes(c['exit_status_0'])}",
            f"- Ran on 8xH100 (the record track's hardware): {yes(c['hardware_8xh100'])} ({record['hardware']})",
            "- GPTQ calibration and LCQ distillation read train shards only (see `data_calibration_read` in the logs).",
            "", "Check this folder with `python -m lcq.submission audit <folder>`.", "",
            "## Reproduce", "", "```bash", "pip install -r requirements.txt"]
    for s in seeds:
        out.append(record.get("reproduce", {}).get(s, {}).get("command") or f"# seed {s}: see train_seed{s}.log")
    out += ["```", "", "Commands as logged (the environment is not part of the logged command):", ""]
    out += [f"- seed {s}: `{res[s]['command']}`" for s in seeds]
    out += ["", "## Files", "", "- `README.md`, `submission.json`, `requirements.txt`",
            "- `train_gpt.py`: the single-file script; its byte length is the counted code bytes"]
    out += [f"- `train_seed{s}.log`" for s in seeds]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------- build

@dataclass(frozen=True)
class LoggedRun:
    name: str
    summary: dict
    log_text: str
    log_path: Path
    script: bytes


def load_run(run: str, log_dir: str | os.PathLike = "logs") -> LoggedRun:
    """A run id (files under log_dir) or a path to its .txt log -> the log, the JSON summary and the bundled script."""
    base = run[:-4] if run.endswith(".txt") else os.path.join(log_dir, run)
    paths = {ext: Path(base + ext) for ext in (".txt", ".json", ".train_gpt.py")}
    for p in paths.values():
        if not p.is_file():
            raise SubmissionError(f"--run {run}: {p} not found (a run writes <run_id>.txt, .json and .train_gpt.py "
                                  "into its LOG_DIR; pass --log-dir or the path to the .txt log)")
    try:
        summary = json.loads(paths[".json"].read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SubmissionError(f"{paths['.json']}: not valid JSON ({e}); did the run finish?") from None
    return LoggedRun(run, summary, paths[".txt"].read_text(encoding="utf-8"), paths[".txt"], paths[".train_gpt.py"].read_bytes())


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("_.") or "run"


def build(runs: list[str], log_dir: str | os.PathLike = "logs", out: str | os.PathLike = "submission",
          force: bool = False) -> Path:
    """Create out/<date>_<name>/ from one or more runs of one configuration (different seeds). Returns the folder."""
    loaded = [load_run(r, log_dir) for r in runs]
    first = loaded[0]
    for r in loaded:
        if r.script != first.script:
            raise SubmissionError(f"{r.name} shipped a different train_gpt.py than {first.name}: combined runs must have "
                                  "byte-identical scripts (the folder holds one script)")
        if "final" not in r.summary:
            raise SubmissionError(f"{r.name}: the summary has no final score (did the run fail its gate or die?)")
        base = {k: v for k, v in first.summary["config"].items() if k not in LOCATION_FIELDS}
        cfg = {k: v for k, v in r.summary["config"].items() if k not in LOCATION_FIELDS}
        diff = sorted(k for k in base.keys() | cfg.keys() if base.get(k) != cfg.get(k))
        if diff:
            raise SubmissionError(f"{r.name} differs from {first.name} in {diff}: --run combines seeds of one configuration")
    dates = []
    for r in loaded:
        date = parse_log(r.log_text)["date"]
        if date is None:
            raise SubmissionError(f"{r.log_path}: no 'lcq run ... started ... UTC' header line; is this an lcq run log?")
        dates.append(date)
    record = combine([r.summary for r in loaded], max(dates))
    folder = Path(out) / f"{record['date'][:10]}_{_slug(record['name'])}"
    if folder.exists() and not force:
        raise SubmissionError(f"{folder} already exists; pass --force to replace it")

    Path(out).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=out))
    try:
        (tmp / "train_gpt.py").write_bytes(first.script)
        preset = first.summary["config"]["preset"]
        proc = run_print_config(tmp / "train_gpt.py", {"PRESET": preset}, [])
        defaults = _printed_config(proc)
        if proc.returncode != 0 or defaults is None:
            raise SubmissionError(f"train_gpt.py of {first.name} does not print its config (exit {proc.returncode}): "
                                  f"{proc.stderr[-2000:]}")
        record["reproduce"] = {str(r.summary["config"]["seed"]): reproduce(r.summary["config"], defaults,
                                                                           r.summary.get("world_size") or 1)
                               for r in loaded}
        for r in loaded:
            shutil.copyfile(r.log_path, tmp / f"train_seed{r.summary['config']['seed']}.log")
        write_submission_json(tmp / "submission.json", record)
        (tmp / "README.md").write_text(render_readme(record), encoding="utf-8")
        (tmp / "requirements.txt").write_text(requirements_txt(first.summary.get("versions") or {}), encoding="utf-8")
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=out))
            os.replace(folder, old / folder.name)
            os.replace(tmp, folder)
            shutil.rmtree(old)
        else:
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


# ---------------------------------------------------------------------------------------------- audit

@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def _seed_of(path: Path) -> str:
    return path.name[len("train_seed"):-len(".log")]


def audit(folder: str | os.PathLike) -> list[Check]:
    """Re-check a record folder from its own files against the competition's limits. Never raises on bad content:
    every problem is a failed check."""
    folder = Path(folder)
    checks: list[Check] = []

    def add(name: str, ok, detail: str) -> None:
        checks.append(Check(name, bool(ok), detail))
    if not folder.is_dir():
        return [Check("folder", False, f"{folder} is not a directory")]
    logs = sorted(folder.glob("train_seed*.log"))
    missing = [f for f in REQUIRED_FILES if not (folder / f).is_file()] + ([] if logs else ["train_seed<S>.log"])
    add("files", not missing, f"missing: {', '.join(missing)}" if missing else
        f"{', '.join(REQUIRED_FILES)}, {len(logs)} log(s)")

    record = None
    if (folder / "submission.json").is_file():
        try:
            record = json.loads((folder / "submission.json").read_text(encoding="utf-8"))
            add("submission_json", isinstance(record, dict), "parses" if isinstance(record, dict) else "not an object")
        except json.JSONDecodeError as e:
            add("submission_json", False, f"invalid JSON: {e}")
        record = record if isinstance(record, dict) else None

    script = folder / "train_gpt.py"
    code_bytes = script.stat().st_size if script.is_file() else None
    code_sha = hashlib.sha256(script.read_bytes()).hexdigest() if script.is_file() else None
    parsed = {_seed_of(p): parse_log(p.read_text(encoding="utf-8", errors="replace")) for p in logs}

    for seed, log in parsed.items():
        tag = f"[seed {seed}]"
        need = {"header": log["run_id"], "config": log["config"], "Total submission size": log["total"],
                "training clock total": log["train_clock_s"], "final": log["final_stage"], "final_exact": log["val_bpb"],
                f"stage:eval_{log['final_stage']}": log["eval_s"].get(log["final_stage"])}
        gaps = [k for k, v in need.items() if v is None]
        cfg = log["config"] or {}
        if cfg and str(cfg.get("seed")) != seed:
            gaps.append(f"config seed {cfg.get('seed')} != file name seed {seed}")
        if not log["totals_agree"]:
            gaps.append("Total submission size lines disagree")
        if log["gate_failed"]:
            gaps.append("GATE FAILED")
        add(f"log_complete{tag}", not gaps, "missing/bad: " + "; ".join(gaps) if gaps else "header, config, totals, "
            "clock table, final lines")
        if log["val_bpb"] is not None:
            ok = math.isfinite(log["val_bpb"]) and math.isfinite(log["val_loss"])
            add(f"score_finite{tag}", ok, f"final val_bpb {log['val_bpb']} val_loss {log['val_loss']}" +
                ("" if ok else ": NaN/inf is not a score, never submitted"))
        if log["val_bpb"] is not None:
            add(*_final_matches_last_stage(tag, log))
            add(*_bpb_from_loss(tag, log))
        if log["total"] is None:
            continue
        add(f"code_bytes{tag}", code_bytes == log["code"],
            f"train_gpt.py {_fmt(code_bytes)} B vs logged code {log['code']} B")
        # Same length is not same script: the log names the shipped script's sha256 too.
        add(f"code_sha256{tag}", code_sha is not None and code_sha == log["code_sha256"],
            f"train_gpt.py sha256 {(code_sha or '-')[:16]} vs logged {(log['code_sha256'] or 'none')[:16]}")
        recomputed = None if code_bytes is None else code_bytes + log["model"] + log["lora"]
        add(f"bytes_recomputed{tag}", recomputed == log["total"],
            f"{_fmt(code_bytes)} + model {log['model']} + lora {log['lora']} = {_fmt(recomputed)} vs logged total {log['total']}")
        worst = max(log["total"], recomputed or 0)
        add(f"artifact_cap{tag}", worst <= CAP_BYTES,
            f"{worst:,} B {'<=' if worst <= CAP_BYTES else '>'} {CAP_BYTES:,} (run cap {_fmt(cfg.get('artifact_cap_bytes'), ',')})")
        # issue 28: a run over its own cap fails too (it ended with exit 4: "PASS 182.04 s vs 600 s (run cap 150 s)")
        train_s = _max_present(log["train_clock_s"], log["final_train_clock_s"])
        cap = min(TRAIN_SECONDS, _number(cfg.get("max_wallclock_seconds"), TRAIN_SECONDS))
        add(f"train_time{tag}", train_s is not None and train_s <= cap,
            f"{_fmt(train_s, '.2f')} s vs {TRAIN_SECONDS:.0f} s and the run cap {_fmt(cfg.get('max_wallclock_seconds'), '.0f')} s")
        eval_s = _max_present(log["eval_s"].get(log["final_stage"]), log["final_eval_s"])
        cap = min(EVAL_SECONDS, _number(cfg.get("eval_budget_seconds"), EVAL_SECONDS))
        add(f"eval_time{tag}", eval_s is not None and eval_s <= cap,
            f"{_fmt(eval_s, '.2f')} s vs {EVAL_SECONDS:.0f} s and the run budget {_fmt(cfg.get('eval_budget_seconds'), '.0f')} s")
        add(f"exit_status{tag}", log["exit_status"] == 0, f"the log's exit_status: {_fmt(log['exit_status'])}")
        if record is not None:
            bad = _json_vs_log(record.get("seed_results", {}).get(seed), log)
            add(f"json_matches_log{tag}", not bad, "; ".join(bad) if bad else
                "val_bpb, val_loss, bytes, steps, times, LCQ equal the log")

    if record is not None:
        bad = [k for k in ("val_bpb", "val_loss") if not (isinstance(record.get(k), (int, float))
                                                         and math.isfinite(record[k]))]
        add("json_score_finite", not bad, f"submission.json {', '.join(f'{k} {record.get(k)}' for k in bad)} is not a "
            "finite score" if bad else f"val_bpb {record.get('val_bpb')}, val_loss {record.get('val_loss')}")
    if record is not None and parsed:
        bad = _json_totals(record, parsed)
        add("json_totals", not bad, "; ".join(bad) if bad else
            f"seeds {sorted(parsed)}, val_bpb {record.get('val_bpb')}, bytes_total {record.get('bytes_total')}, "
            f"track {record.get('track')}")

    if script.is_file():
        add(*_check_script(script, record, parsed))
    return checks


def _final_matches_last_stage(tag: str, log: dict) -> tuple[str, bool, str]:
    """final_exact must repeat the last scored stage's exact line, and final must name that stage (issue 17: a log and
    submission.json edited together passed every other check)."""
    last = log["scored"][-1] if log["scored"] else None
    ok = last is not None and last[0] == log["final_stage"] and (last[3], last[4]) == (log["val_loss"], log["val_bpb"])
    return (f"final_is_last_stage{tag}", ok, f"final_exact {log['val_loss']}/{log['val_bpb']} ({log['final_stage']}) vs "
            f"last stage line " + ("none" if last is None else f"{last[0]} {last[3]}/{last[4]}"))


def _bpb_from_loss(tag: str, log: dict) -> tuple[str, bool, str]:
    """Every scored stage's val_bpb = val_loss / ln 2 x tokens / bytes, to the printed 8 decimals (rounding the loss
    moves the product by at most 0.5e-8 / ln 2 x tokens / bytes, plus 0.5e-8 for the bpb itself; 2x margin)."""
    bad = []
    for stage, tokens, nbytes, loss, bpb in log["scored"]:
        want = loss / math.log(2) * tokens / nbytes if nbytes else math.inf
        if not abs(want - bpb) <= 2 * (0.5e-8 / math.log(2) * tokens / max(nbytes, 1) + 0.5e-8):
            bad.append(f"{stage}: {bpb} != {loss} / ln 2 x {tokens} / {nbytes} = {want:.8f}")
    return (f"bpb_from_loss{tag}", log["scored"] and not bad, "; ".join(bad) if bad else
            f"{len(log['scored'])} stage(s): val_bpb = val_loss / ln 2 x tokens / bytes" if log["scored"] else
            "no val_tokens/val_bytes/exact lines to check")


def _number(x, default: float) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else default


def _max_present(*xs):
    xs = [x for x in xs if x is not None]
    return max(xs) if xs else None


def _json_vs_log(entry: dict | None, log: dict) -> list[str]:
    if not isinstance(entry, dict):
        return ["no seed_results entry for this seed"]
    bad = []
    exact = {"val_bpb": log["val_bpb"], "val_loss": log["val_loss"], "artifact_bytes": log["total"],
             "bytes_code": log["code"], "bytes_model": log["model"], "bytes_lora": log["lora"], "steps": log["steps"],
             "run_id": log["run_id"]}
    for k, want in exact.items():
        if entry.get(k) != want:
            bad.append(f"{k} json {entry.get(k)} != log {want}")
    for k, want in (("train_time_s", log["train_clock_s"]), ("eval_time_s", log["eval_s"].get(log["final_stage"]))):
        got = entry.get(k)
        if not isinstance(got, (int, float)) or want is None or abs(got - want) > TIME_TOLERANCE_S:
            bad.append(f"{k} json {got} != log {want}")
    q, lq = entry.get("lcq"), log["lcq"]
    if (q is None) != (lq is None):
        bad.append(f"lcq json {'absent' if q is None else 'present'} but log {'absent' if lq is None else 'present'}")
    elif q is not None:
        if q.get("steps") != lq["steps"] or str(q.get("rank")) != lq["rank"]:
            bad.append(f"lcq steps/rank json {q.get('steps')}/{q.get('rank')} != log {lq['steps']}/{lq['rank']}")
        rf, lrf = q.get("recovered_fraction"), lq["recovered_fraction"]
        if (rf is not None) if lrf is None else (math.isfinite(lrf) and (rf is None or abs(rf - lrf) > 5e-5)):
            bad.append(f"lcq recovered_fraction json {rf} != log {lrf}")
    return bad


def _json_totals(record: dict, parsed: dict[str, dict]) -> list[str]:
    bad = []
    seeds = sorted(parsed)
    json_seeds = sorted(str(s) for s in record.get("seeds") or [])
    if json_seeds != seeds or sorted(record.get("seed_results") or {}) != seeds:
        bad.append(f"seeds json {json_seeds} != logs {seeds}")
    bpbs = [parsed[s]["val_bpb"] for s in seeds]
    losses = [parsed[s]["val_loss"] for s in seeds]
    want = {"val_bpb": mean8(bpbs), "val_loss": mean8(losses)}
    if len(seeds) > 1:
        want.update(val_bpb_std=std8(bpbs), val_loss_std=std8(losses))
    totals = [parsed[s]["total"] for s in seeds]
    want["bytes_total"] = None if None in totals else max(totals)
    for k, v in want.items():
        if record.get(k) != v:
            bad.append(f"{k} json {record.get(k)} != logs {v}")
    ok = all(_log_within_limits(parsed[s]) for s in seeds)
    if record.get("track") == RECORD_TRACK and not ok:
        bad.append(f"track {RECORD_TRACK} but a log breaks a limit or its gate, or did not run on 8xH100")
    return bad


def _log_within_limits(log: dict) -> bool:
    cfg = log["config"] or {}
    train_s = _max_present(log["train_clock_s"], log["final_train_clock_s"])
    eval_s = _max_present(log["eval_s"].get(log["final_stage"]), log["final_eval_s"])
    return (not log["gate_failed"] and log["val_bpb"] is not None and on_record_hardware(log["device"], log["world_size"])
            and _within(train_s, min(TRAIN_SECONDS, cfg.get("max_wallclock_seconds", TRAIN_SECONDS)))
            and _within(eval_s, min(EVAL_SECONDS, cfg.get("eval_budget_seconds", EVAL_SECONDS)))
            and _within(log["total"], min(CAP_BYTES, cfg.get("artifact_cap_bytes", CAP_BYTES))))


def _check_script(script: Path, record: dict | None, parsed: dict[str, dict]) -> tuple[str, bool, str]:
    """The script imports from itself alone and, given the folder's reproduce env, resolves the logged config."""
    seed = next(iter(sorted(parsed)), None)
    recipe = ((record or {}).get("reproduce") or {}).get(seed) if seed else None
    env, argv = (recipe["env"], recipe["argv"]) if recipe else ({}, [])
    proc = run_print_config(script, env, argv)
    printed = _printed_config(proc)
    if proc.returncode != 0 or printed is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        return "print_config", False, f"exit {proc.returncode}: {tail[0][:300]}"
    logged = parsed[seed]["config"] if seed else None
    if not recipe or not logged:
        missing = "no reproduce env in submission.json" if not recipe else f"no config line in the seed {seed} log"
        return "print_config", True, f"no lcq on the path; imports and prints its config ({missing} to compare)"
    diff = sorted(k for k in printed.keys() | logged.keys() if k != "print_config" and printed.get(k) != logged.get(k))
    return ("print_config", not diff, f"differs from the seed {seed} log in {diff}" if diff else
            f"no lcq on the path; the README's seed {seed} env resolves exactly the logged config")


def format_checks(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    rows = [f"{'PASS' if c.ok else 'FAIL'}  {c.name:<{width}}  {c.detail}" for c in checks]
    failed = sum(not c.ok for c in checks)
    rows.append(f"audit: {len(checks)} checks, {failed} failed" + (" -> NOT a valid record folder" if failed else ""))
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lcq submission", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="create submission/<date>_<name>/ from run logs")
    b.add_argument("--run", action="append", required=True,
                   help="run id (files in --log-dir) or path to its .txt log; repeat to combine seeds")
    b.add_argument("--log-dir", default="logs")
    b.add_argument("--out", default="submission")
    b.add_argument("--force", action="store_true", help="replace an existing folder")
    a = sub.add_parser("audit", help="re-check a record folder; exit 1 on any failed check")
    a.add_argument("folder")
    args = ap.parse_args(argv)
    if args.cmd == "build":
        try:
            folder = build(args.run, args.log_dir, args.out, args.force)
        except SubmissionError as e:
            print(f"build failed: {e}", file=sys.stderr)
            return 2
        print(f"wrote {folder}")
        return 0
    checks = audit(args.folder)
    print(format_checks(checks))
    return 0 if all(c.ok for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
