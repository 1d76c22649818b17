"""The single-file script: minification that keeps the program, the literal encoding, the module list, a run from it."""
import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from lcq.tools import bundle
from lcq.tools.bundle import TOOLS, entry_imports, latin1_literal, package_sources, render, strip_source

REPO = Path(__file__).resolve().parents[1]


def test_strip_source_keeps_the_program():
    code = '"""module doc"""\nimport os  # a comment\n\ndef f(x: int) -> int:\n    """doc"""\n    y: int = 1\n    if x:\n        return x + y  # why\n' \
           '    return 0\n\nclass C:\n    """only a docstring"""\n\ndef deco(g):\n    return g\n\n@deco\ndef h(y: "keep") -> "kept":\n' \
           '    return y\n'
    out = strip_source(code)
    # docstrings, comments, plain signatures' annotations and function-local ones
    assert "doc" not in out and "#" not in out and "int" not in out
    assert "'keep'" in out and "'kept'" in out  # a decorator may read annotations (custom_op, triton.jit): kept
    # one space per indentation level, no spaces the tokenizer does not need, a one-statement suite on its header's
    # line; the local `y: int = 1` lost its annotation
    assert re.search(r"\n (\w+)=1\n if x:return x\+\1\n return 0\n", out) and "\ndef deco(g):return g\n" in out
    # consecutive simple statements share a line, and such a line joins its header
    assert strip_source("def f(a):\n    if a:\n        a = 2\n        a += 1\n    return a\n") == "def f(a):\n if a:a=2;a+=1\n return a\n"
    ns = {}
    exec(compile(out, "<t>", "exec"), ns)
    assert ns["f"](2) == 3 and ns["f"](0) == 0 and isinstance(ns["C"](), ns["C"]) and ns["h"](5) == 5


def test_stripped_package_has_the_same_code_objects():
    """Every shipped module, minified, parses to the documented source's tree minus docstrings and the annotations of
    undecorated signatures, with only function-local names renamed; nothing else changes."""
    for name, code in dict(package_sources(), __entry__=(REPO / "train_gpt.py").read_text()).items():
        expected = bundle._drop_docstrings_and_signature_annotations(ast.parse(code))
        out = strip_source(code)
        assert bundle.alpha_mismatch(expected, ast.parse(out)) is None, name
        plain = ast.unparse(expected) + "\n"
        assert len(out) < len(plain) or "\n " not in plain, f"{name}: the 1-space re-indent fell back to 4 spaces"
        unsqueezed = bundle._reindent(ast.unparse(bundle.rename_locals(expected))) + "\n"
        assert len(out) < len(unsqueezed) or "=" not in plain, f"{name}: squeeze fell back to ast.unparse's spacing"


TRICKY = '''
import os
LIMIT = 3
def helper(value, scale=2):
    total = 0
    for item in range(value):
        total += item * scale
    squares = [item * item for item in range(value)]
    def inner(step):
        return total + step
    adder = lambda item: item + LIMIT
    try:
        raise KeyError(value)
    except KeyError as error:
        caught = error.args[0]
    return inner(1), sum(squares), adder(total), caught, helper2(scale=scale)
def helper2(scale):
    return scale * LIMIT
def counter():
    count = 0
    def bump():
        nonlocal count
        count += 1
        return count
    bump()
    return bump()
def uses_locals():
    secret = 5
    return locals()["secret"]
def makes_class():
    field = 7
    class Box:
        field = 8
    return Box.field + field
def shadows_global():
    global LIMIT
    LIMIT = LIMIT + 1
    return LIMIT
class Thing:
    def __init__(self, size):
        self.size = size
    def grow(self, by):
        bigger = self.size + by
        return Thing(size=bigger).size
    @staticmethod
    def pure(self_like):
        return self_like * 2
'''


def test_renaming_keeps_behaviour_and_only_touches_locals():
    """Known answers from the documented and the minified program; parameters (passable by keyword), globals,
    nonlocals, class bodies and locals() users keep their names; everything renamed is consistent inside its function."""
    out = strip_source(TRICKY)
    results = []
    for src in (TRICKY, out):
        ns = {}
        exec(compile(src, "<t>", "exec"), ns)
        results.append((ns["helper"](4), ns["counter"](), ns["uses_locals"](), ns["makes_class"](), ns["shadows_global"](),
                        ns["Thing"](3).grow(by=2), ns["Thing"].pure(5)))
    assert results[0] == results[1] == ((13, 14, 15, 4, 6), 2, 5, 15, 4, 5, 10)
    for kept in ("value", "scale", "count", "secret", "field", "LIMIT", "size", "by", "self_like", "helper2"):
        assert kept in out, kept
    for gone in ("total", "squares", "adder", "caught", "bigger", "self"):
        assert not re.search(rf"\b{gone}\b", out), gone
    assert bundle.alpha_mismatch(ast.parse(TRICKY), ast.parse(out)) is None


def test_alpha_mismatch_refuses_renamings_that_change_the_program():
    src = "G = 1\ndef f(a):\n    x = a\n    y = G\n    return x + y\n"
    ok = "G = 1\ndef f(a):\n    b = a\n    y = G\n    return b + y\n"
    assert bundle.alpha_mismatch(ast.parse(src), ast.parse(ok)) is None
    bad = {
        "a global renamed": "G = 1\ndef f(a):\n    x = a\n    y = H\n    return x + y\n",
        "two locals merged": "G = 1\ndef f(a):\n    b = a\n    b = G\n    return b + b\n",
        "renamed to a name the module uses": "G = 1\ndef f(a):\n    G = a\n    y = G\n    return G + y\n",
        "inconsistent": "G = 1\ndef f(a):\n    b = a\n    y = G\n    return c + y\n",
        "a constant changed": "G = 2\ndef f(a):\n    x = a\n    y = G\n    return x + y\n",
    }
    for why, other in bad.items():
        assert bundle.alpha_mismatch(ast.parse(src), ast.parse(other)) is not None, why


