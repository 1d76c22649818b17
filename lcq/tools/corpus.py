"""Datasets in the challenge's shard format: the embedded demo corpus, shards from any text, the official download.

- The demo corpus is English prose that ships with CPython itself: the pydoc topics and the docstrings of
  the standard library, read by parsing the sources with `ast` (no stdlib module is imported, so nothing
  runs). It needs no network and is byte-for-byte reproducible on a given CPython build.
- `shards_from_text` turns .txt / .jsonl files into the same layout through the same code path.
- `download` fetches the official FineWeb shards and tokenizer the way the challenge's
  data/cached_challenge_fineweb.py does (openai/parameter-golf): manifest-driven, from the hub dataset repo the
  records used for that variant (VARIANT_REPOS; MATCHED_FINEWEB_REPO_ID overrides), export rooted at `datasets/`,
  with the val byte sidecar when the export has one (CaseOps).

Every dataset is built in a hidden staging folder next to its destination and renamed into place at the
end, so an interrupted build never leaves half a dataset where a run would pick it up.

CLI: `lcq data {demo,text,download} --help`.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import os
import re
import shutil
import sys
import sysconfig
import tempfile
import time
import tokenize
import warnings
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

from .. import data
from ..data import DEMO_NAME, DEMO_ROOT, demo_paths
from ..tokenizer import load_tokenizer

DEMO_VOCAB_SIZE = 1024
DEMO_SHARD_TOKENS = 150_000  # small enough that the demo train split spans several shards
VAL_EVERY = 10               # every 10th document (index 0, 10, 20, ...) is a val document
MAX_DOC_CHARS = 8000

# Special ids of the challenge's official SentencePiece tokenizers (openai/parameter-golf,
# data/download_hf_docs_and_tokenize.py, build_sentencepiece_tokenizer): pad 0, bos 1, eos 2, unk 3;
# the 256 byte-fallback pieces follow at ids 4..259.
SPECIAL_IDS = {"pad_id": 0, "bos_id": 1, "eos_id": 2, "unk_id": 3}

# Standard-library parts left out: tests, the IDE, vendored or deprecated packages, generated codec
# tables, third-party installs, and the Tk GUI toolkits (tkinter, turtle), whose docstrings are mostly
# widget option listings. What remains is about 1.3M characters of docstrings on CPython 3.11.
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo",
                        "ensurepip", "distutils", "encodings", "pydoc_data", "lib-dynload", "tkinter"})
_SKIP_MODULES = frozenset({"turtle"})


# ----------------------------------------------------------------------------------------------------
# Demo corpus
# ----------------------------------------------------------------------------------------------------

def split_text(text: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """Split text into pieces of at most max_chars: at paragraph breaks, inside a paragraph that is too
    long at line breaks, inside a line that is too long anywhere. Neighbouring parts are packed greedily
    with their original separator. Pieces are stripped (the bpb rule never counts a space right after
    BOS, so a document must not start with one) and empty pieces dropped."""
    def pieces(block: str, seps: tuple[str, ...]) -> list[str]:
        if len(block) <= max_chars:
            return [block]
        if not seps:
            return [block[i:i + max_chars] for i in range(0, len(block), max_chars)]
        sep, out = seps[0], []
        for part in block.split(sep):
            for piece in pieces(part, seps[1:]):
                if out and len(out[-1]) + len(sep) + len(piece) <= max_chars:
                    out[-1] += sep + piece
                else:
                    out.append(piece)
        return out

    return [p.strip() for p in pieces(text, ("\n\n", "\n")) if p.strip()]


def _stdlib_sources() -> list[tuple[str, Path]]:
    """(module name, path) of the standard library's public .py files, sorted by module name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Underscore folders are caches and private test packages; config-* holds the build's Makefile glue.
        dirnames[:] = sorted(d for d in dirnames
                             if d not in _SKIP_DIRS and not d.startswith(("_", ".", "config-")))
        for name in filenames:
            # Single-underscore modules (_pydecimal, _pyio, ...) are pure-Python twins of C modules whose
            # docs repeat the public module's; dunder files (__init__, __future__) are public.
            if not name.endswith(".py") or (name.startswith("_") and not name.startswith("__")):
                continue
            parts = list(Path(dirpath, name).relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            if parts and parts[0] not in _SKIP_MODULES:
                found.append((".".join(parts), Path(dirpath, name)))
    return sorted(found)


class _Docstrings(ast.NodeVisitor):
    """Collect (qualified name, docstring) for every class and function, in source order."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.found: list[tuple[str, str]] = []

    def _visit_def(self, node: ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.names.append(node.name)
        doc = ast.get_docstring(node)
        if doc:
            self.found.append((".".join(self.names), doc))
        self.generic_visit(node)
        self.names.pop()

    visit_ClassDef = visit_FunctionDef = visit_AsyncFunctionDef = _visit_def


def _module_text(module: str, path: Path, seen: set[str]) -> str:
    """The module's docstrings as one text: a heading line (the qualified name) above each docstring.
    Docstrings already in `seen` are skipped, so text shared by several definitions appears once."""
    try:
        with tokenize.open(path) as f, warnings.catch_warnings():  # tokenize.open honours encoding cookies
            # Old escape sequences in some sources warn on newer parsers; they are not our concern here.
            warnings.simplefilter("ignore", (SyntaxWarning, DeprecationWarning))
            tree = ast.parse(f.read(), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        # A file the running parser rejects is not this interpreter's library (e.g. a stray vendored file).
        return ""
    visitor = _Docstrings()
    visitor.visit(tree)
    blocks = []
    for name, doc in [("", ast.get_docstring(tree) or "")] + visitor.found:
        doc = doc.strip()
        if not doc or doc in seen:
            continue
        seen.add(doc)
        blocks.append(f"{module}.{name}\n{doc}" if name else f"{module}\n{doc}")
    return "\n\n".join(blocks)


def demo_documents() -> list[str]:
    """The demo corpus: pydoc topics (one document per topic, sorted by key) then stdlib docstrings
    (one document per module, sorted by module name), long texts split at paragraph breaks to at most
    MAX_DOC_CHARS characters, repeated documents dropped. About 1.77M characters in 493 documents on
    CPython 3.11.7; deterministic for a given CPython build."""
    try:
        from pydoc_data.topics import topics  # a plain dict of strings shipped with CPython for help()
    except ImportError as e:
        raise RuntimeError("the demo corpus needs pydoc_data from CPython's standard library, which this "
                           "Python lacks; build data from your own files with `python -m lcq.corpus text`") from e

    docs = [part for key in sorted(topics) for part in split_text(topics[key])]
    seen: set[str] = set()
    docs += [part for module, path in _stdlib_sources() for part in split_text(_module_text(module, path, seen))]
    # Some topics share one text (e.g. "if" under two keys); keep the first copy so that no text can
    # land in both the train and the val split.
    return list(dict.fromkeys(docs))


# ----------------------------------------------------------------------------------------------------
# Tokenizer training and shard writing
# ----------------------------------------------------------------------------------------------------

def _write_atomic(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, path)


def train_tokenizer(texts: Sequence[str], model_path: str | os.PathLike, vocab_size: int) -> Path:
    """Train a SentencePiece BPE model on texts (one sentence each) and write it atomically to model_path.

    Settings follow the official tokenizers (BPE, byte fallback, split digits, no dummy prefix,
    character_coverage 0.999, the official special ids), except normalization: the official models use
    nmt_nfkc, which folds newlines and runs of spaces into one space; here text is kept as is
    (identity, no whitespace collapsing), so decode(encode(text)) == text and the bpb byte rule counts
    exactly the UTF-8 bytes of the text. One thread and all input sentences (no sampling) keep the model
    byte-identical from run to run."""
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("train_tokenizer: no non-empty texts to train on")
    if vocab_size > 2**16:
        raise ValueError(f"vocab_size={vocab_size}: shards store uint16 ids, so at most 65536")
    model_path = Path(model_path)
    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=writer, model_type="bpe", vocab_size=vocab_size,
            byte_fallback=True, split_digits=True, character_coverage=0.999, hard_vocab_limit=False,
            add_dummy_prefix=False, normalization_rule_name="identity", remove_extra_whitespaces=False,
            # Longer sentences would be silently left out of training (default limit 4192 bytes).
            max_sentence_length=max(4192, max(len(t.encode("utf-8")) for t in texts) + 1),
            input_sentence_size=0, num_threads=1, minloglevel=2, **SPECIAL_IDS)
    except RuntimeError as e:
        raise ValueError(f"sentencepiece training failed for vocab_size={vocab_size} on {len(texts)} texts: {e}. "
                         "The vocabulary must hold 260 special and byte pieces plus the text's characters; "
                         "pick a different vocab size or give more text") from e
    _write_atomic(model_path, writer.getvalue())
    return model_path


def split_val(documents: Sequence[str], val_every: int = VAL_EVERY) -> tuple[list[str], list[str]]:
    """(train, val): document i is a val document iff i % val_every == 0. Fixed, disjoint, order kept."""
    if val_every < 2:
        raise ValueError(f"val_every={val_every}: must be >= 2 so both splits get documents")
    if len(documents) < 2:
        raise ValueError(f"{len(documents)} document(s): need at least 2 (one train, one val)")
    train = [d for i, d in enumerate(documents) if i % val_every]
    val = [d for i, d in enumerate(documents) if i % val_every == 0]
    return train, val


def _pack(chunks: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """Regroup a stream of token arrays into arrays of exactly `size` tokens (the last may be shorter).
    Like the official export, a document may continue from one shard into the next."""
    pending: list[np.ndarray] = []
    filled = 0
    for chunk in chunks:
        while chunk.size:
            take = min(size - filled, chunk.size)
            pending.append(chunk[:take])
            filled += take
            chunk = chunk[take:]
            if filled == size:
                yield np.concatenate(pending)
                pending, filled = [], 0
    if filled:
        yield np.concatenate(pending)


def _encode_docs(docs: Sequence[str], sp: spm.SentencePieceProcessor, batch: int = 512) -> Iterator[np.ndarray]:
    bos = sp.bos_id()
    for start in range(0, len(docs), batch):
        for ids in sp.encode(list(docs[start:start + batch]), out_type=int):
            yield np.asarray([bos] + ids, dtype=np.uint16)


def build_shards(train_docs: Sequence[str], tokenizer: spm.SentencePieceProcessor, out_dir: str | os.PathLike,
                 val_docs: Sequence[str], shard_tokens: int) -> dict[str, int]:
    """Encode each document as [BOS] + ids and write fineweb_val_XXXXXX.bin / fineweb_train_XXXXXX.bin
    shards of at most shard_tokens tokens into out_dir. Returns document/token/shard counts per split."""
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens={shard_tokens}: must be >= 1")
    if not train_docs or not val_docs:
        raise ValueError(f"build_shards: need at least one train and one val document "
                         f"(got {len(train_docs)} train, {len(val_docs)} val)")
    if tokenizer.bos_id() < 0:
        raise ValueError("build_shards: the tokenizer has no BOS piece; documents must start with BOS")
    if tokenizer.vocab_size() > 2**16:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size()} pieces; uint16 shards hold at most 65536")
    out_dir = Path(out_dir)
    stats: dict[str, int] = {}
    for split, docs in (("val", val_docs), ("train", train_docs)):
        tokens = shards = 0
        for shards, arr in enumerate(_pack(_encode_docs(docs, tokenizer), shard_tokens), start=1):
            data.write_shard(out_dir / f"fineweb_{split}_{shards - 1:06d}.bin", arr)
            tokens += arr.size
        stats.update({f"{split}_docs": len(docs), f"{split}_tokens": tokens, f"{split}_shards": shards})
    return stats


@contextlib.contextmanager
def _staging(parent: Path, name: str) -> Iterator[Path]:
    """A fresh hidden folder in `parent` (same filesystem, so renames out of it are atomic), removed
    afterwards whether the build succeeded or not."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.building-", dir=parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(data_src: Path, data_dst: Path, tok_src: Path | None = None, tok_dst: Path | None = None) -> None:
    """Move a finished dataset folder (and its tokenizer file) into place, replacing older ones. An older
    folder is moved aside first, so a crash part-way never leaves a dataset next to a tokenizer it was
    not built with: at worst the dataset is missing and gets rebuilt."""
    data_dst.parent.mkdir(parents=True, exist_ok=True)
    aside = None
    if data_dst.exists():
        aside = Path(tempfile.mkdtemp(prefix=f".{data_dst.name}.old-", dir=data_dst.parent))
        os.replace(data_dst, aside / data_dst.name)
    if tok_src is not None and tok_dst is not None:
        tok_dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tok_src, tok_dst)
    os.replace(data_src, data_dst)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _build(train_docs: Sequence[str], val_docs: Sequence[str], data_dir: Path, tokenizer_path: Path,
           vocab_size: int | None, shard_tokens: int) -> dict[str, int]:
    """Train the tokenizer on the train documents (if vocab_size is given, else load tokenizer_path),
    then write the shards. Shared by the demo and by user text."""
    if vocab_size is not None:
        train_tokenizer(train_docs, tokenizer_path, vocab_size)
    return build_shards(train_docs, load_tokenizer(tokenizer_path), data_dir, val_docs, shard_tokens)


