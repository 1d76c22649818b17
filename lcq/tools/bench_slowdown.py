"""`python -m lcq.bench slowdown`: the same run on this host as it is and throttled to 1/FACTOR of the CPU time (issue
28: a slow box must cost steps, never the run). The throttle is a SIGSTOP/SIGCONT duty cycle on the run's process,
as a cgroup CPU quota would be: every thread of the run (brotli's included) gets 1/FACTOR of the wall clock, from
its `startup_checks:` line (imports and start-up are not on the training clock) to its exit.

    python -m lcq.bench slowdown --factor 4                      # the demo preset
    python -m lcq.bench slowdown --factor 4 --preset tiny --max_wallclock_seconds=16
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ENTRY = Path(__file__).resolve().parents[2] / "train_gpt.py"
PERIOD_MS = 40  # one run + stop cycle; FACTOR 4 = 10 ms running, 30 ms stopped


def throttled(proc: subprocess.Popen, factor: float, timeout_s: float, until: str | None = None) -> list[str]:
    """Duty-cycle `proc` (stdout piped, text) from its `startup_checks:` line until it exits (or prints a line
    starting with `until`): PERIOD_MS / factor running, the rest stopped. Returns its output lines. factor 1 = no
    throttle."""
    lines: list[str] = []
    started, done = threading.Event(), threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("startup_checks:"):
                started.set()
            if until and line.startswith(until):
                done.set()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    end = time.monotonic() + timeout_s
    while factor > 1 and not started.wait(0.05) and proc.poll() is None and time.monotonic() < end:
        pass
    run_s = PERIOD_MS / 1000 / factor
    try:
        while factor > 1 and proc.poll() is None and not done.is_set() and time.monotonic() < end:
            time.sleep(run_s)
            os.kill(proc.pid, signal.SIGSTOP)
            time.sleep(PERIOD_MS / 1000 - run_s)
            os.kill(proc.pid, signal.SIGCONT)
    except ProcessLookupError:
        pass
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
    proc.wait(timeout=max(1.0, end - time.monotonic()))
    reader.join(timeout=10)
    return lines


def run_throttled(argv: list[str], env: dict, cwd: str | os.PathLike, factor: float, timeout_s: float = 1800,
                  until: str | None = None):
    """train_gpt.py with `argv` and `env`, throttled by `factor` (see throttled): (exit status, output, JSON summary
    or None)."""
    proc = subprocess.Popen([sys.executable, str(ENTRY), *argv], env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    out = "".join(throttled(proc, factor, timeout_s, until))
    summary = Path(cwd, "logs", f"{env['RUN_ID']}.json")
    return proc.returncode, out, json.loads(summary.read_text()) if summary.exists() else None


def bench_slowdown(argv: list[str], factor: float) -> dict:
    """Two arms run one after the other in the current folder: as is, and throttled by `factor`."""
    arms = {}
    for name, f in (("quiet", 1.0), (f"slow{factor:g}x", factor)):
        env = dict(os.environ, RUN_ID=f"slowdown_{name}_{time.strftime('%H%M%S')}", SUBMISSION_JSON="")
        status, out, summary = run_throttled(argv, env, ".", f)
        s = summary or {}
        arms[name] = dict(exit_status=status, steps=(s.get("train") or {}).get("steps"),
                          train_clock_s=s.get("train_clock_s"),
                          val_bpb=(s.get("final") or {}).get("val_bpb"),
                          cap_s=(s.get("config") or {}).get("max_wallclock_seconds"),
                          projection=next((ln.strip() for ln in reversed(out.splitlines())
                                           if ln.startswith("post_train_projection:")), None))
        print(f"{name}: exit {status}, {arms[name]['steps']} steps, training clock {arms[name]['train_clock_s']} s "
              f"of {arms[name]['cap_s']} s, val_bpb {arms[name]['val_bpb']}; {arms[name]['projection']}", flush=True)
    quiet, slow = arms["quiet"], arms[f"slow{factor:g}x"]
    steps_ratio = slow["steps"] / quiet["steps"] if quiet["steps"] and slow["steps"] is not None else None
    print(f"steps slow/quiet: {steps_ratio}", flush=True)
    return dict(bench="slowdown", factor=factor, arms=arms, steps_ratio=steps_ratio,
                all_exit_0=all(a["exit_status"] == 0 for a in arms.values()))
