import ast

from lcq.bundle import package_sources, render, strip_source


def test_strip_source_keeps_the_program():
    code = '"""module doc"""\nimport os  # a comment\n\ndef f(x):\n    """doc"""\n    return x + 1  # why\n\n' \
           'class C:\n    """only a docstring"""\n'
    out = strip_source(code)
    assert "doc" not in out and "#" not in out
    ns = {}
    exec(compile(out, "<t>", "exec"), ns)
    assert ns["f"](2) == 3 and isinstance(ns["C"](), ns["C"])


def test_stripped_package_has_the_same_code_objects():
    for name, code in package_sources().items():
        stripped = ast.parse(strip_source(code))
        original = ast.parse(code)
        for node in ast.walk(original):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                b = node.body
                if b and isinstance(b[0], ast.Expr) and isinstance(b[0].value, ast.Constant) and isinstance(b[0].value.value, str):
                    node.body = b[1:] or [ast.Pass()]
        assert ast.dump(stripped) == ast.dump(original), name


def test_render_is_deterministic_and_excludes_tooling():
    sources = package_sources()
    assert "lcq.bench" not in sources and "lcq.submission" not in sources and "lcq.pipeline" in sources
    assert render("print(1)\n", sources) == render("print(1)\n", dict(reversed(list(sources.items()))))