# ----------------------------------------------------------------------------------------------------
# Demo dataset
# ----------------------------------------------------------------------------------------------------

def build_demo(root: str | os.PathLike = DEMO_ROOT, documents: Sequence[str] | None = None) -> tuple[str, str]:
    """Build the demo dataset under root: datasets/demo_sp1024/fineweb_{train,val}_*.bin and
    tokenizers/demo_sp1024.model (vocab 1024, trained on the train split only). `documents` replaces the
    demo corpus (a subset makes a quick build). Returns (data_path, tokenizer_path)."""
    data_path, tok_path = demo_paths(root)
    docs = demo_documents() if documents is None else list(documents)
    train_docs, val_docs = split_val(docs, VAL_EVERY)
    with _staging(Path(root), DEMO_NAME) as tmp:
        stage_data, stage_tok = demo_paths(tmp)
        _build(train_docs, val_docs, stage_data, stage_tok, DEMO_VOCAB_SIZE, DEMO_SHARD_TOKENS)
        _publish(stage_data, data_path, stage_tok, tok_path)
    return str(data_path), str(tok_path)


def _demo_built(data_path: Path, tok_path: Path) -> bool:
    return (tok_path.is_file() and any(data_path.glob("fineweb_train_*.bin"))
            and any(data_path.glob("fineweb_val_*.bin")))


