"""Start-up checks: every fault we can detect is found before the first training step (and before warm-up/compile),
with a message that names the file or knob and the fix (issue 10). A record attempt is ~20 minutes of 8xH100 time;
a bad shard found by the loader 34 s in, or a bad val id found by the eval after training, wastes all of it.

Each check is cheap at record scale (80 x 200 MB train shards): a shard's header is 1 KB and its size one stat; the
train id range is checked on a bounded sample; only the val split, which the run loads whole anyway, is read in full.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .config import Config
from .data import (HEADER_BYTES, ShardError, demo_paths, list_shards, read_header, sidecar_files, train_pattern,
                   val_pattern)

# Train ids are range-checked on at most this many tokens in all (spread over every shard, a few chunks each): ~2 MB
# of reads at record scale, enough to catch a shard tokenized with another vocabulary (its ids spread over the range).
TRAIN_SAMPLE_TOKENS = 1 << 20
CHUNKS_PER_SHARD = 4
# Val shards are read in pieces of this many tokens: the whole split is checked without holding a second copy of it.
VAL_READ_TOKENS = 1 << 24
# Free space a run needs beside its artifact (cap bytes): the bundled script (< 1 MB), the log and JSON summary
# (< 1 MB at 20,000 steps) and the temp copies atomic writes make before their rename, with room to spare.
DISK_MARGIN_BYTES = 16 << 20


class StartupError(RuntimeError):
    """Bad input found before training: the message names the file or knob and the fix."""


def check_shards(cfg: Config, with_train: bool = True) -> tuple[list[str], list[str]]:
    """Header and size of every val (and train) shard, and the val byte sidecars: (train files, val files)."""
    try:
        val = list_shards(val_pattern(cfg.data_path), "val")
        train = list_shards(train_pattern(cfg.data_path), "train") if with_train else []
    except FileNotFoundError as e:
        hint = download_hint(cfg.data_path)
        raise StartupError(f"{e}" + f" (this DATA_PATH: `{hint}`)" * ("--variant" in hint)) from None
    bad = []
    for f in [*train, *val, *sidecar_files(cfg.data_path)]:
        try:
            read_header(f)
        except (ShardError, OSError) as e:
            bad.append(str(e))
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise StartupError(f"{len(bad)} bad shard(s) in DATA_PATH={cfg.data_path}: " + "; ".join(bad[:3]) + more +
                           ". Fix: re-download or rebuild them (`python -m lcq.corpus`)")
    return train, val


def _read_tokens(f, n_tokens: int, start: int, count: int) -> np.ndarray:
    """`count` token ids from position `start` of an open shard: one seek and one read. A memmap slice here paid a page
    fault and the kernel's read-ahead per chunk: 13 s for the 320 chunks of 80 x 200 MB shards, against 0.04 s this
    way (2-core AMD EPYC dev box, sparse test shards)."""
    count = max(0, min(count, n_tokens - start))
    f.seek(HEADER_BYTES + 2 * start)
    return np.frombuffer(f.read(2 * count), dtype="<u2")


def _id_fix(what: str) -> str:
    return f"Fix: point DATA_PATH ({what}) and TOKENIZER_PATH/VOCAB_SIZE at one tokenizer's data"


def check_val_ids(val_files: list[str], vocab_size: int) -> None:
    """Every val token id < VOCAB_SIZE (the whole split: the run loads it whole anyway)."""
    for path in val_files:
        n = read_header(path)
        with open(path, "rb") as f:
            for start in range(0, n, VAL_READ_TOKENS):
                toks = _read_tokens(f, n, start, VAL_READ_TOKENS)
                if toks.size and int(toks.max()) >= vocab_size:
                    first = start + int(np.argmax(toks >= vocab_size))
                    raise StartupError(f"{path}: token id {int(toks.max())} (first at position {first}) >= "
                                       f"VOCAB_SIZE={vocab_size}. {_id_fix('val')}")


def check_train_ids(train_files: list[str], vocab_size: int, sample_tokens: int = TRAIN_SAMPLE_TOKENS) -> int:
    """Train ids < VOCAB_SIZE on a bounded sample: CHUNKS_PER_SHARD evenly spaced chunks of every shard. Returns the
    number of tokens checked."""
    per_chunk = max(1, sample_tokens // max(1, len(train_files) * CHUNKS_PER_SHARD))
    checked = 0
    for path in train_files:
        n = read_header(path)
        with open(path, "rb") as f:
            for start in np.linspace(0, max(0, n - per_chunk), CHUNKS_PER_SHARD).astype(np.int64).tolist():
                chunk = _read_tokens(f, n, start, per_chunk)
                checked += chunk.size
                if chunk.size and int(chunk.max()) >= vocab_size:
                    raise StartupError(f"{path}: token id {int(chunk.max())} near position {start} >= "
                                       f"VOCAB_SIZE={vocab_size}. {_id_fix('train')}")
    return checked


def download_hint(data_path: str) -> str:
    """The download command for DATA_PATH's variant (issue 28: the record preset's CaseOps data needs its --variant)."""
    name = Path(data_path).name
    variant = "caseops" if "caseops" in name else name.removeprefix("fineweb10B_")
    return f"python -m lcq.corpus download --variant {variant}" if name.startswith("fineweb10B_") else \
        "python -m lcq.corpus demo|download"


def check_tokenizer_file(cfg: Config) -> None:
    if not os.path.isfile(cfg.tokenizer_path):
        demo = " (the demo presets build theirs only at the default demo paths)" * cfg.auto_build_demo
        raise StartupError(f"TOKENIZER_PATH={cfg.tokenizer_path}: no such file. Fix: set it to the .model DATA_PATH "
                           f"was tokenized with (`{download_hint(cfg.data_path)}`){demo}")


def check_reserve(cfg: Config) -> float:
    """TRAIN_RESERVE_SECONDS covers serialize + LCQ safety + a GPTQ minimum, on the configured knobs. Returns what
    GPTQ and LCQ get."""
    safety = cfg.lcq_safety_seconds if cfg.lcq_enabled else 0.0
    need = cfg.serialize_reserve_seconds + safety + cfg.gptq_min_seconds
    if cfg.train_reserve_seconds < need:
        parts = f"SERIALIZE_RESERVE_SECONDS {cfg.serialize_reserve_seconds:g}" + \
            (f" + LCQ_SAFETY_SECONDS {safety:g}" if cfg.lcq_enabled else "") + \
            f" + GPTQ_MIN_SECONDS {cfg.gptq_min_seconds:g}"
        raise StartupError(
            f"TRAIN_RESERVE_SECONDS={cfg.train_reserve_seconds:g} < {parts} = {need:g}. Fix: raise it to {need:g} "
            "or lower those knobs")
    return cfg.train_reserve_seconds - cfg.serialize_reserve_seconds - safety


def _existing_dir(path: str) -> Path:
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_disk(cfg: Config, artifact_bytes: int) -> dict[str, int]:
    """Free space at LOG_DIR and at the artifact's folder >= artifact_bytes + DISK_MARGIN_BYTES. Returns free bytes
    by folder."""
    need = artifact_bytes + DISK_MARGIN_BYTES
    free = {}
    for knob, folder in (("LOG_DIR", cfg.log_dir), ("ARTIFACT_PATH", os.path.dirname(cfg.artifact_file) or ".")):
        where = _existing_dir(folder)
        have = shutil.disk_usage(where).free
        free[str(where)] = have
        if have < need:
            raise StartupError(f"{knob}: {where} has {have:,} bytes free, the run needs {need:,} "
                               "(ARTIFACT_CAP_BYTES + logs). Fix: free space or use another disk")
    return free


def run_outputs(cfg: Config, training: bool = True) -> list[tuple[str, str]]:
    """(knob that names it, path) of every file a run writes under its final name (an eval-only run: its log and
    summary; its ARTIFACT_PATH is its input)."""
    base = os.path.join(cfg.log_dir, cfg.run_id)
    if not training:
        return [("RUN_ID", base + ".txt"), ("RUN_ID", base + ".json")]
    return [("RUN_ID", base + ext) for ext in (".txt", ".json", ".train_gpt.py")] + [("ARTIFACT_PATH", cfg.artifact_file)]


def output_folders(cfg: Config) -> list[tuple[str, str]]:
    """(knob, folder) of every place the run writes: log, artifact, submission.json, eval dumps and (lrzip on PATH)
    lrzip's temp folder."""
    out = [("LOG_DIR", os.path.join(cfg.log_dir, "x"))]
    if not cfg.eval_only:
        out += [("ARTIFACT_PATH", cfg.artifact_file)] + [("SUBMISSION_JSON", cfg.submission_json)] * bool(cfg.submission_json)
    out += [("EVAL_DUMP", cfg.eval_dump)] * bool(cfg.eval_dump)
    out = [(k, os.path.dirname(p) or ".") for k, p in out]
    return out + [("TMPDIR", tempfile.gettempdir())] * bool(shutil.which("lrzip"))


