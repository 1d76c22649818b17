"""The single-file train_gpt.py a reviewer runs; its byte length is the code bytes the gate counts.

The challenge counts the code of one script. We generate it from the package: a short loader that carries the sources of
the runtime wing (every module directly in lcq/; the tools in lcq/tools/ stay out) and imports them from memory, then
runs the entry script's code as __main__. Public runs were flagged for logging raw-source bytes while shipping a
compressed wrapper (docs/code-bytes.md); here the counted bytes are always the bytes of the file that ships.

How the bytes are spent (measured by `lcq bundle --compare`, figures in BENCHMARKS.md):
- Sources are minified without changing the program: docstrings and comments dropped, indentation 1 space, annotations
  dropped from undecorated functions' signatures (a decorator may read them: torch.library.custom_op, triton.jit) and
  from assignments in function bodies (`x: T = v`: Python never evaluates those, PEP 526), no
  space the tokenizer does not need, consecutive simple statements on one line (`;`) and a suite of them on its
  header's line, and each function's local names (never its parameters) shortened to names the
  module does not use (rename_locals; alpha_mismatch checks every render against the documented tree). The re-indented,
  squeezed and joined texts must parse to the same tree (else that step is skipped); tests/test_bundle.py checks that every
  shipped module parses to the documented source's tree minus exactly those changes.
- Modules joined as `\\0name\\nsource` records (JSON escaping of every newline and quote cost ~0.5%).
- brotli quality 11 (window 2^24), a few percent smaller than lzma -9e (raw LZMA2, lc3 pb0) on this text; a run already
  needs brotli (lcq/artifact.py imports it), so the script depends on nothing new. #1855 also ships brotli + base85.
- The compressed bytes sit in a latin-1 string literal (`# coding: latin-1`, only backslash, CR, NUL and some quotes
  escaped: ~1.2% overhead) instead of base85 (+25%) or base64 (+33%). The file is valid Python anywhere; it is not
  UTF-8 text, so do not open and re-save it in an editor: regenerate it.

    lcq bundle --out submission_train_gpt.py
"""
from __future__ import annotations

import argparse
import ast
import base64
import builtins
import copy
import io
import itertools
import keyword
import lzma
import os
import string
import sys
import tokenize
import zlib
from pathlib import Path

import brotli

from ..files import atomic_write

PACKAGE_DIR = Path(__file__).resolve().parents[1]
# What ships: the runtime wing, every module directly in lcq/ (a new one ships without being listed), with an empty
# package `lcq` (lcq/__init__.py only routes the tools' old names in the repo). Nothing in a subfolder ships:
# lcq/tools/ is the tools wing (this builder, benches, preflight, submission, corpus), which a run reaches only from the
# repo through lcq/from_repo.py; the loader answers an import of it with "run from the lcq repo".
TOOLS = "lcq.tools"


HEADER = b'''\
#coding:latin-1
# lcq's sources in brotli (made by lcq bundle; do not edit)
import brotli,importlib.abc as A,importlib.util as U,sys
class _Bundle(A.MetaPathFinder,A.Loader):
 def __init__(s,p,b):s.lcq_bundle_path=p;s.sources=dict(r.split("\\n",1)for r in brotli.decompress(b).decode().split("\\0")[1:])
 def find_spec(s,n,*a):
  if n in s.sources and n!="__entry__":return U.spec_from_loader(n,s,is_package=n=="lcq")
  if n[:4]=="lcq.":raise ImportError(n+" is not bundled: run from the lcq repo")
 def get_source(s,n):return s.sources[n]
 def exec_module(s,m):m.__file__="<lcq-bundle>/"+m.__name__.replace(".","/")+".py";exec(compile(s.sources[m.__name__],m.__file__,"exec"),m.__dict__)
_b=_Bundle(__file__,'''
FOOTER = b'''.encode("latin-1"))
sys.meta_path.insert(0,_b)
exec(compile(_b.sources["__entry__"],__file__,"exec"))
'''


