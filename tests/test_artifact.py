"""Known-answer tests for lcq.artifact: format layout, round trips, corruption, atomic save, the gate, sections."""
import hashlib
import json
import os
import random
import struct
import warnings

import pytest
import torch

from lcq import artifact as A
from lcq.tools import artifact_tools as AT
from artifact_bounds import compressor_of, max_compressed_bytes, max_section_bytes

DTYPES = [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16,
          torch.float32, torch.float64, torch.bool]
BITS_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits as integers, so NaN payloads and -0.0 compare exactly."""
    return t.view(BITS_VIEW[t.element_size()]) if t.dtype.is_floating_point else t


def assert_bit_exact(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(bits_of(a[k].contiguous()), bits_of(b[k])), k


def sample(dtype: torch.dtype, shape=(5, 7), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 3).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    info = torch.iinfo(dtype)
    t = torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(dtype)
    if t.numel() >= 2:
        t.view(-1)[:2] = torch.tensor([info.min, info.max], dtype=dtype)  # both extremes of the range
    return t


def section_bytes(raw: bytes, cid: int = 0, name: bytes = b"model") -> bytes:
    """One section of one chunk by the documented layout, payload stored as given."""
    return bytes([len(name)]) + name + struct.pack("<BQI", cid, len(raw), 1) + struct.pack("<QQ", len(raw), len(raw)) + raw


def frame(raw: bytes, cid: int = 0, version: int = A.FORMAT_VERSION, magic: bytes = b"LCQA",
          sections: list[bytes] | None = None) -> bytes:
    """Build an artifact by the documented layout, independently of encode (one "model" section, one chunk, payload
    stored as given, unless `sections` are passed)."""
    sections = sections or [section_bytes(raw, cid)]
    body = b"".join(sections)
    head = struct.pack("<4sHHQ", magic, version, len(sections), len(body))
    return head + hashlib.sha256(head + body).digest() + body


def payload(manifest_bytes: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<I", len(manifest_bytes)) + manifest_bytes + data


def payload_of(blob: bytes) -> bytes:
    """The stored payload of a one-section, one-chunk artifact, read by the documented layout."""
    return blob[A.HEADER_BYTES + 1 + blob[A.HEADER_BYTES] + 13 + 16:]


def manifest_of(blob: bytes) -> dict:
    """Manifest of an uncompressed ("none") artifact, read by the documented layout."""
    raw = payload_of(blob)
    (mlen,) = struct.unpack_from("<I", raw)
    return json.loads(raw[4:4 + mlen])


# ------------------------------------------------------------------------------------------- layout

def test_header_and_manifest_follow_documented_layout():
    t = {"b": torch.tensor([1, 2, 300], dtype=torch.int16), "a": torch.tensor(7, dtype=torch.int8)}
    blob = AT.encode(t, {"cfg": {"dim": 4}}, "none")
    assert A.HEADER_BYTES == 48
    magic, version, count, body_len = struct.unpack_from("<4sHHQ", blob)
    assert (magic, version, count, body_len) == (b"LCQA", 2, 1, len(blob) - 48)
    assert blob[16:48] == hashlib.sha256(blob[:16] + blob[48:]).digest()
    assert blob[48:54] == b"\x05model"  # name length, name
    cid, raw_len, chunks = struct.unpack_from("<BQI", blob, 54)
    assert (cid, chunks) == (0, 1) and struct.unpack_from("<QQ", blob, 67) == (raw_len, raw_len)
    assert len(blob) == 83 + raw_len
    expected = {"meta": {"cfg": {"dim": 4}}, "tensors": [
        {"name": "a", "dtype": "int8", "shape": [], "layout": "bits", "bits": 1, "bias": 7, "offset": 0,
         "nbytes": 1},
        {"name": "b", "dtype": "int16", "shape": [3], "layout": "planes", "offset": 1, "nbytes": 6},
    ]}
    mbytes = json.dumps(expected, sort_keys=True, separators=(",", ":")).encode()
    # int8 7 -> bit 0 (7 - bias); int16 [1, 2, 300] little-endian = 01 00 | 02 00 | 2C 01 -> planes 01 02 2C | 00 00 01
    assert blob[83:] == payload(mbytes, bytes([0x00, 0x01, 0x02, 0x2C, 0x00, 0x00, 0x01]))


def test_low_bit_ints_are_packed_with_known_bytes():
    t = torch.tensor([-8, 7, 0, 1, -1], dtype=torch.int8)  # range 15 -> 4-bit fields, bias -8
    blob = AT.encode({"q": t}, {}, "none")
    (entry,) = manifest_of(blob)["tensors"]
    assert (entry["layout"], entry["bits"], entry["bias"], entry["nbytes"]) == ("bits", 4, -8, 3)
    # value - bias = [0, 15, 8, 9, 7]; two per byte, first in the low nibble, last byte zero-padded
    assert blob[-3:] == bytes([0xF0, 0x98, 0x07])
    two = AT.encode({"q": torch.tensor([3, 5, 6, 4, 5], dtype=torch.uint8)}, {}, "none")  # range 3 -> 2 bits
    assert manifest_of(two)["tensors"][0]["bits"] == 2
    assert two[-2:] == bytes([0b01_11_10_00, 0b00_00_00_10])  # [0, 2, 3, 1 | 2]
    flags = AT.encode({"m": torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1], dtype=torch.bool)}, {}, "none")
    assert flags[-2:] == bytes([0b0000_1101, 0b0000_0001])  # bool: 1 bit per value, 8 per byte
    wide = AT.encode({"q": torch.tensor([-31, 0, 31], dtype=torch.int8)}, {}, "none")  # int6 stays raw bytes
    assert manifest_of(wide)["tensors"][0]["layout"] == "raw"
    assert wide[-3:] == bytes([0xE1, 0x00, 0x1F])


def test_float_byte_planes_known_bytes():
    t = torch.tensor([1.0, -2.0], dtype=torch.float16)  # 0x3C00, 0xC000
    blob = AT.encode({"h": t}, {}, "none")
    assert blob[-4:] == bytes([0x00, 0x00, 0x3C, 0xC0])


# ------------------------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("compressor", ["none", "lzma", "brotli", "auto"])
def test_round_trip_every_dtype_bit_exact(compressor):
    tensors = {f"t.{d}".replace("torch.", ""): sample(d) for d in DTYPES}
    tensors["low"] = torch.randint(-8, 8, (33,), dtype=torch.int8)  # packed path, odd length
    tensors["ternary"] = torch.randint(-1, 2, (3, 11), dtype=torch.int8)
    meta = {"config": {"dim": 64, "name": "tiny"}, "quant": {"bits": 6, "clip": 0.9995}, "lora": None}
    out, meta_out = A.decode(AT.encode(tensors, meta, compressor))
    assert_bit_exact(tensors, out)
    assert meta_out == meta


def test_nan_inf_payloads_and_signed_zero_preserved():
    f32 = torch.tensor([0x7FC00001, -0x003EDCBB, 0x7F800001, 0x7F800000, -0x00800000, -0x80000000, 0],
                       dtype=torch.int32).view(torch.float32)  # qNaN payload, negative NaN, sNaN, inf, -inf, -0
    f16 = torch.tensor([0x7E01, 0x7C00, -0x0400, -0x8000], dtype=torch.int16).view(torch.float16)
    bf16 = torch.tensor([0x7FC1, 0x7F81, -0x0080, -0x8000], dtype=torch.int16).view(torch.bfloat16)
    tensors = {"f32": f32, "f16": f16, "bf16": bf16}
    out, _ = A.decode(AT.encode(tensors, {}, "lzma"))
    assert_bit_exact(tensors, out)


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_and_zero_dim_tensors(dtype):
    tensors = {"empty": torch.zeros(0, dtype=dtype), "empty2d": torch.zeros(3, 0, dtype=dtype),
               "scalar": sample(dtype, shape=())}
    out, _ = A.decode(AT.encode(tensors, {}, "brotli"))
    assert_bit_exact(tensors, out)
    assert out["scalar"].dim() == 0 and out["empty2d"].shape == (3, 0)


def test_non_contiguous_and_grad_tensors_round_trip():
    w = torch.randn(4, 6, requires_grad=True)
    tensors = {"wt": w.t(), "strided": torch.arange(20, dtype=torch.int32)[::3]}
    out, _ = A.decode(AT.encode(tensors, {}, "none"))
    assert torch.equal(out["wt"], w.detach().t()) and torch.equal(out["strided"], tensors["strided"])


def test_decoded_tensors_are_fresh_writable_and_contiguous():
    blob = AT.encode({"w": torch.ones(4, 4), "q": torch.tensor([1, 2], dtype=torch.int8),
                     "b": torch.ones(3, dtype=torch.bfloat16)}, {}, "none")
    out, _ = A.decode(blob)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when a tensor wraps a read-only buffer
        for t in out.values():
            assert t.is_contiguous()
            t.add_(1)
    assert torch.equal(A.decode(blob)[0]["w"], torch.ones(4, 4))  # the blob was not touched


def test_encode_is_deterministic_and_ignores_insertion_order():
    a = {"x": sample(torch.float32), "y": sample(torch.int8), "z": sample(torch.bfloat16)}
    b = dict(reversed(list(a.items())))
    for c in ("lzma", "brotli", "none"):
        assert AT.encode(a, {"k": 1, "j": [1, 2]}, c) == AT.encode(b, {"j": [1, 2], "k": 1}, c)
        assert AT.encode(a, {"k": 1}, c) == AT.encode(a, {"k": 1}, c)


def test_encode_rejects_bad_input_with_names():
    with pytest.raises(A.ArtifactError, match=r"'c'.*complex64"):
        AT.encode({"c": torch.zeros(2, dtype=torch.complex64)}, {}, "none")
    with pytest.raises(A.ArtifactError, match=r"'f8'.*float8_e4m3fn"):
        AT.encode({"f8": torch.zeros(2, dtype=torch.float8_e4m3fn)}, {}, "none")
    with pytest.raises(A.ArtifactError, match="meta is not JSON"):
        AT.encode({}, {"f": float("nan")}, "none")
    with pytest.raises(A.ArtifactError, match="meta is not JSON"):
        AT.encode({}, {"t": torch.zeros(1)}, "none")
    with pytest.raises(A.ArtifactError, match="unknown compressor 'zstd'"):
        AT.encode({}, {}, "zstd")


# ------------------------------------------------------------------------------------------- corruption

@pytest.fixture(scope="module")
def good_blob() -> bytes:
    return AT.encode({"w": sample(torch.float32, (16, 16)), "q": sample(torch.int8, (64,))}, {"a": 1}, "lzma")


@pytest.mark.parametrize("cut", [0, 3, 10, A.HEADER_BYTES - 1, A.HEADER_BYTES, "middle", "last"])
def test_truncation_is_reported(good_blob, cut):
    n = {"middle": len(good_blob) // 2, "last": len(good_blob) - 1}.get(cut, cut)
    with pytest.raises(A.ArtifactError, match=r"^model\.lcq: truncated"):
        A.decode(good_blob[:n], "model.lcq")


@pytest.mark.parametrize("where", [A.HEADER_BYTES, "middle", "last", 6, 16, 30])
def test_flipped_byte_fails_checksum(good_blob, where):
    i = {"middle": (A.HEADER_BYTES + len(good_blob)) // 2, "last": len(good_blob) - 1}.get(where, where)
    bad = bytearray(good_blob)
    bad[i] ^= 0x01
    with pytest.raises(A.ArtifactError, match=r"^m\.bin: checksum mismatch"):
        A.decode(bytes(bad), "m.bin")


def test_corrupted_body_length_is_reported(good_blob):
    # the body length (bytes 8..16) is read before the checksum, which needs it to know where the file ends
    body = len(good_blob) - A.HEADER_BYTES
    for claimed, message in ((body - 1, "1 trailing bytes"), (body + 1, "truncated")):
        bad = good_blob[:8] + struct.pack("<Q", claimed) + good_blob[16:]
        with pytest.raises(A.ArtifactError, match=rf"^m\.bin: .*{message}"):
            A.decode(bad, "m.bin")


def test_bad_magic_version_compressor_and_trailing_bytes(good_blob):
    with pytest.raises(A.ArtifactError, match=r"^f: bad magic b'LCQB'"):
        A.decode(b"LCQB" + good_blob[4:], "f")
    with pytest.raises(A.ArtifactError, match=r"^f: format version 3; this lcq reads 2 only"):
        A.decode(good_blob[:4] + struct.pack("<H", 3) + good_blob[6:], "f")
    with pytest.raises(A.ArtifactError, match=r"^f: section 'model': unknown compressor id 9"):
        A.decode(frame(payload(manifest()), cid=9), "f")
    with pytest.raises(A.ArtifactError, match=r"^f: 2 trailing bytes"):
        A.decode(good_blob + b"\0\0", "f")


def test_undecodable_payload_with_valid_checksum():
    with pytest.raises(A.ArtifactError, match=r"^f: section 'model': lzma chunk 0 does not decompress"):
        A.decode(frame(b"definitely not lzma", cid=1), "f")
    with pytest.raises(A.ArtifactError, match=r"^f: section 'model': brotli chunk 0 does not decompress"):
        A.decode(frame(b"\xff" * 20, cid=2), "f")


def entry(**kw) -> dict:
    e = {"name": "w", "dtype": "float32", "shape": [2], "layout": "planes", "offset": 0, "nbytes": 8}
    e.update(kw)
    return e


def manifest(*entries, meta=None) -> bytes:
    return json.dumps({"meta": {} if meta is None else meta, "tensors": list(entries)}).encode()


@pytest.mark.parametrize("raw, message", [
    (b"\x01\x00", "bad payload"),
    (payload(b"{not json"), "bad manifest: not valid JSON"),
    (payload(b"\xff\xfe"), "bad manifest: not valid JSON"),
    (struct.pack("<I", 100) + b"{}", "bad manifest: length 100 extends past"),
    (payload(b"[1, 2]"), "bad manifest: expected an object"),
    (payload(b'{"meta": {}}'), "bad manifest: expected an object"),
    (payload(manifest(entry(dtype="complex64")), bytes(16)), "unknown dtype 'complex64'"),
    (payload(manifest(entry(dtype="bool", layout="raw", nbytes=2)), bytes([0, 2])), "values other than 0 and 1"),
    (payload(manifest(entry(offset=4)), bytes(8)), "tensor extends past payload"),
    (payload(manifest(entry(nbytes=4)), bytes(8)), "nbytes 4 does not match"),
    (payload(manifest(entry(shape=[-2])), bytes(8)), "shape must be a list of ints in [0, 2**63)"),
    (payload(manifest(entry(offset="0")), bytes(8)), "field 'offset' must be int"),
    (payload(manifest(entry(layout="zigzag")), bytes(8)), "unknown layout 'zigzag'"),
    (payload(manifest(entry(layout="raw")), bytes(8)), "unknown layout 'raw' for dtype float32"),
    (payload(manifest(entry(dtype="int8", layout="bits", bits=3, bias=0, nbytes=1)), bytes(1)),
     "bad bit packing"),
    (payload(manifest(entry(dtype="int8", layout="bits", bits=4, bias=120, nbytes=1)), bytes(1)),
     "bad bit packing"),
    (payload(manifest(entry(), entry(offset=0)), bytes(8)), "appears twice"),
    (payload(manifest("w")), "expected an object"),
    (payload(manifest(entry(shape=[0, 2**70], nbytes=0))), "shape must be a list of ints in [0, 2**63)"),
])
def test_bad_manifests_with_valid_checksum(raw, message):
    with pytest.raises(A.ArtifactError, match=r"^art\.bin: ") as info:
        A.decode(frame(raw), "art.bin")
    assert message in str(info.value)


def test_mutated_payloads_only_raise_artifact_error():
    """Random byte edits to the payload, re-framed with a valid checksum: the parser either decodes or says why."""
    tensors = {"w": sample(torch.float32, (3, 3)), "q": torch.tensor([1, -2, 3], dtype=torch.int8),
               "b": sample(torch.bfloat16, (2,)), "r": sample(torch.int8, (4,))}
    raw = payload_of(AT.encode(tensors, {"x": [1, 2]}, "none"))
    rng = random.Random(0)
    failures = 0
    for _ in range(1000):
        r = bytearray(raw)
        for _ in range(rng.randint(1, 3)):
            j, op = rng.randrange(len(r)), rng.random()
            if op < 0.6:
                r[j] = rng.randrange(256)
            elif op < 0.8:
                del r[j]
            else:
                r.insert(j, rng.randrange(256))
        try:
            A.decode(frame(bytes(r)), "fz")
        except A.ArtifactError as e:
            assert str(e).startswith("fz: ")
            failures += 1
    assert failures > 500  # most edits break the manifest or the sizes, and each one was reported


def test_hand_built_artifact_decodes():
    """The documented layout is enough to write a reader/writer: a blob built by hand decodes to known values."""
    raw = payload(manifest(entry(), meta={"k": "v"}), bytes([0, 0, 0, 0, 0x80, 0x80, 0x3F, 0xBF]))
    out, meta = A.decode(frame(raw))
    assert meta == {"k": "v"} and out["w"].tolist() == [1.0, -1.0]  # 0x3F800000, 0xBF800000 as planes


# ------------------------------------------------------------------------------------------- files

def test_save_load_round_trip_and_byte_count(tmp_path):
    t = {"w": sample(torch.bfloat16, (8, 8))}
    n = AT.save(tmp_path / "sub" / "model.lcq", t, {"v": 1}, "brotli")
    assert n == (tmp_path / "sub" / "model.lcq").stat().st_size == len(AT.encode(t, {"v": 1}, "brotli"))
    out, meta = A.load(tmp_path / "sub" / "model.lcq")
    assert_bit_exact(t, out) and meta == {"v": 1}
    with pytest.raises(A.ArtifactError, match="missing.lcq: cannot read"):
        A.load(tmp_path / "missing.lcq")
    (tmp_path / "short.lcq").write_bytes(b"LCQA")
    with pytest.raises(A.ArtifactError, match=r"short\.lcq: truncated"):
        A.load(tmp_path / "short.lcq")


@pytest.mark.parametrize("step", ["fsync", "replace"])
def test_save_is_atomic(tmp_path, monkeypatch, step):
    path = tmp_path / "model.lcq"
    AT.save(path, {"w": torch.ones(3)}, {"old": True}, "none")
    before = path.read_bytes()
    seen = []

    def fail(*args):
        tmp = [p for p in os.listdir(tmp_path) if p != "model.lcq"]
        seen.append((tmp, os.path.getsize(tmp_path / tmp[0])))  # the new bytes are written, not yet in place
        raise OSError("disk full")

    monkeypatch.setattr(A.os, step, fail)
    with pytest.raises(OSError, match="disk full"):
        AT.save(path, {"w": torch.zeros(1000)}, {"old": False}, "none")
    assert seen and seen[0][1] == len(AT.encode({"w": torch.zeros(1000)}, {"old": False}, "none"))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.lcq"]


def test_save_with_bad_input_leaves_previous_file(tmp_path):
    path = tmp_path / "model.lcq"
    AT.save(path, {"w": torch.ones(3)}, {}, "none")
    before = path.read_bytes()
    with pytest.raises(A.ArtifactError):
        AT.save(path, {"w": torch.ones(3, dtype=torch.complex64)}, {}, "none")
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["model.lcq"]


# ------------------------------------------------------------------------------------------- gate

def test_size_report_line_and_gate_at_exact_cap():
    r = A.SizeReport(code_bytes=60_000, model_bytes=15_900_000, lora_bytes=40_000)
    assert (r.total, r.cap, r.margin, r.ok) == (16_000_000, 16_000_000, 0, True)
    assert r.line() == ("Total submission size: 16000000 bytes (code 60000, model 15900000, lora 40000, "
                        "cap 16000000)")
    A.check_gate(r, "lower LCQ_RANK or MATRIX_BITS")


def test_gate_fails_one_byte_over_with_breakdown_and_hint():
    r = A.SizeReport(code_bytes=60_001, model_bytes=15_900_000, lora_bytes=40_000)
    assert (r.ok, r.margin) == (False, -1)
    with pytest.raises(A.GateError) as info:
        A.check_gate(r, "lower LCQ_RANK or MATRIX_BITS")
    assert str(info.value) == ("Total submission size: 16000001 bytes (code 60001, model 15900000, lora 40000, "
                               "cap 16000000) is 1 byte over the cap; to fit: lower LCQ_RANK or MATRIX_BITS")
    with pytest.raises(A.GateError, match="is 11 bytes over the cap; to fit: fewer layers"):
        A.check_gate(A.SizeReport(0, 100, 11, cap=100), "fewer layers")


def test_size_report_rejects_bad_fields():
    with pytest.raises(ValueError, match="lora_bytes"):
        A.SizeReport(1, 2, -1)
    with pytest.raises(ValueError, match="code_bytes"):
        A.SizeReport(1.5, 2, 3)


# ------------------------------------------------------------------------------------------- compressor choice

def int6_weights(rows=64, cols=256, seed=0) -> torch.Tensor:
    """Gaussian weights quantized to int6 with per-row absmax scales, held in int8."""
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    scale = w.abs().amax(dim=1, keepdim=True) / 31
    return (w / scale).round().clamp(-31, 31).to(torch.int8)


@pytest.mark.parametrize("tensors, winner", [
    ({"q": int6_weights()}, "brotli"),                      # near-iid symbols: brotli's entropy coding wins
    ({"i": torch.arange(50_000, dtype=torch.int32)}, "lzma"),  # long structured runs: lzma wins
])
def test_auto_picks_the_smaller_compressor(tensors, winner):
    sizes = {c: len(AT.encode(tensors, {}, c)) for c in ("lzma", "brotli")}
    assert min(sizes, key=sizes.get) == winner and sizes["lzma"] != sizes["brotli"]
    blob = AT.encode(tensors, {}, "auto")
    assert compressor_of(blob) == winner and len(blob) == sizes[winner]


def test_auto_tie_goes_to_fixed_order(monkeypatch):
    lzma_entry = A._COMPRESSORS["lzma"]
    monkeypatch.setitem(A._COMPRESSORS, "brotli", (2, lzma_entry[1], lzma_entry[2]))  # same bytes -> tie
    assert compressor_of(AT.encode({"q": int6_weights()}, {}, "auto")) == A.AUTO_ORDER[0] == "lzma"


# ------------------------------------------------------------------------------------------- sections

def lora_factors(rank: int) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"lora.blocks.0.attn.c_q.A_q": torch.randint(-127, 128, (rank, 64), generator=g, dtype=torch.int8),
            "lora.blocks.0.attn.c_q.A_scale": torch.rand(rank, generator=g).to(torch.float16)}


def model_tensors() -> dict:
    t = {f"blocks.0.attn.{n}.weight.q": int6_weights(32, 64, seed=i) for i, n in enumerate(("c_q", "c_k", "proj"))}
    t["blocks.0.attn.c_q.weight.scale"] = torch.rand(32, generator=torch.Generator().manual_seed(2)).to(torch.float16)
    return t


@pytest.mark.parametrize("compressor", ["lzma", "brotli", "auto"])
def test_sections_are_independent_and_their_bytes_add_up(compressor):
    base = AT.compress_section("model", model_tensors(), {"cfg": 1, "lora": None}, compressor)
    lora = AT.compress_section("lora", lora_factors(4), {"rank": 4}, compressor)
    blob = A.assemble([base, lora])
    tensors, meta = A.decode(blob, "two.lcq")
    assert_bit_exact({**model_tensors(), **lora_factors(4)}, tensors)
    assert meta == {"cfg": 1, "lora": {"rank": 4}}  # a later section's meta under its name
    sections = A.sections_of(blob)
    assert list(sections) == ["model", "lora"]
    assert sections["lora"].nbytes == lora.nbytes == len(lora.to_bytes())  # the LoRA's bytes, exactly
    assert A.HEADER_BYTES + sections["model"].nbytes + sections["lora"].nbytes == len(blob)
    # a section's bytes do not depend on what else the artifact holds
    alone = A.assemble([base])
    assert alone[A.HEADER_BYTES:] == blob[A.HEADER_BYTES:A.HEADER_BYTES + base.nbytes]
    assert A.decode(alone)[1] == {"cfg": 1, "lora": None}
    bigger = AT.compress_section("lora", lora_factors(16), {"rank": 16}, compressor)
    assert bigger.nbytes > lora.nbytes


def test_chunks_round_trip_and_bytes_do_not_depend_on_threads():
    t = {"q": int6_weights(64, 256), "w": sample(torch.bfloat16, (40, 40))}
    one = AT.compress_section("model", t, {}, "auto", threads=1, chunk_bytes=5000)
    many = AT.compress_section("model", t, {}, "auto", threads=4, chunk_bytes=5000)
    assert one.to_bytes() == many.to_bytes() and one.compressor == many.compressor
    assert len(one.chunks) == -(-one.raw_bytes // 5000) and [n for n, _ in one.chunks[:-1]] == [5000] * (len(one.chunks) - 1)
    out, _ = A.decode(A.assemble([many]))
    assert_bit_exact(t, out)
    whole = AT.compress_section("model", t, {}, "auto")
    assert len(whole.chunks) == 1 and A.decode(A.assemble([whole]))[0].keys() == out.keys()


@pytest.mark.parametrize("compressor", ["none", "lzma", "brotli"])
def test_incompressible_chunks_stay_within_the_documented_bound(compressor):
    g = torch.Generator().manual_seed(3)
    for n in (0, 1, 1000, 65_536, 65_537, 200_000):
        noise = {"r": torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8)}
        sec = AT.compress_section("x", noise, {}, compressor, chunk_bytes=70_000)
        assert sec.nbytes <= max_section_bytes("x", sec.raw_bytes, chunk_bytes=70_000)
        assert all(len(b) <= max_compressed_bytes(k) for k, b in sec.chunks)


def test_job_measures_its_rate_and_can_be_cancelled():
    t = {"q": torch.randint(-31, 32, (3 * A.SLICE_BYTES + 7,), dtype=torch.int8)}
    job = A.SectionJob("model", t, {}, "none", threads=2, chunk_bytes=2 * A.SLICE_BYTES)
    sec = job.result()
    assert job.done() and job.seconds_left() == 0.0 and sec.raw_bytes == job.raw_bytes
    rates = job.rates()
    assert set(rates) == {"none"} and rates["none"] > 0
    assert rates["none"] == pytest.approx(sec.raw_bytes / sum(t.seconds for t in job.tasks))  # timed whole chunks
    stopped = A.SectionJob("model", t, {}, "lzma", threads=1, chunk_bytes=A.SLICE_BYTES)
    stopped.cancel()
    with pytest.raises(A.ArtifactError, match="cancelled"):
        stopped.result()


def test_old_and_unknown_versions_and_bad_sections_are_refused():
    with pytest.raises(A.ArtifactError, match=r"^old\.lcq: format version 1; this lcq reads 2 only"):
        A.decode(frame(payload(manifest()), version=1), "old.lcq")
    body = payload(manifest())
    with pytest.raises(A.ArtifactError, match=r"^f: section 'model' appears twice"):
        A.decode(frame(b"", sections=[section_bytes(body), section_bytes(body)]), "f")
    with pytest.raises(A.ArtifactError, match=r"^f: bad section #0: name 'Bad!'"):
        A.decode(frame(b"", sections=[section_bytes(body, name=b"Bad!")]), "f")
    with pytest.raises(A.ArtifactError, match=r"^f: section 'lora': its meta key is taken"):
        A.decode(frame(b"", sections=[section_bytes(payload(manifest(meta={"lora": 1}))),
                                      section_bytes(body, name=b"lora")]), "f")
    w = payload(manifest(entry()), bytes(8))
    with pytest.raises(A.ArtifactError, match=r"^f: section 'lora': tensor 'w' is also in an earlier section"):
        A.decode(frame(b"", sections=[section_bytes(w), section_bytes(w, name=b"lora")]), "f")
    bad_table = bytearray(section_bytes(body))
    bad_table[6 + 13] ^= 1  # the chunk's raw length no longer adds up to the section's
    with pytest.raises(A.ArtifactError, match=r"^f: section 'model': chunk lengths add up to"):
        A.decode(frame(b"", sections=[bytes(bad_table)]), "f")
    with pytest.raises(A.ArtifactError, match=r"^f: bad section #0: chunk of 99 bytes extends past"):
        A.decode(frame(b"", sections=[section_bytes(body)[:-len(body)][:-8] + struct.pack("<Q", 99) + body]), "f")
    with pytest.raises(A.ArtifactError, match="section names must be unique"):
        A.assemble([AT.compress_section("model", {}, {}, "none")] * 2)
    with pytest.raises(A.ArtifactError, match="section name 'Model'"):
        AT.compress_section("Model", {}, {}, "none")
