"""Issue 27's prepared device check, dry-run on the CPU at tiny dims: `python -m lcq.preflight --gpu-check` runs every
section (attention, warm-up over every warmed bucket, timed steps, kernels against torch, GPTQ on one block, a sliding
and a TTT pass, serialize) without one failing, and prints one JSON line."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_on_cpu_runs_every_section(tmp_path):
    env = dict(os.environ, PRESET="tiny", TTT_ENABLED="1", DATA_PATH=str(tmp_path / "none"), OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "lcq.tools.preflight", "--gpu-check", "--steps", "2"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout
    report = json.loads(lines[0])["gpu_check"]
    sections = ("attention", "warmup", "step", "kernels", "gptq", "eval", "serialize")
    assert all(k in report and "error" not in report[k] for k in sections), report
    assert report["attention"]["backend"] == "sdpa" and "fallback" in report["attention"]["note"]
    warm = report["warmup"]
    assert warm["segments_from"] == "assumed"  # DATA_PATH has no shard: the ladder of ASSUMED_SEGMENTS
    assert [r["cu_size"] for r in warm["rows"]] == warm["buckets"][:warm["warmed"]]
    assert report["step"]["steps"] == 2 and report["step"]["ms_per_step"] > 0
    assert report["kernels"]["runs"] == "torch reference" and report["kernels"]["torch_mlp_ms"] > 0
    assert report["gptq"]["matrices"] == 6  # one block: q, k, v, o, MLP up, down
    assert report["eval"]["ttt_s"] > 0 and report["serialize"]["bytes"] > 0
    # each section also as it ends, on stderr: a check cut off by its time limit still leaves those
    assert all(f"gpu_check {name} " in proc.stderr for name in ("warmup_step", "kernels", "gptq", "serialize", "eval"))