def ensure_demo(data_path: str | os.PathLike, tokenizer_path: str | os.PathLike) -> tuple[str, str]:
    """Build the demo dataset unless it is already there. The two paths must be
    <root>/datasets/demo_sp1024 and <root>/tokenizers/demo_sp1024.model for the same root."""
    data_path, tok_path = Path(data_path), Path(tokenizer_path)
    root = data_path.parent.parent
    if (data_path.name != DEMO_NAME or data_path.parent.name != "datasets"
            or tok_path.name != f"{DEMO_NAME}.model" or tok_path.parent.name != "tokenizers"
            or tok_path.parent.parent.resolve() != root.resolve()):
        raise ValueError(
            f"cannot build the demo data for DATA_PATH={str(data_path)!r} and TOKENIZER_PATH={str(tok_path)!r}: "
            f"they must be <root>/datasets/{DEMO_NAME} and <root>/tokenizers/{DEMO_NAME}.model with the same "
            f"root (default root {DEMO_ROOT!r}); fix the paths or build other data with `python -m lcq.corpus`")
    if not _demo_built(data_path, tok_path):
        build_demo(root)
    return str(data_path), str(tok_path)


# ----------------------------------------------------------------------------------------------------
# User text
# ----------------------------------------------------------------------------------------------------

def read_documents(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Documents from .txt files (a whole file is one document: blank lines are paragraph breaks inside
    documents, not separators) and .jsonl files (one JSON object per line with a string "text" field,
    as in the challenge's docs_selected.jsonl). Documents are stripped; empty ones are dropped."""
    docs: list[str] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"input {str(path)!r} not found")
        if path.suffix == ".txt":
            docs.append(path.read_text(encoding="utf-8").strip())
        elif path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}); "
                                         'each line must be an object like {"text": "..."}') from e
                    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                        raise ValueError(f'{path}:{lineno}: expected an object with a string "text" field')
                    docs.append(record["text"].strip())
        else:
            raise ValueError(f"input {str(path)!r}: unsupported file type {path.suffix!r}; use .txt (one "
                             "document per file) or .jsonl (one {\"text\": ...} object per line)")
    return [d for d in docs if d]