def _drop_docstrings_and_signature_annotations(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.decorator_list:
            node.returns = None
            args = node.args
            for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
                if arg is not None:
                    arg.annotation = None
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            _LocalAnnotations().visit(node)
    return tree


class _LocalAnnotations(ast.NodeTransformer):
    """`x: T = v` -> `x = v` in a function's body (`self._plan: list[...] = []`): Python never evaluates nor stores
    the annotations of a function's assignments (PEP 526). A bare `x: T` stays (it makes x local), and so does a class
    body's (a dataclass reads it)."""

    def visit_ClassDef(self, node: ast.ClassDef) -> ast.ClassDef:
        return node

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.AST:
        if node.value is None:
            return node
        return ast.copy_location(ast.Assign(targets=[node.target], value=node.value), node)


def strip_source(code: str, squeeze: bool = True, rename: bool = True) -> str:
    """The same program in fewer bytes (see the module docstring): every byte of the script counts against the cap, and
    documentation does not change what runs. The repo keeps the documented sources. squeeze/rename off: only for
    `--compare`, which shows what each step saves."""
    tree = _drop_docstrings_and_signature_annotations(ast.parse(code))
    renamed = tree
    if rename:
        renamed = rename_locals(copy.deepcopy(tree))
        mismatch = alpha_mismatch(tree, renamed)
        if mismatch:  # a bug in rename_locals, never expected: refuse to ship a changed program
            raise AssertionError(f"lcq.bundle: renaming changed the program: {mismatch}")
    out = ast.unparse(renamed)
    want = ast.dump(ast.parse(out))  # each step below is kept only if its text parses to this same tree
    for step in (_reindent, _squeeze, _semicolons, _join_suites) if squeeze else (_reindent,):
        shorter = step(out)
        if ast.dump(ast.parse(shorter)) == want:
            out = shorter
    return out + "\n"


def _reindent(out: str) -> str:
    """ast.unparse indents by 4 and writes every string on one line except a docstring-position constant, so a line's
    leading spaces are its indentation: 1 space per level instead (strip_source checks the result's tree)."""
    return "\n".join(" " * ((len(line) - len(line.lstrip(" "))) // 4) + line.lstrip(" ") for line in out.split("\n"))


def _squeeze(src: str) -> str:
    """Drop every space the tokenizer does not need (`x = f(a, b)` -> `x=f(a,b)`), keeping each token's own text. An
    f-string is copied whole (Python 3.12 splits it into tokens whose text is not its source). The caller checks that the
    result parses to the same tree."""
    lines = src.split("\n")
    out, prev_end, fstring = [], None, None
    f_start, f_end = getattr(tokenize, "FSTRING_START", None), getattr(tokenize, "FSTRING_END", None)
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type in (tokenize.NL, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            continue
        if tok.type == tokenize.NEWLINE:
            out.append("\n")
            prev_end = None
            continue
        if fstring is not None:  # inside an f-string: wait for its end, then copy its source span
            fstring[1] += (tok.type == f_start) - (tok.type == f_end)
            if fstring[1]:
                continue
            (row, col) = fstring[0]
            if tok.end[0] != row:
                return src  # a multi-line f-string: leave the module as ast.unparse wrote it
            tok = tok._replace(string=lines[row - 1][col:tok.end[1]], start=(row, col))
            fstring = None
        elif tok.type == f_start:
            fstring = [tok.start, 1]
            continue
        text = tok.string
        if prev_end is None:
            out.append(" " * tok.start[1])  # the line's indentation
        elif (prev_end[-1:].isalnum() or prev_end[-1:] == "_") and (text[:1].isalnum() or text[:1] in "_'\"") \
                or (prev_end[-1:].isdigit() and text[:1] == "."):
            out.append(" ")  # `return x`, `1 .real`: the two tokens would run together
        out.append(text)
        prev_end = text
    return "".join(out).rstrip("\n")


_COMPOUND = ("if ", "if(", "for ", "for(", "while ", "while(", "with ", "with(", "try:", "def ", "class ", "async ", "@",
             "match ", "match(")


_CLAUSES = _COMPOUND + ("else", "elif ", "elif(", "except", "finally")


def _semicolons(src: str) -> str:
    """Consecutive simple statements at one depth share a line (`a=1\n  b=2` -> `a=1;b=2`), saving each one's newline
    and indentation. A line that ends in `:` or starts a compound statement or clause takes no part. The caller checks
    that the result parses to the same tree."""
    out = []
    for line in src.split("\n"):
        text = line.lstrip(" ")
        if out and not line.endswith(":") and not text.startswith(_CLAUSES):
            prev = out[-1]
            before = prev.lstrip(" ")
            if len(prev) - len(before) == len(line) - len(text) and not prev.endswith(":") \
                    and not before.startswith(_CLAUSES):
                out[-1] = prev + ";" + text
                continue
        out.append(line)
    return "\n".join(out)


def _join_suites(src: str) -> str:
    """A suite of one line of simple statements moves up onto its header line (`if x:\n  return y` -> `if x:return y`), saving
    its newline and indentation. On the 1-space text: a line ending in `:` is a compound statement's header (the
    unparsed text has one statement per line and no comments), the next line is one level deeper, the line after it
    is not. The caller checks that the result parses to the same tree."""
    lines = src.split("\n")
    depth = [len(line) - len(line.lstrip(" ")) for line in lines]
    out, i = [], 0
    while i < len(lines):
        line = lines[i]
        if line.endswith(":") and i + 1 < len(lines) and depth[i + 1] == depth[i] + 1 \
                and (i + 2 == len(lines) or depth[i + 2] <= depth[i]) and not lines[i + 1].lstrip(" ").startswith(_COMPOUND):
            out.append(line + lines[i + 1].lstrip(" "))
            i += 2
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


# Renaming: inside each function (a method, or a function at module level), the names it binds become the shortest
# identifiers the module does not use anywhere, most frequent first (`self` included). What keeps the program the same:
# - only names that are not parameters (a caller may pass them by keyword), not imported, not declared global or
#   nonlocal, not a module-level name or builtin (so no reference in the function can mean something outside it), and
#   not the name of a nested def;
# - functions that define a class (class bodies make attributes of their names) or call locals/vars/eval/exec/globals
#   are left alone;
# - the new names occur nowhere in the module, so nothing is captured.
# alpha_mismatch checks the result against the original tree on every render.
_DYNAMIC = frozenset({"locals", "vars", "eval", "exec", "globals"})


def _identifiers(tree: ast.AST) -> set[str]:
    out = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Name):
            out.add(n.id)
        elif isinstance(n, ast.Attribute):
            out.add(n.attr)
        elif isinstance(n, ast.arg):
            out.add(n.arg)
        elif isinstance(n, ast.keyword) and n.arg:
            out.add(n.arg)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(n.name)
        elif isinstance(n, ast.alias):
            out |= {n.name.split(".")[0], n.asname or ""}
        elif isinstance(n, (ast.Global, ast.Nonlocal)):
            out |= set(n.names)
        elif isinstance(n, ast.ExceptHandler) and n.name:
            out.add(n.name)
    return out


def _module_names(tree: ast.Module) -> set[str]:
    out = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            out |= {(a.asname or a.name).split(".")[0] for a in node.names}
        else:
            out |= {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    return out


def _short_names(avoid: set[str]):
    for size in itertools.count(1):
        for letters in itertools.product(string.ascii_letters, repeat=size):
            name = "".join(letters)
            if name not in avoid and not keyword.iskeyword(name) and not hasattr(builtins, name):
                yield name


def _top_functions(tree: ast.Module):
    """(function, is_method) for the functions at module level and the methods of module-level classes."""
    def walk(body, in_class):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield node, in_class
            elif isinstance(node, ast.ClassDef):
                yield from walk(node.body, True)
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                yield from walk(node.body + node.orelse if hasattr(node, "orelse") else node.body, in_class)
    yield from walk(tree.body, False)


def _renamable(fn: ast.AST, is_method: bool, outside: set[str]) -> set[str]:
    nodes = list(ast.walk(fn))
    if any(isinstance(n, (ast.ClassDef, ast.Match)) for n in nodes) or \
            any(isinstance(n, ast.Name) and n.id in _DYNAMIC for n in nodes):
        return set()
    params, fixed, bound = [], set(outside), set()
    for n in nodes:
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            a = n.args
            params += [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg) if x is not None]
            if n is not fn and not isinstance(n, ast.Lambda):
                fixed.add(n.name)
        elif isinstance(n, (ast.Global, ast.Nonlocal)):
            fixed |= set(n.names)
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            fixed |= {(a.asname or a.name).split(".")[0] for a in n.names}
        elif isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del)):
            bound.add(n.id)
        elif isinstance(n, ast.ExceptHandler) and n.name:
            bound.add(n.name)
    names = {x for x in bound - fixed - set(params) if not hasattr(builtins, x) and not x.startswith("__")}
    first = fn.args.args[0].arg if fn.args.args else None
    is_static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in fn.decorator_list)
    if is_method and not is_static and first == "self" and params.count("self") == 1 and "self" not in fixed:
        names.add("self")
    return names


