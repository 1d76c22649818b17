"""The bytes of the single-file train_gpt.py this run ships: its length is the code bytes the gate counts.

A bundled run counts its own file; a run from the repo renders the script with the builder (lcq/tools/bundle.py, which
is not shipped), through lcq/from_repo.py.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from .from_repo import rendered_script


def running_bundle():
    """(path, sources) when this process runs from a bundled script, else None."""
    for finder in sys.meta_path:
        path = getattr(finder, "lcq_bundle_path", None)
        if path:
            return path, finder.sources
    return None


def shipped_script(entry_path: str | os.PathLike | None = None) -> bytes:
    """The exact bytes of the single-file script this run ships: the running bundle itself, or the bundle rendered from
    the package sources and the entry script (default: the __main__ script being run, or the repo's train_gpt.py when
    that is a tool)."""
    bundle = running_bundle()
    if bundle is not None:
        return Path(bundle[0]).read_bytes()
    if entry_path is None:
        entry_path = getattr(sys.modules.get("__main__"), "__file__", None) or ""
        # A tool (lcq bench, lcq preflight: the `lcq` console script or a module under lcq/) running the pipeline
        # ships the repo's entry script, not itself.
        package = Path(__file__).resolve().parent
        if not entry_path.endswith(".py") or package in Path(entry_path).resolve().parents:
            entry_path = package.parent / "train_gpt.py"
    return rendered_script(str(Path(entry_path).resolve()))
