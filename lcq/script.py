"""The bytes of the single-file train_gpt.py this run ships: its length is the code bytes the gate counts.

Kept apart from lcq/bundle.py (which builds that script) so that the script itself carries only this: a bundled run
counts its own file, and only a run from the repo needs the builder.
"""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path


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
    that is a module of this package)."""
    bundle = running_bundle()
    if bundle is not None:
        return Path(bundle[0]).read_bytes()
    if entry_path is None:
        entry_path = getattr(sys.modules.get("__main__"), "__file__", None)
        # A tool of this package (python -m lcq.bench, lcq.preflight) running the pipeline ships the repo's entry
        # script, not itself.
        if entry_path is None or Path(entry_path).resolve().parent == Path(__file__).resolve().parent:
            entry_path = Path(__file__).parents[1] / "train_gpt.py"
    return _rendered(str(Path(entry_path).resolve()))


@functools.lru_cache(maxsize=None)
def _rendered(entry_path: str) -> bytes:
    """Rendered once per process (minify + brotli-11: ~1-2 s on a loaded 2-core CPU; a run asks in LCQ and at the gate),
    from the sources as they were at the first call."""
    from .bundle import package_sources, render  # only a run from the repo builds the script

    return render(Path(entry_path).read_text(encoding="utf-8"), package_sources())
