"""Demo corpus, shard building from text, and the hub download (through a fake offline cache)."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lcq import data
from lcq.tools import corpus
from lcq.tokenizer import byte_tables, load_tokenizer, token_bytes

BOS = 1


@pytest.fixture(scope="module")
def demo_docs() -> list[str]:
    return corpus.demo_documents()


def split_docs(tokens: np.ndarray) -> list[np.ndarray]:
    """Documents of a flat token stream, each still starting with its BOS."""
    starts = list(data.doc_starts(tokens, BOS)) + [tokens.size]
    return [tokens[a:b] for a, b in zip(starts, starts[1:])]


def stream(data_path: str, split: str) -> np.ndarray:
    files = data.list_shards(os.path.join(data_path, f"fineweb_{split}_*.bin"), split)
    return np.concatenate([np.asarray(data.read_shard(f)) for f in files])


def file_digests(*paths: str) -> dict[str, str]:
    out = {}
    for p in map(Path, paths):
        for f in sorted(p.iterdir()) if p.is_dir() else [p]:
            out[f.name] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


# ---------------------------------------------------------------------------------------------- corpus

def test_split_text_known_answers():
    assert corpus.split_text("aaaa\n\nbbbb\n\ncc", 10) == ["aaaa\n\nbbbb", "cc"]
    # a paragraph too long is split at its lines, and packed back with "\n", not "\n\n"
    assert corpus.split_text("xxxxxx\nyyyyyy\nzz\n\nw", 10) == ["xxxxxx", "yyyyyy\nzz", "w"]
    assert corpus.split_text("a" * 25, 10) == ["a" * 10, "a" * 10, "a" * 5]
    assert corpus.split_text("  hi  \n\n\n\n", 10) == ["hi"]
    assert corpus.split_text("short text", 10_000) == ["short text"]


def test_demo_documents_deterministic_and_sized(demo_docs):
    from pydoc_data.topics import topics
    import json as json_module

    assert corpus.demo_documents() == demo_docs
    total = sum(map(len, demo_docs))
    if sys.version_info[:2] == (3, 11):
        assert 1_600_000 <= total <= 1_900_000 and 450 <= len(demo_docs) <= 550
    else:  # other CPython versions ship other docs
        assert 1_000_000 <= total <= 3_000_000
    assert len(set(demo_docs)) == len(demo_docs)
    assert all(0 < len(d) <= corpus.MAX_DOC_CHARS and d == d.strip() for d in demo_docs)
    text = "\n".join(demo_docs)
    assert topics["assert"].strip().split("\n\n")[1] in text                   # a pydoc topic
    assert "json.dumps\n" + json_module.dumps.__doc__.split("\n\n")[0] in text  # a docstring with its heading
    assert "\ntkinter" not in text and "\ntest.support" not in text and "\nidlelib" not in text


# ---------------------------------------------------------------------------------------- demo dataset

def test_demo_dataset_contents(demo_data, demo_docs, tmp_path):
    data_path, tok_path = demo_data
    assert data_path.endswith(os.path.join("datasets", "demo_sp1024"))
    assert tok_path.endswith(os.path.join("tokenizers", "demo_sp1024.model"))
    sp = load_tokenizer(tok_path)
    assert sp.vocab_size() == 1024
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)  # the official layout
    assert sp.id_to_piece(4) == "<0x00>" and sp.is_byte(259)

    train_docs, val_docs = corpus.split_val(demo_docs, corpus.VAL_EVERY)
    assert val_docs == demo_docs[::10] and not set(train_docs) & set(val_docs)
    train_files = sorted(Path(data_path).glob("fineweb_train_*.bin"))
    assert [f.name for f in train_files[:2]] == ["fineweb_train_000000.bin", "fineweb_train_000001.bin"]
    assert len(train_files) >= 3
    assert all(data.read_header(f) <= corpus.DEMO_SHARD_TOKENS for f in train_files)

    for split, docs in (("train", train_docs), ("val", val_docs)):
        tokens = stream(data_path, split)
        assert tokens[0] == BOS
        pieces = split_docs(tokens)
        assert len(pieces) == len(docs)
        assert [sp.decode(p[1:].tolist()) for p in pieces] == docs

    # The bpb byte rule counts exactly the UTF-8 bytes of the val documents.
    val = torch.from_numpy(stream(data_path, "val").astype(np.int64))
    n_bytes = int(token_bytes(val[1:], val[:-1], byte_tables(sp, 1024)).sum())
    assert n_bytes == sum(len(d.encode("utf-8")) for d in val_docs)

    # The tokenizer is the one trained on the train documents alone.
    retrained = corpus.train_tokenizer(train_docs, tmp_path / "retrained.model", 1024)
    assert retrained.read_bytes() == Path(tok_path).read_bytes()


def test_demo_build_is_byte_identical(demo_data, demo_docs, tmp_path):
    again = corpus.build_demo(tmp_path, demo_docs)  # demo_documents() itself is compared above
    assert file_digests(*again) == file_digests(*demo_data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["datasets", "tokenizers"]  # no staging left


def test_interrupted_build_leaves_no_dataset(demo_docs, tmp_path, monkeypatch):
    subset = demo_docs[:60]
    real_write = data.write_shard
    calls = []

    def write_then_die(path, tokens):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # e.g. Ctrl-C while the second shard is being written
        real_write(path, tokens)

    monkeypatch.setattr(data, "write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        corpus.build_demo(tmp_path / "fresh", subset)
    assert len(calls) == 2
    assert list((tmp_path / "fresh").iterdir()) == []  # no dataset, no tokenizer, no staging folder

    # A failed rebuild leaves the previous dataset untouched.
    monkeypatch.setattr(data, "write_shard", real_write)
    old = corpus.build_demo(tmp_path / "old", subset)
    before = file_digests(*old)
    calls.clear()
    monkeypatch.setattr(data, "write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        corpus.build_demo(tmp_path / "old", subset[:30])
    assert file_digests(*old) == before
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == ["datasets", "tokenizers"]

    # A rebuild that completes replaces the old dataset and tokenizer, leaving nothing else behind.
    monkeypatch.setattr(data, "write_shard", real_write)
    assert corpus.build_demo(tmp_path / "old", subset[:30]) == old
    assert file_digests(*old) != before
    assert [p.name for p in (tmp_path / "old" / "datasets").iterdir()] == ["demo_sp1024"]


def test_ensure_demo(demo_data, demo_docs, tmp_path, monkeypatch):
    data_path, tok_path = demo_data
    stamps = {f: f.stat().st_mtime_ns for f in [*Path(data_path).iterdir(), Path(tok_path)]}
    assert corpus.ensure_demo(data_path, tok_path) == (data_path, tok_path)
    assert {f: f.stat().st_mtime_ns for f in stamps} == stamps  # already built: nothing rewritten

    monkeypatch.setattr(corpus, "demo_documents", lambda: demo_docs[:40])  # a quick build
    dp, tp = corpus.demo_paths(tmp_path / "root")
    assert corpus.ensure_demo(dp, tp) == (str(dp), str(tp))
    assert tp.is_file() and len(list(dp.glob("fineweb_val_*.bin"))) == 1

    with pytest.raises(ValueError, match="DATA_PATH"):
        corpus.ensure_demo(tmp_path / "x" / "datasets" / "other", tp)
    with pytest.raises(ValueError, match="TOKENIZER_PATH"):
        corpus.ensure_demo(dp, tmp_path / "elsewhere" / "tokenizers" / "demo_sp1024.model")


# ------------------------------------------------------------------------------------------- user text

def write_inputs(tmp_path: Path) -> tuple[list[Path], list[str]]:
    a = tmp_path / "a.txt"
    a.write_text("  First document.\n\nIt has a second paragraph.\n", encoding="utf-8")
    b = tmp_path / "b.txt"
    b.write_text("Second document: naïve café, 中文 text.", encoding="utf-8")
    records = [f"Record {i}: the quick brown fox jumps over {i} lazy dogs.\nLine two of record {i}."
               for i in range(30)]
    c = tmp_path / "c.jsonl"
    c.write_text("\n".join(json.dumps({"text": r, "id": i}) for i, r in enumerate(records)) + "\n\n",
                 encoding="utf-8")
    expected = ["First document.\n\nIt has a second paragraph.", "Second document: naïve café, 中文 text."]
    return [a, b, c], expected + records


def test_text_and_jsonl_inputs_train_a_tokenizer(tmp_path):
    inputs, docs = write_inputs(tmp_path)
    assert corpus.read_documents(inputs) == docs
    out = tmp_path / "mydata"
    data_path, tok_path = corpus.shards_from_text(inputs, out, vocab_size=400, val_every=5, shard_tokens=200)
    assert (data_path, tok_path) == (str(out), str(out / "tokenizer.model"))
    sp = load_tokenizer(tok_path)
    val_idx = {0, 5, 10, 15, 20, 25, 30}  # every 5th of the 32 documents, starting with the first
    train_docs = [d for i, d in enumerate(docs) if i not in val_idx]
    val_docs = [d for i, d in enumerate(docs) if i in val_idx]
    assert len(list(out.glob("fineweb_train_*.bin"))) >= 2
    for split, expected in (("train", train_docs), ("val", val_docs)):
        assert [sp.decode(p[1:].tolist()) for p in split_docs(stream(data_path, split))] == expected
    with pytest.raises(FileExistsError, match="mydata"):
        corpus.shards_from_text(inputs, out, vocab_size=400)


def test_text_with_an_existing_tokenizer(demo_data, tmp_path):
    inputs, docs = write_inputs(tmp_path)
    sp = load_tokenizer(demo_data[1])
    data_path, tok_path = corpus.shards_from_text(inputs, tmp_path / "d", tokenizer_path=demo_data[1])
    assert tok_path == demo_data[1] and not (tmp_path / "d" / "tokenizer.model").exists()
    expected = np.concatenate([[BOS] + sp.encode(d) for i, d in enumerate(docs) if i % 10 == 0])
    assert np.array_equal(stream(data_path, "val"), expected)
    with pytest.raises(ValueError, match="exactly one"):
        corpus.shards_from_text(inputs, tmp_path / "e", tokenizer_path=demo_data[1], vocab_size=400)
    with pytest.raises(ValueError, match="exactly one"):
        corpus.shards_from_text(inputs, tmp_path / "e")


@pytest.mark.parametrize("content, lineno", [
    ('{"text": "ok"}\n{"text": "ok too"}\n{"text": broken\n', 3),
    ('{"text": "ok"}\n{"txt": "wrong field"}\n', 2),
    ('\n["not", "an", "object"]\n', 2),
    ('{"text": 42}\n', 1),
])
def test_bad_jsonl_line_names_file_and_line(tmp_path, content, lineno):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=rf"bad\.jsonl:{lineno}:"):
        corpus.read_documents([bad])


def test_unsupported_or_missing_inputs(tmp_path):
    md = tmp_path / "notes.md"
    md.write_text("hello", encoding="utf-8")
    with pytest.raises(ValueError, match=r"notes\.md.*\.txt"):
        corpus.read_documents([md])
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        corpus.read_documents([tmp_path / "missing.txt"])
    one = tmp_path / "one.txt"
    one.write_text("a single document", encoding="utf-8")
    with pytest.raises(ValueError, match="at least 2"):
        corpus.shards_from_text([one], tmp_path / "out", vocab_size=300)


def test_cli_text_and_help(tmp_path, capsys):
    inputs, _ = write_inputs(tmp_path)
    corpus.main(["text", *map(str, inputs), "--out", str(tmp_path / "cli"), "--vocab-size", "400"])
    assert f"DATA_PATH={tmp_path / 'cli'}" in capsys.readouterr().out
    assert (tmp_path / "cli" / "fineweb_val_000000.bin").is_file()
    with pytest.raises(SystemExit) as e:
        corpus.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and all(c in out for c in ("demo", "text", "download"))
    with pytest.raises(SystemExit):  # --tokenizer and --vocab-size are mutually exclusive
        corpus.main(["text", str(inputs[0]), "--out", str(tmp_path / "x"), "--tokenizer", "t", "--vocab-size", "9"])
    assert "not allowed with" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- download

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(cache: Path, repo_id: str, files: dict[str, bytes]) -> None:
    """The huggingface_hub cache layout for a dataset repo: refs/main holds the commit, snapshot files are
    relative symlinks into blobs/."""
    repo = cache / ("datasets--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    for rel, payload in files.items():
        blob = repo / "blobs" / hashlib.sha256(payload).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(payload)
        link = repo / "snapshots" / COMMIT / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


def test_download_through_an_offline_hub_cache(demo_data, tmp_path, monkeypatch):
    import huggingface_hub.constants

    shard_dir = tmp_path / "src"
    payloads = {}
    for name, n in [("fineweb_val_000000.bin", 50), *[(f"fineweb_train_{i:06d}.bin", 30 + i) for i in range(3)]]:
        data.write_shard(shard_dir / name, np.arange(n) % 1024)
        payloads[f"datasets/datasets/fineweb10B_sp1024/{name}"] = (shard_dir / name).read_bytes()
    manifest = {
        "datasets": [{"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024",
                      "stats": {"files_train": 3, "files_val": 1}}],
        "tokenizers": [{"name": "sp_bpe_1024", "kind": "sentencepiece_bpe", "vocab_size": 1024,
                        "model_path": "tokenizers/fineweb_1024_bpe.model",
                        "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"}],
    }
    payloads["datasets/manifest.json"] = json.dumps(manifest).encode()
    payloads["datasets/tokenizers/fineweb_1024_bpe.model"] = Path(demo_data[1]).read_bytes()
    payloads["datasets/tokenizers/fineweb_1024_bpe.vocab"] = b"<pad>\t0\n"
    cache = tmp_path / "hub"
    fake_hub_cache(cache, "tester/golf", payloads)

    # Offline, with the repo id taken from the challenge's env knob; any socket use fails the test.
    monkeypatch.setenv("MATCHED_FINEWEB_REPO_ID", "tester/golf")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the hub reads the env at import
    connects = []
    monkeypatch.setattr(socket.socket, "connect", lambda self, *a: connects.append(a) or 1 / 0)

    local = tmp_path / "data"
    data_path, tok_path = corpus.download("sp1024", train_shards=2, local_root=local, cache_dir=cache)
    assert connects == []
    assert data_path == str(local / "datasets" / "fineweb10B_sp1024")
    assert tok_path == str(local / "tokenizers" / "fineweb_1024_bpe.model")
    # Only the first 2 train shards were asked for; the manifest is kept under the repo's own name.
    expected = {rel.split("/", 1)[1].replace("manifest.json", "manifests/tester--golf.json"): payload
                for rel, payload in payloads.items() if "train_000002" not in rel}
    got = {str(p.relative_to(local)): p for p in local.rglob("*") if p.is_file()}
    assert sorted(got) == sorted(expected)
    for rel, payload in expected.items():
        assert not got[rel].is_symlink() and got[rel].read_bytes() == payload
    assert load_tokenizer(tok_path).vocab_size() == 1024

    # Files already in place are kept: a second call needs no cache at all.
    empty = tmp_path / "empty-cache"
    empty.mkdir()
    assert corpus.download("sp1024", train_shards=2, local_root=local, cache_dir=empty) == (data_path, tok_path)

    with pytest.raises(ValueError, match="has 3 train shards"):
        corpus.download("sp1024", train_shards=4, local_root=local, cache_dir=cache)
    with pytest.raises(ValueError, match="fineweb10B_sp4096"):
        corpus.download("sp4096", train_shards=1, local_root=local, cache_dir=cache)
    with pytest.raises(ValueError, match="sp<VOCAB_SIZE>"):
        corpus.download("byte260", local_root=local, cache_dir=cache)


def test_variants_resolve_to_the_records_repos(monkeypatch):
    monkeypatch.delenv("MATCHED_FINEWEB_REPO_ID", raising=False)
    caseops = "sp8192_lossless_caps_caseops_v1_reserved"
    assert corpus.resolve_variant("sp1024") == ("sp1024", "willdepueoai/parameter-golf")
    assert corpus.resolve_variant("sp8192") == ("sp8192", "kevclark/parameter-golf")
    assert corpus.resolve_variant("caseops") == corpus.resolve_variant(caseops) == (caseops,
                                                                                    "romeerp/parameter-golf-caseops-v1")
    assert corpus.resolve_variant("sp4096") == ("sp4096", corpus.DEFAULT_REPO_ID)
    assert corpus.resolve_variant("sp8192", "me/mine") == ("sp8192", "me/mine")
    monkeypatch.setenv("MATCHED_FINEWEB_REPO_ID", "env/repo")  # the challenge's knob wins over the table
    assert corpus.resolve_variant("caseops") == (caseops, "env/repo")
    for bad in ("byte260", "sp", "SP8192", "sp8192/../x"):
        with pytest.raises(ValueError, match="sp<VOCAB_SIZE>"):
            corpus.resolve_variant(bad)
    assert corpus.manifest_name("romeerp/parameter-golf-caseops-v1").as_posix() == \
        "manifests/romeerp--parameter-golf-caseops-v1.json"


def caseops_manifest(files_train: int, files_val: int) -> dict:
    """A manifest as the CaseOps exporter writes it (2026-04-18_PR1626_CaseOps_Taper/download_hf_docs_and_tokenize.py:
    per dataset the globs, `val_bytes_glob` for the sidecar, and the shard counts in `stats`)."""
    d = "datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"
    return {
        "datasets": [{"name": "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved",
                      "tokenizer_name": "sp_bpe_8192_lossless_caps_caseops_v1_reserved", "tokenizer_kind": "sentencepiece",
                      "path": d, "train_glob": f"{d}/fineweb_train_*.bin", "val_glob": f"{d}/fineweb_val_*.bin",
                      "val_bytes_glob": f"{d}/fineweb_val_bytes_*.bin", "vocab_size": 8192, "bos_id": 1, "eos_id": 2,
                      "stats": {"files_train": files_train, "files_val": files_val, "files_total": files_train + files_val}}],
        "tokenizers": [{"name": "sp_bpe_8192_lossless_caps_caseops_v1_reserved", "kind": "sentencepiece", "vocab_size": 8192,
                        "model_path": "tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model",
                        "vocab_path": "tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.vocab",
                        "text_transform": "lossless_caps_caseops_v1"}],
    }


def test_plan_lists_the_sidecar_only_when_the_export_has_one():
    caseops = "sp8192_lossless_caps_caseops_v1_reserved"
    d = f"datasets/fineweb10B_{caseops}"
    plan = [p.as_posix() for p in corpus.plan_download(caseops_manifest(5, 2), caseops, 1)]
    assert plan == [f"{d}/fineweb_val_000000.bin", f"{d}/fineweb_val_000001.bin", f"{d}/fineweb_val_bytes_000000.bin",
                    f"{d}/fineweb_val_bytes_000001.bin", f"{d}/fineweb_train_000000.bin",
                    f"tokenizers/fineweb_8192_bpe_{caseops[7:]}.model", f"tokenizers/fineweb_8192_bpe_{caseops[7:]}.vocab"]
    plain = caseops_manifest(5, 2)
    del plain["datasets"][0]["val_bytes_glob"]
    assert not any("bytes" in p.name for p in corpus.plan_download(plain, caseops, 5))
    with pytest.raises(ValueError, match="has 5 train shards; requested 6"):
        corpus.plan_download(plain, caseops, 6)
    with pytest.raises(ValueError, match="no dataset 'fineweb10B_sp8192'"):
        corpus.plan_download(plain, "sp8192", 1)


def test_caseops_download_fetches_the_sidecar_that_pairs_with_val(demo_data, tmp_path, monkeypatch):
    import huggingface_hub.constants

    repo, caseops = "romeerp/parameter-golf-caseops-v1", "sp8192_lossless_caps_caseops_v1_reserved"
    tokens = [np.array([1, 5, 6, 7, 1, 8, 9]), np.array([1, 10, 11])]
    counts = [np.array([0, 3, 0, 4, 0, 2, 2]), np.array([0, 5, 1])]  # BOS 0, an operator token 0
    payloads = {"datasets/manifest.json": json.dumps(caseops_manifest(1, 2)).encode()}
    src = tmp_path / "src"
    for i, (t, c) in enumerate(zip(tokens, counts)):
        for name, arr in ((f"fineweb_val_{i:06d}.bin", t), (f"fineweb_val_bytes_{i:06d}.bin", c)):
            data.write_shard(src / name, arr)
            payloads[f"datasets/datasets/fineweb10B_{caseops}/{name}"] = (src / name).read_bytes()
    data.write_shard(src / "train.bin", np.arange(20))
    payloads[f"datasets/datasets/fineweb10B_{caseops}/fineweb_train_000000.bin"] = (src / "train.bin").read_bytes()
    model = Path(demo_data[1]).read_bytes()
    payloads[f"datasets/tokenizers/fineweb_8192_bpe_{caseops[7:]}.model"] = model
    payloads[f"datasets/tokenizers/fineweb_8192_bpe_{caseops[7:]}.vocab"] = b"<pad>\t0\n"
    cache = tmp_path / "hub"
    fake_hub_cache(cache, repo, payloads)
    monkeypatch.delenv("MATCHED_FINEWEB_REPO_ID", raising=False)  # the repo comes from the variant
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(socket.socket, "connect", lambda self, *a: 1 / 0)

    local = tmp_path / "data"
    data_path, tok_path = corpus.download("caseops", train_shards=1, local_root=local, cache_dir=cache)
    assert data_path == str(local / "datasets" / f"fineweb10B_{caseops}")
    assert Path(tok_path).read_bytes() == model and (local / corpus.manifest_name(repo)).is_file()
    assert [os.path.basename(f) for f in data.sidecar_files(data_path)] == ["fineweb_val_bytes_000000.bin",
                                                                            "fineweb_val_bytes_000001.bin"]
    # The val tokens leave the sidecar out; the bytes line up with them token for token.
    assert data.load_val_tokens(data_path).tolist() == np.concatenate(tokens).tolist()
    assert data.load_val_bytes(data_path, 10).tolist() == np.concatenate(counts).tolist()