def test_squeeze_keeps_the_tokens_apart_where_it_must():
    src = "x = 1 .real\ny = f'{{a}} {x!r:>4}' + 'b'\nz = [i for i in range(3) if i in (1, 2)]\nw = -x if x else not y\n"
    out = bundle._squeeze(src)
    assert ast.dump(ast.parse(out)) == ast.dump(ast.parse(src))
    assert "1 .real" in out and "f'{{a}} {x!r:>4}'" in out and "for i in range(3)if i in(1,2)" in out
    assert len(out) < len(src)


def test_what_ships_is_what_the_entry_imports():
    """The bundle ships every module directly in lcq/ (no list to keep), and that is exactly the runtime: what
    train_gpt.py reaches (at module level or in a function, through any lcq module) outside the tools wing. A module in
    lcq/ that no run imports belongs in lcq/tools/."""
    reached = entry_imports((REPO / "train_gpt.py").read_text(encoding="utf-8"))
    shipped = set(package_sources())
    runtime = {m for m in reached if m != TOOLS and not m.startswith(TOOLS + ".")}
    assert shipped == {"lcq"} | {f"lcq.{p.stem}" for p in (REPO / "lcq").glob("*.py") if p.stem != "__init__"}
    assert runtime <= shipped, f"{sorted(runtime - shipped)} are imported by a run but not shipped"
    assert shipped <= runtime, f"{sorted(shipped - runtime)} are shipped but never imported by a run: move to lcq/tools/"
    # the run reaches the tools wing only through lcq/from_repo.py (tests/test_layout.py): the demo build, the renderer
    assert reached - runtime == {"lcq.tools.corpus", "lcq.tools.bundle"}


def test_latin1_literal_round_trips_every_byte(tmp_path):
    # Every byte value, then the awkward cases: quote runs, a trailing quote, NUL before a digit, CR and CRLF, backslashes.
    blob = bytes(range(256)) + b"''x'''y\\'\0" + b"7\0a\r\n\\\\" + b"\x00" + b"'"
    body = latin1_literal(blob)
    assert b"\0" not in body and b"\r" not in body and b"'''" not in body  # an ending quote is escaped
    assert len(body) <= len(blob) * 1.1  # the escapes are rare; base85 would be +25%
    src = tmp_path / "lit.py"
    src.write_bytes(b"#coding:latin-1\nB='''" + body + b"'''.encode('latin-1')\n")
    ns = {}
    exec(compile(src.read_bytes(), str(src), "exec"), ns)
    assert ns["B"] == blob


def test_render_is_deterministic_and_leaves_out_tooling():
    sources = package_sources()
    assert not any(name.startswith(TOOLS) for name in sources)
    few = {k: sources[k] for k in ("lcq", "lcq.dist", "lcq.script")}
    assert render("print(1)\n", few) == render("print(1)\n", dict(reversed(list(few.items()))))


def test_bundle_runs_from_an_empty_dir_without_lcq(tmp_path):
    """The script alone: lcq is not importable (a poisoned package first on the path), the cwd is empty. --print_config
    imports every module train_gpt.py imports at module level; a left-out module gets an ImportError naming it."""
    script = tmp_path / "train_gpt.py"
    script.write_bytes(render((REPO / "train_gpt.py").read_text(encoding="utf-8"), package_sources()))
    poison = tmp_path / "poison" / "lcq"
    poison.mkdir(parents=True)
    (poison / "__init__.py").write_text("raise ImportError('the bundle must not import lcq from disk')\n")
    run_dir = tmp_path / "empty"
    run_dir.mkdir()
    # One interpreter (torch imports once): run the script as __main__, then ask its loader for a left-out module.
    probe = ("import runpy,sys\nsys.argv=[sys.argv[1],'--print_config']\ntry:runpy.run_path(sys.argv[0],run_name='__main__')\n"
             "except SystemExit as e:assert e.code==0,e\nimport lcq.script\nassert lcq.script.running_bundle()\n"
             # triton.jit reads its kernels' source: the loader serves it (get_source), else the import fails on CUDA
             "import lcq.kernels as k\nassert k.triton is None or 'tl.dot' in k._up_kernel.src\n"
             "try:import lcq.tools.corpus\nexcept ImportError as e:print(e,file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", probe, str(script)], cwd=run_dir, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(poison.parent), OMP_NUM_THREADS="1"), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["preset"] == "record"
    assert "lcq.tools is not bundled: run from the lcq repo" in proc.stderr, proc.stderr[-2000:]


def test_a_package_tool_as_main_ships_the_repo_entry(monkeypatch):
    """`lcq bench` / `lcq preflight` (the console script) and `python -m lcq.tools.bench` run the pipeline with their own
    file as __main__: the code bytes they count are those of the script a run ships (the repo's train_gpt.py as
    entry), not a bundle of the tool."""
    from lcq import script

    main = sys.modules["__main__"]
    want = script.shipped_script(REPO / "train_gpt.py")
    for tool in (REPO / "lcq" / "tools" / "bench.py", Path(sys.executable).parent / "lcq"):
        monkeypatch.setattr(main, "__file__", str(tool), raising=False)
        assert script.shipped_script() == want, tool