def rename_locals(tree: ast.Module) -> ast.Module:
    """Shorten the local names of every function in place (rules above); returns the tree."""
    avoid = _identifiers(tree)
    outside = _module_names(tree)
    for fn, is_method in _top_functions(tree):
        names = _renamable(fn, is_method, outside)
        if not names:
            continue
        nodes = list(ast.walk(fn))
        count = dict.fromkeys(names, 0)
        for n in nodes:
            for field in ("id", "arg", "name"):
                value = getattr(n, field, None)
                if isinstance(value, str) and value in count and not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    count[value] += 1
        new = dict(zip(sorted(names, key=lambda x: (-count[x], x)), _short_names(avoid)))
        for n in nodes:
            if isinstance(n, ast.Name) and n.id in new:
                n.id = new[n.id]
            elif isinstance(n, ast.arg) and n.arg in new:
                n.arg = new[n.arg]
            elif isinstance(n, ast.ExceptHandler) and n.name in new:
                n.name = new[n.name]
    return tree


def alpha_mismatch(before: ast.AST, after: ast.AST) -> str | None:
    """None when `after` is `before` with, inside each function, its local names consistently and injectively renamed
    to names unused in `before` (rename_locals' contract); else where they differ. Everything else must be equal."""
    used = _identifiers(before) | set(dir(builtins))
    outside = _module_names(before) if isinstance(before, ast.Module) else set()

    def compare(a, b, where, maps):
        if type(a) is not type(b):
            return f"{where}: {type(a).__name__} vs {type(b).__name__}"
        if isinstance(a, list):
            if len(a) != len(b):
                return f"{where}: {len(a)} vs {len(b)} items"
            for i, (x, y) in enumerate(zip(a, b)):
                if (err := compare(x, y, f"{where}[{i}]", maps)):
                    return err
            return None
        if not isinstance(a, ast.AST):
            return None if a == b else f"{where}: {a!r} vs {b!r}"
        if maps is None and isinstance(a, (ast.FunctionDef, ast.AsyncFunctionDef)):
            maps = ({}, {})  # a function at module level or a method: its own renaming
        for field, x in ast.iter_fields(a):
            y = getattr(b, field)
            renamable = (isinstance(a, ast.Name) and field == "id") or (isinstance(a, ast.arg) and field == "arg") \
                or (isinstance(a, ast.ExceptHandler) and field == "name" and x is not None)
            if renamable and x != y:
                if maps is None or x in outside or y in used or maps[0].setdefault(x, y) != y \
                        or maps[1].setdefault(y, x) != x:
                    return f"{where}.{type(a).__name__}.{field}: {x!r} -> {y!r} is not a local renaming"
                continue
            if (err := compare(x, y, f"{where}.{getattr(a, 'name', type(a).__name__)}", maps)):
                return err
        return None

    return compare(before, after, "module", None)


