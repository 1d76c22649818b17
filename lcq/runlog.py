"""The run log: rank 0 writes logs/<run_id>.txt (and the console) and logs/<run_id>.json (the summary for tools)."""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .config import Config
from .dist import DistInfo
from .files import atomic_write


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for mod in ("sentencepiece", "brotli", "flash_attn", "flash_attn_interface"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", "installed")
        except Exception:
            out[mod] = None
    out["cuda"] = torch.version.cuda
    return out


def device_name(dinfo: DistInfo) -> str:
    if dinfo.device.type == "cuda":
        return f"{dinfo.world_size}x {torch.cuda.get_device_name(dinfo.device)}"
    return f"{dinfo.world_size}x cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


class RunLog:
    def __init__(self, cfg: Config, dinfo: DistInfo):
        self.cfg, self.dinfo = cfg, dinfo
        self.path = Path(cfg.log_dir) / f"{cfg.run_id}.txt"
        self.json_path = Path(cfg.log_dir) / f"{cfg.run_id}.json"
        self.t_start = time.time()
        self.summary: dict = {"run_id": cfg.run_id, "config": cfg.to_dict(), "stages": {},
                              "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.t_start))}
        if dinfo.is_master:
            # the file is this run's own claim: open_run created it exclusively (issue 17), so no other run's log is
            # ever appended to
            self._fh = open(self.path, "a", encoding="utf-8")
        self.closed = False

    def __call__(self, msg: str = "", console: bool = True) -> None:
        if not self.dinfo.is_master or self.closed:
            return
        if console:
            print(msg, flush=True)
        self._fh.write(msg + "\n")
        self._fh.flush()

    def header(self, extra: dict | None = None) -> None:
        v = versions()
        self.summary.update(versions=v, device=device_name(self.dinfo), world_size=self.dinfo.world_size,
                            command=" ".join([os.path.basename(sys.executable)] + sys.argv))
        self(f"lcq run {self.cfg.run_id} started {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(self.t_start))} UTC")
        self(f"command: {self.summary['command']}")
        self("versions: " + " ".join(f"{k}={val}" for k, val in v.items()))
        self(f"device: {self.summary['device']} world_size:{self.dinfo.world_size}")
        self("config: " + self.cfg.to_json())
        for k, val in (extra or {}).items():
            self(f"{k}: {val}")

    def stage(self, name: str, seconds: float, budget_left: float | None = None, **fields) -> None:
        """One line per pipeline stage: wall time, budget left, and stage facts."""
        self.summary["stages"][name] = dict(seconds=round(seconds, 3), **fields)
        parts = [f"stage:{name}", f"time:{seconds:.2f}s"]
        if budget_left is not None:
            parts.append(f"budget_left:{budget_left:.2f}s")
            self.summary["stages"][name]["budget_left"] = round(budget_left, 3)
        parts += [f"{k}:{val}" for k, val in fields.items()]
        self(" ".join(parts))

    def score(self, stage: str, result) -> None:
        self.summary.setdefault("scores", {})[stage] = dict(val_loss=result.val_loss, val_bpb=result.val_bpb,
                                                           tokens=result.tokens, bytes=result.bytes,
                                                           eval_time_s=round(result.seconds, 3))
        self(f"val_tokens:{result.tokens} val_bytes:{result.bytes}")
        self(f"{stage} val_loss:{result.val_loss:.4f} val_bpb:{result.val_bpb:.4f} eval_time:{result.seconds * 1000:.0f}ms")
        self(f"{stage}_exact val_loss:{result.val_loss:.8f} val_bpb:{result.val_bpb:.8f}")

    def write_summary(self) -> None:
        if self.dinfo.is_master:
            atomic_write(self.json_path, json.dumps(self.summary, indent=2, sort_keys=True) + "\n")

    def fail(self, message: str, status: int, line: str = "error") -> None:
        """A run that stops on an error (or a signal): one `<line>: message` line in the log, and the JSON summary with
        `status` and `error`, then close. Idempotent; a second failure while writing these is reported on stderr only
        (the disk may be full), never raised over the first."""
        if self.closed:
            return
        self.summary["status"] = status
        self.summary["error"] = message
        try:
            self(f"{line}: {message}", console=False)
            self(f"exit_status: {status}", console=False)
            self.write_summary()
        except OSError as e:
            print(f"could not record the failure in {self.path} / {self.json_path}: {e}", file=sys.stderr)
        finally:
            self.close()

    def close(self) -> None:
        if self.dinfo.is_master and not self.closed:
            self._fh.close()
        self.closed = True