def check_output_folders(cfg: Config, log_dir: bool) -> None:
    """Issue 17: every folder the run writes (log_dir: LOG_DIR alone, before the log opens; else the others) is created
    if needed and takes a probe file, written and deleted; ulimit -f holds the cap. Found here, not after the paid run."""
    for knob, folder in output_folders(cfg):
        if (knob == "LOG_DIR") == log_dir:
            probe = os.path.join(folder, f".lcq-probe-{os.getpid()}")
            try:
                os.makedirs(folder, exist_ok=True)
                os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
                os.unlink(probe)
            except OSError as e:
                raise StartupError(f"{knob}: cannot write in {os.path.abspath(folder)} ({e.strerror})") from None
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if not (log_dir or cfg.eval_only) and 0 <= soft < cfg.artifact_cap_bytes + DISK_MARGIN_BYTES:
        raise StartupError(f"ARTIFACT_CAP_BYTES={cfg.artifact_cap_bytes} > ulimit -f ({soft} bytes)")


def check_submission_json(cfg: Config) -> None:
    """SUBMISSION_JSON may not name an output of this run or another's summary (issue 17)."""
    path = cfg.submission_json
    if not path or cfg.eval_only:
        return
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read(1 << 20))
    except (OSError, ValueError):
        doc = None
    if os.path.realpath(path) in {os.path.realpath(p) for _, p in run_outputs(cfg)} or \
            isinstance(doc, dict) and "stages" in doc:
        raise StartupError(f"SUBMISSION_JSON: {path} is a run's output")