def package_sources(package_dir: Path = PACKAGE_DIR) -> dict[str, str]:
    """Module name -> source text for every runtime module (the rule above): each lcq/NAME.py as `lcq.NAME`, and `lcq`
    itself empty (lcq/__init__.py is the repo's door for the tools' old names, which a bundled run has no use for)."""
    return {"lcq": "", **{f"lcq.{p.stem}": p.read_text(encoding="utf-8")
                          for p in sorted(package_dir.glob("*.py")) if p.stem != "__init__"}}


def payload(entry_source: str, sources: dict[str, str], **steps: bool) -> bytes:
    """The minified modules (and the entry as `__entry__`) as `\\0name\\nsource` records, sorted by name."""
    stripped = {name: strip_source(code, **steps) for name, code in dict(sources, __entry__=entry_source).items()}
    return "".join(f"\0{name}\n{code}" for name, code in sorted(stripped.items())).encode("utf-8")


def latin1_literal(blob: bytes) -> bytes:
    """The body of a '''...''' string literal in a latin-1 source file that evaluates to blob.decode('latin-1'). Escaped:
    backslash; CR (the tokenizer would turn CR/CRLF into LF); NUL (not allowed in source; `\\000` when a digit follows);
    a quote that is last or followed by a quote (so no ''' can close the literal early)."""
    out = bytearray()
    n = len(blob)
    for i, c in enumerate(blob):
        nxt = blob[i + 1] if i + 1 < n else None
        if c == 0x5C:
            out += b"\\\\"
        elif c == 0x0D:
            out += b"\\r"
        elif c == 0:
            out += b"\\000" if nxt is not None and 0x30 <= nxt <= 0x37 else b"\\0"
        elif c == 0x27 and (nxt is None or nxt == 0x27):
            out += b"\\'"
        else:
            out.append(c)
    return bytes(out)


def render(entry_source: str, sources: dict[str, str]) -> bytes:
    """The single-file script for these sources. Deterministic: same sources, Python and brotli versions, same bytes."""
    blob = brotli.compress(payload(entry_source, sources), quality=11, lgwin=24)
    body = latin1_literal(blob)
    # Belt and braces: the literal must read back as the blob, or the script would fail at its first line.
    if ast.literal_eval("'''" + body.decode("latin-1") + "'''").encode("latin-1") != blob:
        raise AssertionError("lcq.bundle: the latin-1 literal does not decode to the compressed payload")
    return HEADER + b"'''" + body + b"'''" + FOOTER


