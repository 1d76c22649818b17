"""Issue 17: an artifact is input from someone else. Every number it carries (chunk lengths, model dims, shapes, row
orders, LoRA ranks) is checked before it sizes an allocation, so a crafted file is refused by name with memory
proportional to its honest size. The files here are forged with valid checksums (re-hashed), as an attacker would."""
import brotli
import hashlib
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lcq import artifact as A
from lcq.tools import artifact_tools as AT
from lcq.config import make_config
from lcq.pipeline import CONFIG_EXIT_CODE
from lcq.shipping import FORMAT, load_shipped

REPO = Path(__file__).resolve().parents[1]
BOMB_BYTES = 512 << 20  # what a decoder that trusts the stream would hold at once
RSS_GROWTH_LIMIT = 200 << 20  # a bounded decoder stays far below the bomb (the payloads here are a few KB honest)


def forge(sections: list[tuple[str, int, list[tuple[int, bytes]]]]) -> bytes:
    """An artifact blob with a valid header and checksum: (name, compressor id, [(raw length claimed, stored)])."""
    body = b""
    for name, cid, chunks in sections:
        body += bytes([len(name)]) + name.encode() + struct.pack("<BQI", cid, sum(n for n, _ in chunks), len(chunks))
        body += b"".join(struct.pack("<QQ", n, len(c)) for n, c in chunks) + b"".join(c for _, c in chunks)
    head = struct.pack("<4sHHQ", b"LCQA", 2, len(sections), len(body))
    return head + hashlib.sha256(head + body).digest() + body


def payload(manifest: dict, data: bytes = b"") -> bytes:
    m = json.dumps(manifest).encode()
    return struct.pack("<I", len(m)) + m + data


def model_meta(**model) -> dict:
    return {"format": FORMAT, "model": model, "bos_id": 1, "qmeta": {"__aliases__": {}}, "lora": None}


@pytest.fixture(scope="module")
def crafted(tmp_path_factory) -> dict[str, Path]:
    """One forged file per attack, written once for the module."""
    d = tmp_path_factory.mktemp("crafted")
    honest = payload({"meta": {}, "tensors": []})
    c = brotli.Compressor(quality=1)
    bomb = c.process(honest) + b"".join(c.process(bytes(64 << 20)) for _ in range(BOMB_BYTES >> 26)) + c.finish()
    row_order = payload({"meta": {}, "tensors": [
        {"name": "w", "dtype": "int8", "shape": [4, 8], "layout": "grouped", "major": "row", "perm": 4, "bits": 0,
         "offset": 0, "nbytes": 4 * 4 + 32}]}, struct.pack("<4I", 0xFFFFFFFF, 0, 1, 2) + bytes(32))
    files = {
        "bomb": forge([("model", 2, [(len(honest), bomb)])]),
        "raw_claim": forge([("model", 0, [(1 << 40, honest)])]),
        "row_order": forge([("model", 0, [(len(row_order), row_order)])]),
        "dims": AT.encode({"tok_emb.weight": torch.zeros(64, 8, dtype=torch.int8)},
                         model_meta(model_dim=1 << 20, num_layers=2), "brotli"),
        "weights": AT.encode({"tok_emb.weight": torch.zeros(4096, 1, dtype=torch.int8)},
                            model_meta(vocab_size=4096, model_dim=4096, num_heads=8, num_kv_heads=4, num_layers=1),
                            "brotli"),
        "unknown_field": AT.encode({"tok_emb.weight": torch.zeros(64, 8, dtype=torch.int8)},
                                  model_meta(num_layers=2, hidden_knob=3), "brotli"),
    }
    out = {}
    for name, blob in files.items():
        out[name] = d / f"{name}.lcq"
        out[name].write_bytes(blob)
    return out


CHILD = r"""
import json, resource, sys
import torch
from lcq import artifact as A
from lcq.config import make_config
from lcq.shipping import load_shipped
cfg = make_config("tiny")
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
out = {}
for name, path in json.loads(sys.argv[1]).items():
    try:
        (load_shipped(path, cfg, torch.device("cpu")) if name in ("dims", "weights", "unknown_field") else A.load(path))
        out[name] = "loaded"
    except A.ArtifactError as e:
        out[name] = "ArtifactError: " + str(e)
    except BaseException as e:
        out[name] = type(e).__name__ + ": " + str(e)
print(json.dumps({"results": out, "growth": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base}))
"""