def claim(knob: str, path: str) -> str:
    """Create `path` empty with O_EXCL: of two runs naming one output exactly one gets it (issue 17: an exists() check
    let both write); nothing of the other is touched."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except OSError as e:
        why = "already exists (another run's output)" if isinstance(e, FileExistsError) else f"fails: {e.strerror}"
        raise StartupError(f"{knob}: {path} {why}. Fix: another {knob}") from None
    return path


def release(paths: list[str]) -> None:
    """Remove this run's claims that are still empty."""
    for p in paths:
        if os.path.isfile(p) and not os.path.getsize(p):
            os.unlink(p)


def sweep_temp_files(cfg: Config) -> tuple[list[str], list[str]]:
    """Temp files of killed runs in LOG_DIR and the artifact's folder: (removed: named for this run's claimed outputs,
    which no live run can hold; reported: the rest, whose run may be live)."""
    own = tuple(f".{os.path.basename(p)}." for _, p in run_outputs(cfg, not cfg.eval_only))
    found = {p for k, f in output_folders(cfg)[:2] for p in Path(f).glob(".*.tmp")}
    removed = sorted(str(p) for p in found if p.name.startswith(own))
    for p in removed:
        os.unlink(p)
    return removed, sorted(str(p) for p in found if not p.name.startswith(own))


def demo_layout(data_path: str, tokenizer_path: str) -> bool:
    """True when the two paths are the demo dataset's layout under one root, the only place the demo/tiny presets
    build data themselves (anywhere else a missing file is the user's to fix, and the check says which)."""
    data, tok = demo_paths(Path(data_path).parent.parent)
    return Path(data).resolve() == Path(data_path).resolve() and Path(tok).resolve() == Path(tokenizer_path).resolve()