def shards_from_text(inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                     tokenizer_path: str | os.PathLike | None = None, vocab_size: int | None = None,
                     val_every: int = VAL_EVERY, shard_tokens: int = 100_000_000) -> tuple[str, str]:
    """Build a dataset folder from .txt/.jsonl inputs (see read_documents), every val_every-th document
    going to val. Tokenize with an existing SentencePiece model (tokenizer_path) or train a new one on
    the train documents (vocab_size), saved as out_dir/tokenizer.model. The default shard size is the
    official 100M tokens. Returns (data_path, tokenizer_path)."""
    if (tokenizer_path is None) == (vocab_size is None):
        raise ValueError("shards_from_text: pass exactly one of tokenizer_path (use that tokenizer) "
                         "or vocab_size (train a new one)")
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"output folder {str(out_dir)!r} already exists; remove it or choose another")
    train_docs, val_docs = split_val(read_documents(inputs), val_every)
    with _staging(out_dir.parent, out_dir.name) as tmp:
        stage = tmp / out_dir.name
        # A newly trained tokenizer lives inside the dataset folder, so both appear in one rename.
        tok = Path(tokenizer_path) if vocab_size is None else stage / "tokenizer.model"
        _build(train_docs, val_docs, stage, tok, vocab_size, shard_tokens)
        _publish(stage, out_dir)
    return str(out_dir), str(tokenizer_path if vocab_size is None else out_dir / "tokenizer.model")