def _lcq_imports(source: str, package_dir: Path) -> set[str]:
    """lcq modules a source imports anywhere in it (module level or inside a function), as dotted names."""
    def module(name: str) -> str | None:
        path = package_dir.joinpath(*name.split(".")[1:]).with_suffix(".py")
        return name if name == "lcq" or path.is_file() else None

    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "lcq"}
        elif isinstance(node, ast.ImportFrom):
            base = ("lcq" + ("." + node.module if node.module else "")) if node.level else node.module or ""
            if base.split(".")[0] != "lcq":
                continue
            found.add(base)
            found |= {m for a in node.names if (m := module(f"{base}.{a.name}"))}  # `from lcq import dist`
    return {m for m in found if module(m)}


def entry_imports(entry_source: str, package_dir: Path = PACKAGE_DIR) -> set[str]:
    """Every lcq module a run of the entry script can import: the transitive closure of _lcq_imports (lazy imports
    included), not descending into the tools wing (the loader refuses it)."""
    todo, seen = set(_lcq_imports(entry_source, package_dir)) | {"lcq"}, set()
    while todo:
        name = todo.pop()
        seen.add(name)
        if name == TOOLS or name.startswith(TOOLS + "."):
            continue
        path = package_dir / "__init__.py" if name == "lcq" else package_dir.joinpath(*name.split(".")[1:]).with_suffix(".py")
        todo |= _lcq_imports(path.read_text(encoding="utf-8"), package_dir) - seen
    return seen


def compare(entry_source: str, sources: dict[str, str]) -> list[tuple[str, int, int, int, int]]:
    """(compressor, compressed, base85, base64, latin-1 literal) bytes of this payload: the measurement behind the
    choices in the module docstring."""
    data = payload(entry_source, sources)
    raw_lzma2 = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "lc": 3, "lp": 0, "pb": 0}]
    rows = []
    for name, blob in (("zlib -9", zlib.compress(data, 9)),
                       ("lzma -9e (xz)", lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)),
                       ("lzma2 raw -9e lc3 pb0", lzma.compress(data, format=lzma.FORMAT_RAW, filters=raw_lzma2)),
                       ("brotli 11 lgwin 24", brotli.compress(data, quality=11, lgwin=24))):
        rows.append((name, len(blob), len(base64.b85encode(blob)), len(base64.b64encode(blob)), len(latin1_literal(blob))))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lcq bundle", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entry", default=str(PACKAGE_DIR.parent / "train_gpt.py"), help="entry script (default: repo train_gpt.py)")
    out = ap.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", help="where to write the single-file script")
    out.add_argument("--compare", action="store_true", help="print the payload's size per compressor and encoding")
    args = ap.parse_args(argv)
    if not os.path.exists(args.entry):
        ap.error(f"--entry {args.entry}: no such file")
    entry = Path(args.entry).read_text(encoding="utf-8")
    tools = sorted(m for m in _lcq_imports(entry, PACKAGE_DIR) if m.startswith(TOOLS))
    if tools:
        ap.error(f"{args.entry} imports {tools}: the tools wing is not shipped; a run reaches it only through "
                 "lcq/from_repo.py")
    if args.compare:
        print(f"{'minification steps':44}{'payload':>9}{'brotli 11':>10}")
        for label, steps in (("docstrings, comments, annotations, indent", dict(squeeze=False, rename=False)),
                             ("+ no spaces the tokenizer does not need", dict(squeeze=True, rename=False)),
                             ("+ short local names (shipped)", dict(squeeze=True, rename=True))):
            data = payload(entry, package_sources(), **steps)
            print(f"{label:44}{len(data):>9,}{len(brotli.compress(data, quality=11, lgwin=24)):>10,}")
        print(f"\nshipped payload {len(payload(entry, package_sources())):,} bytes ({len(package_sources())} modules + entry)")
        print(f"{'compressor':24}{'compressed':>11}{'base85':>9}{'base64':>9}{'latin-1':>9}")
        for row in compare(entry, package_sources()):
            print(f"{row[0]:24}" + "".join(f"{v:>{w},}" for v, w in zip(row[1:], (11, 9, 9, 9))))
        return 0
    data = render(entry, package_sources())
    atomic_write(args.out, data)
    print(f"wrote {args.out}: {len(data)} bytes (code bytes counted by the gate)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
