"""lcq: Parameter Golf submission harness (train -> GPTQ -> LCQ -> artifact gate -> eval -> submit).

The runtime wing is every module directly in this folder: what a run imports, shipped whole in the single-file script.
The tools wing is lcq/tools/ (the `lcq` command). This file is the package's door in the repo only (the single-file
script's loader makes its own empty `lcq` package): it keeps the tools' old names working, `python -m lcq.bench ...`
(and preflight, submission, corpus, bundle) run the moved tool after a note naming the new command.
"""
import importlib.util
import sys

_MOVED = ("lcq.bench", "lcq.preflight", "lcq.submission", "lcq.corpus", "lcq.bundle")


class _Moved:
    """A meta-path finder for the old names (first, so no stale copy of a tool answers them): a spec whose code runs
    the tool (what `python -m` asks for); a plain import is refused with the new name."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in _MOVED else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise ImportError(f"{module.__name__} moved to lcq.tools.{module.__name__[4:]}: import it from there")

    def get_code(self, name):
        return compile(f"from lcq.tools.cli import moved\nmoved({name!r})\n", f"<{name}>", "exec")


if not any(isinstance(f, _Moved) for f in sys.meta_path):
    sys.meta_path.insert(0, _Moved())