@pytest.fixture(scope="module")
def refused(crafted) -> dict:
    """Every crafted file loaded in one child process (its peak RSS is its own): {name: message}, and the growth of
    its peak RSS over what it held after imports."""
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps({k: str(v) for k, v in crafted.items()})],
                          capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_crafted_artifacts_are_refused_with_bounded_peak_memory(refused):
    assert refused["growth"] < RSS_GROWTH_LIMIT, refused
    assert all(m.startswith("ArtifactError: ") for m in refused["results"].values()), refused["results"]


def test_a_decompression_bomb_stops_at_the_chunk_tables_length(refused):
    assert "decompressed to more than" in refused["results"]["bomb"]


def test_chunk_tables_claiming_more_than_the_file_can_hold_are_refused_before_decompressing(refused):
    assert "refused before decompressing" in refused["results"]["raw_claim"]


def test_a_row_order_index_past_the_rows_is_refused_before_counting(refused):
    assert "names row 4294967295 of 4" in refused["results"]["row_order"]


def test_model_dims_beyond_what_the_file_holds_are_refused(refused):
    assert "imply ~24190329552896 weights (it holds 512)" in refused["results"]["dims"]
    assert "imply ~" in refused["results"]["weights"] and "refused before allocating" in refused["results"]["weights"]


def test_an_unknown_model_field_gets_the_named_refusal(refused):
    assert "['hidden_knob'] are unknown to this lcq" in refused["results"]["unknown_field"]


def test_lzma_and_lrzip_chunks_are_bounded_too(tmp_path):
    honest = payload({"meta": {}, "tensors": []})
    stream = A._COMPRESSORS["lzma"][1]()
    lz = stream[0](honest + bytes(1 << 20)) + stream[1]()
    with pytest.raises(A.ArtifactError, match="decompressed to more than"):
        A.decode(forge([("model", 1, [(len(honest), lz)])]))
    # lrzip allocates by the size in its own header: a header that disagrees with the table is refused unread
    fake = b"LRZI\x00\x06" + struct.pack("<Q", 1 << 40) + bytes(32)
    with pytest.raises(A.ArtifactError, match="lrzip header does not declare"):
        A._decompress_chunk(A.SectionInfo("model", "lrzip", len(honest), 0, ((len(honest), memoryview(fake)),)), 0,
                            "x.lcq")


def test_a_crafted_lora_rank_is_refused(tmp_path):
    meta = model_meta()
    meta["lora"] = {"ranks": {"blocks.0.attn.c_q": 1 << 30}, "alpha": 8.0, "merge": "side"}
    path = tmp_path / "lora.lcq"
    AT.save(path, {"tok_emb.weight": torch.zeros(1024, 64, dtype=torch.int8),
                  "lora.blocks.0.attn.c_q.A_q": torch.zeros(2, 8, dtype=torch.int8)}, meta, "brotli")
    with pytest.raises(A.ArtifactError, match=r"lora ranks \['blocks.0.attn.c_q'\] without"):
        load_shipped(str(path), make_config("tiny"), torch.device("cpu"))


def test_eval_only_on_a_crafted_artifact_exits_2_before_scoring(crafted, tmp_path, demo_data):
    from test_failfast import outputs, run, snapshot, assert_unchanged

    before = snapshot(crafted["unknown_field"].parent)
    proc = run(tmp_path, *demo_data, "crafted", "--eval_only", "--artifact", str(crafted["unknown_field"]))
    assert proc.returncode == CONFIG_EXIT_CODE, proc.stderr[-3000:]
    log, summary = outputs(tmp_path, "crafted")
    assert "unknown to this lcq" in proc.stderr and summary["status"] == CONFIG_EXIT_CODE
    assert "val_bpb" not in log and "stage:eval" not in log
    assert_unchanged(crafted["unknown_field"].parent, before)