# ----------------------------------------------------------------------------------------------------
# Official data
# ----------------------------------------------------------------------------------------------------

DEFAULT_REPO_ID = "willdepueoai/parameter-golf"
DEFAULT_REMOTE_ROOT = "datasets"
# Hub dataset repos of the variants the records trained on (openai/parameter-golf, records/track_10min_16mb/). Every
# export has the same layout (manifest.json, datasets/fineweb10B_<variant>/, tokenizers/); any other sp<N> is looked
# up in DEFAULT_REPO_ID.
VARIANT_REPOS = {
    # The challenge's own export (data/cached_challenge_fineweb.py).
    "sp1024": DEFAULT_REPO_ID,
    # 2026-04-05_SP8192_GPTQ-Embeddings_SDClip_Loop45x2/README.md (@clarkkev), reused by the later SP8192 records.
    "sp8192": "kevclark/parameter-golf",
    # CaseOps lossless-caps sp8192 (PR #1729, 2026-04-18_PR1626_CaseOps_Taper/README.md, @romeerp); its export carries
    # the val sidecar. #1855's logs (2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611/train_seed42.log)
    # read this download's layout: datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved, 47,851,520 val tokens.
    "sp8192_lossless_caps_caseops_v1_reserved": "romeerp/parameter-golf-caseops-v1",
}
VARIANT_ALIASES = {"caseops": "sp8192_lossless_caps_caseops_v1_reserved"}


def _relative(value: str, what: str) -> PurePosixPath:
    p = PurePosixPath(value)
    if not value or p.is_absolute() or ".." in p.parts:
        raise ValueError(f"manifest.json: {what} {value!r} must be a relative path inside the export")
    return p


def _fetch(rel: PurePosixPath, *, repo_id: str, remote_root: str, local_root: Path,
           cache_dir: str | os.PathLike | None, local_rel: PurePosixPath | None = None) -> Path:
    """Materialize <remote_root>/<rel> of the hub dataset repo as local_root/<local_rel or rel>: already there -> kept;
    else downloaded into the hub cache and hard-linked (or copied) out of it."""
    from huggingface_hub import hf_hub_download

    dest = local_root.joinpath(*(local_rel or rel).parts)
    if dest.is_file():
        return dest
    remote = PurePosixPath(remote_root, rel) if remote_root else rel
    print(f"fetching {repo_id}:{remote} -> {dest}", flush=True)
    cached = hf_hub_download(repo_id=repo_id, filename=remote.name, repo_type="dataset", cache_dir=cache_dir,
                             subfolder=None if str(remote.parent) == "." else str(remote.parent))
    # Cache snapshots are symlinks into blobs/; link the blob itself so data/ holds a real file.
    source = Path(cached).resolve(strict=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, dest)
    return dest


