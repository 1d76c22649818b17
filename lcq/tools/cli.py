"""`lcq`: one command for everything around a run (pyproject.toml [project.scripts]). The run itself stays
`train_gpt.py`, the entry point the competition expects.

    lcq demo                         # python train_gpt.py --preset demo: the CPU demo, its data built on first use
    lcq preflight                    # will the record preset fit on this box? go/no-go rows before a paid run
    lcq bench NAME                   # measurements side by side: quant, lcq, ttt, serialize, step, ... (lcq bench -h)
    lcq submission build|audit       # a record folder from run logs; re-check one from its own files
    lcq data download|demo|text      # the official shards (--variant caseops for the record preset), the demo set
    lcq bundle --out FILE            # the single-file train_gpt.py that ships, and its code bytes

Each subcommand takes the tool's own arguments (`lcq bench --help`). Under torchrun, run the tools' module:
`torchrun --standalone --nproc_per_node=8 -m lcq.tools preflight` (every rank runs it, rank 0 prints), or give
torchrun the console script's path (`$(command -v lcq) preflight`).
"""
from __future__ import annotations

import argparse
import importlib
import runpy
import sys
from pathlib import Path

# subcommand -> (module under lcq.tools whose main(argv) it runs, one-line help with an example)
COMMANDS = {
    "demo": (None, "train and score the demo preset on CPU (python train_gpt.py --preset demo); e.g. lcq demo "
                   "--seed=7"),
    "preflight": ("preflight", "go/no-go for a preset on this box before the paid run; e.g. lcq preflight --preset demo "
                               "--steps 10"),
    "bench": ("bench", "benchmarks, measured side by side, one JSON line each; e.g. lcq bench quant --preset tiny"),
    "submission": ("submission", "record folder from run logs, and its audit; e.g. lcq submission audit "
                                 "submission/2026-04-30_my_run"),
    "data": ("corpus", "datasets: official download, demo, your text; e.g. lcq data download --variant caseops"),
    "bundle": ("bundle", "write the single-file train_gpt.py that ships; e.g. lcq bundle --out /tmp/s.py"),
}
ENTRY = Path(__file__).resolve().parents[2] / "train_gpt.py"
DEMO_HELP = f"""usage: lcq demo [--field_name=value ...]

The CPU demo: python {ENTRY.name} --preset demo (the run's own entry point, {ENTRY}). The demo dataset is built under
data/demo/ on first use; every knob works as in a run (FIELD_NAME=value in the environment or --field_name=value).

example:
  lcq demo                        # ~3 minutes on a 2-core CPU: train, GPTQ, LCQ, artifact gate, eval of what ships
  SEED=7 lcq demo --val_max_tokens=20000
"""


def demo(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(DEMO_HELP, end="")
        return 0
    if not ENTRY.is_file():
        print(f"lcq demo runs the repo's {ENTRY.name}, which is not at {ENTRY}: run it from a clone of the repo",
              file=sys.stderr)
        return 2
    sys.argv = [str(ENTRY), "--preset", "demo", *argv]
    try:
        runpy.run_path(str(ENTRY), run_name="__main__")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lcq", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, text) in COMMANDS.items():
        sub.add_parser(name, help=text)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:  # --help, or a name that is not a command: argparse says which exist
        parser().parse_args(argv)
    module = COMMANDS[argv[0]][0]
    if module is None:
        return demo(argv[1:])
    status = importlib.import_module(f"{__package__}.{module}").main(argv[1:])
    return 0 if status is None else status


def moved(old: str) -> None:
    """`python -m lcq.bench` and the other tools' names from before they moved to lcq/tools/ (lcq/__init__.py routes
    them here): run the tool, after a note naming its new command."""
    name = old.split(".")[1]
    command = next(c for c, (m, _) in COMMANDS.items() if m == name)
    print(f"note: {old} is now lcq.tools.{name}; the command is `lcq {command}`", file=sys.stderr)
    runpy.run_module(f"{__package__}.{name}", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    sys.exit(main())
