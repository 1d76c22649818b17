"""The one door from the runtime to the tools wing (lcq/tools, never shipped): what a run can do only from the repo.

- ensure_demo: the demo/tiny presets build their dataset on first use (lcq/tools/corpus.py); a bundled run reads the
  data that exists.
- rendered_script: a run from the repo counts its code bytes by rendering the single-file script it ships
  (lcq/tools/bundle.py); a bundled run reads its own file instead (lcq/script.py).
Both import the tool inside the function, so this module loads in the single-file script too; there a call gets the
loader's ImportError ("lcq.tools is not bundled: run from the lcq repo"). tests/test_layout.py holds the rule: no other runtime module imports
lcq.tools, and this one only inside functions.
"""
from __future__ import annotations

import functools
from pathlib import Path


def ensure_demo(data_path: str, tokenizer_path: str) -> None:
    from .tools.corpus import ensure_demo

    ensure_demo(data_path, tokenizer_path)


@functools.lru_cache(maxsize=None)
def rendered_script(entry_path: str) -> bytes:
    """Rendered once per process (minify + brotli-11: ~1-2 s on a loaded 2-core CPU; a run asks in LCQ and at the gate),
    from the sources as they were at the first call."""
    from .tools.bundle import package_sources, render

    return render(Path(entry_path).read_text(encoding="utf-8"), package_sources())