def resolve_variant(variant: str, repo_id: str | None = None) -> tuple[str, str]:
    """(variant, hub repo id) for a variant name or alias: repo_id, else MATCHED_FINEWEB_REPO_ID, else the repo the
    records used for that variant (VARIANT_REPOS), else DEFAULT_REPO_ID."""
    variant = VARIANT_ALIASES.get(variant, variant)
    if not re.fullmatch(r"sp\d+(_[a-z0-9]+)*", variant):
        raise ValueError(f"variant {variant!r}: lcq scores SentencePiece tokenizers only; use sp<VOCAB_SIZE> (e.g. "
                         f"sp1024, sp8192), a dataset suffix such as {VARIANT_ALIASES['caseops']} or an alias "
                         f"{sorted(VARIANT_ALIASES)}")
    return variant, repo_id or os.environ.get("MATCHED_FINEWEB_REPO_ID") or VARIANT_REPOS.get(variant, DEFAULT_REPO_ID)


def manifest_name(repo_id: str) -> PurePosixPath:
    """Where a repo's manifest.json is kept locally. One file per repo: exports of different repos share data/, and a
    manifest cached from one repo does not list another repo's datasets (the SP8192 records had users delete
    data/manifest.json before switching repos)."""
    return PurePosixPath("manifests", repo_id.replace("/", "--") + ".json")


def plan_download(manifest: dict, variant: str, train_shards: int, where: str = "manifest.json") -> list[PurePosixPath]:
    """The files of one variant's export to fetch, relative to the export root, as its manifest counts them: every val
    shard, its byte sidecar when the dataset lists one (`val_bytes_glob`, the CaseOps export), the first
    `train_shards` train shards, then the tokenizer files (model first). `where` names the manifest in errors."""
    if train_shards < 0:
        raise ValueError(f"train_shards={train_shards}: must be >= 0")
    dataset_name = f"fineweb10B_{variant}"
    entry = next((d for d in manifest.get("datasets", []) if d.get("name") == dataset_name), None)
    if entry is None:
        names = [d.get("name") for d in manifest.get("datasets", [])]
        raise ValueError(f"{where}: no dataset {dataset_name!r}; it has {names}")
    stats = entry.get("stats") or {}
    n_train, n_val = int(stats.get("files_train", 0)), int(stats.get("files_val", 0))
    if train_shards > n_train:
        raise ValueError(f"{where}: {variant} has {n_train} train shards; requested {train_shards}")
    tok_entry = next((t for t in manifest.get("tokenizers", []) if t.get("name") == entry.get("tokenizer_name")),
                     None)
    if tok_entry is None or not tok_entry.get("model_path"):
        raise ValueError(f"{where}: no tokenizer model for {dataset_name!r} "
                         f"(tokenizer_name={entry.get('tokenizer_name')!r})")
    dataset_dir = PurePosixPath("datasets", dataset_name)
    files = [dataset_dir / f"fineweb_val_{i:06d}.bin" for i in range(n_val)]
    if entry.get("val_bytes_glob"):
        files += [dataset_dir / f"{data.SIDECAR_PREFIX}{i:06d}.bin" for i in range(n_val)]
    files += [dataset_dir / f"fineweb_train_{i:06d}.bin" for i in range(train_shards)]
    files += [_relative(tok_entry[k], f"tokenizer {k}") for k in ("model_path", "vocab_path") if tok_entry.get(k)]
    return files


