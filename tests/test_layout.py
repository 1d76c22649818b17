"""The layout the imports draw: two wings (the runtime in lcq/, the tools in lcq/tools/), no import circles, the runtime
never importing a tool except through its one door (lcq/from_repo.py), and the one `lcq` command over the tools."""
import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lcq.tools import cli

REPO = Path(__file__).resolve().parents[1]
DOOR = "lcq.from_repo"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((REPO / "lcq").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _imports(name: str) -> list[tuple[str, bool]]:
    """(lcq module imported, at module level?) for every import statement in the module, lazy ones included."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level \
                else node.module or ""
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            if t in MODULES:
                found.append((t, id(node) in top))
    return found


def _is_tool(name: str) -> bool:
    return name == "lcq.tools" or name.startswith("lcq.tools.")


def test_the_runtime_never_imports_a_tool():
    """Only the door imports the tools wing, and only inside its functions (so it loads in the single-file script,
    where the tools are not). lcq/__init__.py, the repo-only package door for the tools' old names, imports no tool
    either: it compiles the one line that runs a moved tool when `python -m lcq.bench` asks for it."""
    runtime = [m for m in MODULES if not _is_tool(m)]
    assert DOOR in runtime and len(runtime) > 20
    for name in runtime:
        tools = [(t, top) for t, top in _imports(name) if _is_tool(t)]
        if name == DOOR:
            assert tools and not any(top for _, top in tools), f"{DOOR} imports a tool at module level: {tools}"
        else:
            assert not tools, f"runtime module {name} imports {sorted({t for t, _ in tools})}: reach tools through {DOOR}"


def test_the_imports_have_no_circles():
    """Tarjan's strongly connected components over every import of every lcq module (lazy imports included): each
    component is one module, so the modules can be ordered with each importing only those before it."""
    graph = {m: sorted({t for t, _ in _imports(m) if t != m and t != "lcq"}) for m in MODULES}
    index, low, stack, on, circles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for m in graph:
        if m not in index:
            visit(m)
    assert not circles, f"import circles: {circles}"
    assert graph["lcq.tools.bench_ttt"] and "lcq.tools.bench" not in graph["lcq.tools.bench_ttt"]


def test_console_script_lists_every_subcommand(capsys):
    toml = (REPO / "pyproject.toml").read_text(encoding="utf-8")  # tomllib is 3.11+; the project supports 3.10
    assert re.search(r'^\[project\.scripts\]\nlcq = "lcq\.tools\.cli:main"\n', toml, re.M)
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in ("demo", "preflight", "bench", "submission", "data", "bundle"):
        assert re.search(rf"^\s+{name}\b", out, re.M), (name, out)
    assert set(cli.COMMANDS) == {"demo", "preflight", "bench", "submission", "data", "bundle"}


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_each_subcommand_has_help_with_an_example(command, capsys):
    try:
        status = cli.main([command, "--help"])
    except SystemExit as e:
        status = e.code
    assert status in (0, None)
    out = capsys.readouterr().out
    assert f"lcq {command}" in out and re.search(r"^\s+(lcq|python|torchrun|SEED=)\S* ", out, re.M), out[-800:]


def test_old_module_forms_run_the_moved_tool(tmp_path):
    """`python -m lcq.corpus --help` from before the move: the tool runs (its help, exit 0) after a note naming the new
    command; a plain import of an old name says where the module went."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "lcq.corpus", "--help"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage: lcq data" in proc.stdout and "the command is `lcq data`" in proc.stderr
    proc = subprocess.run([sys.executable, "-c", "import lcq.bundle"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and "lcq.bundle moved to lcq.tools.bundle" in proc.stderr, proc.stderr[-2000:]


def test_lcq_demo_runs_the_repo_entry_with_the_demo_preset(monkeypatch, capsys):
    """`lcq demo ARGS` is `python train_gpt.py --preset demo ARGS`: checked with --print_config (no run)."""
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    assert cli.demo(["--print_config", "--seed=7"]) == 0
    out = capsys.readouterr().out
    assert '"preset": "demo"' in out and '"seed": 7' in out


def test_knob_docs_follow_the_config_fields():
    """knob_docs: one entry per Config field in field order, with its group heading, default, record value and
    comment (the README table and --help read it)."""
    import dataclasses

    from lcq.config import PRESETS, Config, _shown, knob_docs

    docs = knob_docs()
    fields = dataclasses.fields(Config)
    assert [d["name"] for d in docs] == [f.name.upper() for f in fields]
    assert all(set(d) == {"group", "name", "default", "record", "comment"} and d["group"] for d in docs)
    by_name = {d["name"]: d for d in docs}
    for f in fields:
        # shown as the environment takes them (bools 1/0, an empty string "")
        assert by_name[f.name.upper()]["default"] == _shown(f.default)
        assert by_name[f.name.upper()]["record"] == _shown(PRESETS["record"].get(f.name, f.default))
    assert by_name["MAX_WALLCLOCK_SECONDS"]["group"] == "budgets"
    assert by_name["MAX_WALLCLOCK_SECONDS"]["comment"].startswith("the challenge's training cap")
    # a comment above the field, then the one after it on its line
    assert by_name["TRAIN_RESERVE_SECONDS"]["comment"].startswith("seconds of the cap kept back")


def test_readme_knob_table_is_current():
    """The README's knob table is what `python -m lcq.tools.knobs` generates from lcq/config.py today."""
    from lcq.tools import knobs

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert knobs.render(readme) == readme, "README.md's knob table is stale: run python -m lcq.tools.knobs"
    # issue 29: a competitor reads it in five minutes; design reasoning lives in docs/ (lower knobs.WIDTH or move text)
    assert len(readme.encode("utf-8")) <= 15_000, len(readme.encode("utf-8"))
    with pytest.raises(ValueError, match="knob table markers"):
        knobs.render("no markers")