def download(variant: str = "sp1024", train_shards: int = 80, local_root: str | os.PathLike = "data",
             repo_id: str | None = None, remote_root: str | None = None,
             cache_dir: str | os.PathLike | None = None) -> tuple[str, str]:
    """Fetch the official FineWeb export for a tokenizer variant (sp1024, sp8192, caseops, ...; see plan_download
    for the files). Local layout: <local_root>/datasets/fineweb10B_<variant>/, <local_root>/tokenizers/, the repo's
    manifest under <local_root>/manifests/. repo_id: see resolve_variant; remote_root defaults to
    MATCHED_FINEWEB_REMOTE_ROOT_PREFIX or "datasets"; cache_dir is the hub cache (None: the hub's default,
    HF_HUB_CACHE / HF_HOME). Files already in place, the manifest included, are kept. Returns (data_path,
    tokenizer_path)."""
    variant, repo_id = resolve_variant(variant, repo_id)
    if train_shards < 0:
        raise ValueError(f"train_shards={train_shards}: must be >= 0")
    if remote_root is None:
        remote_root = os.environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", DEFAULT_REMOTE_ROOT)
    remote_root = remote_root.strip("/")
    local_root = Path(local_root)
    get = dict(repo_id=repo_id, remote_root=remote_root, local_root=local_root, cache_dir=cache_dir)

    manifest_path = _fetch(PurePosixPath("manifest.json"), local_rel=manifest_name(repo_id), **get)
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{manifest_path}: not valid JSON ({e}); delete it to fetch it again") from e
    files = plan_download(manifest, variant, train_shards, where=f"{manifest_path} ({repo_id})")
    for rel in files:
        path = _fetch(rel, **get)
        if rel.suffix == ".bin":
            data.read_header(path)  # a truncated or foreign file fails here, not mid-training
    dataset_dir = local_root / "datasets" / f"fineweb10B_{variant}"
    tok_model = next(rel for rel in files if rel.suffix != ".bin")
    return str(dataset_dir), str(local_root.joinpath(*tok_model.parts))


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lcq data", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n  lcq data download --variant caseops   # the record preset's data (#1729)\n"
                                       "  lcq data demo                         # the demo set, no network")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="build the embedded demo dataset (CPython docs, no network)")
    d.add_argument("--root", default=DEMO_ROOT, help=f"folder for datasets/ and tokenizers/ (default {DEMO_ROOT})")
    t = sub.add_parser("text", help="build shards from .txt / .jsonl files",
                       description="A .txt file is one document; a .jsonl file holds one {\"text\": ...} "
                                   "document per line. Every --val-every-th document goes to val.")
    t.add_argument("inputs", nargs="+", metavar="FILE", help=".txt or .jsonl input files")
    t.add_argument("--out", required=True, help="new dataset folder (must not exist)")
    how = t.add_mutually_exclusive_group(required=True)
    how.add_argument("--tokenizer", help="existing SentencePiece .model to tokenize with")
    how.add_argument("--vocab-size", type=int, help="train a new BPE tokenizer of this size (saved in --out)")
    t.add_argument("--val-every", type=int, default=VAL_EVERY, help=f"default {VAL_EVERY}")
    t.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard (default 100M)")
    g = sub.add_parser("download", help="fetch the official FineWeb shards and tokenizer from the HF hub")
    g.add_argument("--variant", default="sp1024",
                   help="export to fetch: sp<VOCAB_SIZE> (sp1024, sp8192, ...), caseops (= "
                        f"{VARIANT_ALIASES['caseops']}) or another dataset suffix (default sp1024)")
    g.add_argument("--train-shards", type=int, default=80, help="train shards of 100M tokens (default 80)")
    g.add_argument("--local-root", default="data", help="local data folder (default data)")
    g.add_argument("--repo-id", default=None,
                   help="hub dataset repo (default: MATCHED_FINEWEB_REPO_ID, else the records' repo for the "
                        f"variant: {', '.join(f'{k} {v}' for k, v in VARIANT_REPOS.items())}; else {DEFAULT_REPO_ID})")
    g.add_argument("--remote-root", default=None,
                   help=f"export folder in the repo (default: MATCHED_FINEWEB_REMOTE_ROOT_PREFIX or "
                        f"{DEFAULT_REMOTE_ROOT!r})")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    t0 = time.perf_counter()
    if args.command == "demo":
        paths = build_demo(args.root)
    elif args.command == "text":
        paths = shards_from_text(args.inputs, args.out, tokenizer_path=args.tokenizer, vocab_size=args.vocab_size,
                                 val_every=args.val_every, shard_tokens=args.shard_tokens)
    else:
        paths = download(args.variant, args.train_shards, args.local_root, args.repo_id, args.remote_root)
    for split in ("train", "val"):
        files = data.list_shards(os.path.join(paths[0], f"fineweb_{split}_*.bin"), split)
        print(f"{split}: {len(files)} shards, {sum(map(data.read_header, files)):,} tokens")
    if data.sidecar_files(paths[0]):
        print(f"val byte sidecar: {len(data.sidecar_files(paths[0]))} shards (the eval counts bytes from it)")
    print(f"DATA_PATH={paths[0]}\nTOKENIZER_PATH={paths[1]}\n({time.perf_counter() - t0:.1f}s)")


if __name__ == "__main__":
    main(sys.argv[1:])
