"""The model artifact: one binary format (no pickle) made of independently compressed sections, byte accounting per
section, and the size gate.

File layout (format version 2; all integers little-endian):

    offset  size  field
    0       4     magic b"LCQA"
    4       2     format version (u16), currently 2
    6       2     section count (u16, >= 1)
    8       8     body length (u64): bytes after the 48-byte header
    16      32    sha256 of bytes 0..16 followed by the body
    48      ...   body: the sections back to back

Section:

    1       name length n (u8, 1..32), then n bytes of name ([a-z][a-z0-9_]*)
    1       compressor id (u8): 0 none, 1 lzma, 2 brotli, 3 lrzip
    8       raw length (u64): bytes of the uncompressed section payload
    4       chunk count k (u32, >= 1)
    16 k    chunk table: (raw length u64, stored length u64) per chunk
    ...     the k stored chunks back to back, each compressed on its own

A section's uncompressed payload (its chunks decompressed and joined) is a u32 manifest length, the manifest (UTF-8
JSON, sorted keys, compact separators), then the data region. The manifest is {"meta": <caller's dict>,
"tensors": [entry, ...]} with entries in sorted name order, each {"name", "dtype", "shape", "layout", "offset",
"nbytes"} (+ "bits" and "bias" for layout "bits"); offset is relative to the start of the section's data region.
decode() returns every section's tensors together (names are unique across sections) and one meta dict: the first
section's meta, with each later section's meta under that section's name (the pipeline ships "model" then "lora",
so meta["lora"] is the LoRA section's meta). The checksum covers the header fields too, so a flipped byte anywhere
after the magic is reported before any decompression or parsing happens.

Why sections (issue 8, docs/time-and-bytes.md): the quantized base model is compressed on host threads while LCQ
distils on the device, and after distillation only the LoRA is compressed. A section's bytes are its bytes, so the
LoRA's share of the artifact is exact, with no attribution estimate. Why chunks: a chunk is compressed by its own
thread, so a large payload uses the host's cores; the split point is fixed (CHUNK_BYTES), never the core count, so
the bytes do not depend on the machine.

Dtypes: int8, uint8, int16, int32, int64, float16, bfloat16, float32, float64, bool. Floats and bool are carried
as same-size integers (bfloat16 viewed as int16), so NaN payloads and -0.0 survive bit for bit.

Layouts (chosen by encode from the dtype and the values, recorded per tensor so decode needs no heuristics):
- "raw": the tensor's little-endian bytes. Used for 1-byte ints whose range needs more than 4 bits.
- "planes": for itemsize k > 1, the k byte planes of the little-endian values one after another (all lowest
  bytes, then all next bytes, ...). Floats compress 4-9% smaller this way (measured on N(0, 0.02) matrices:
  fp16 1.81 -> 1.70 B/param under lzma, bf16 1.43 -> 1.34 under brotli, fp32 3.68 -> 3.36 under lzma).
- "bits": 1-byte ints whose values lie in [bias, bias + 2**bits - 1] with bits in {1, 2, 4}: value - bias packed
  8 // bits per byte, first element in the lowest bits, the last byte zero-padded. Measured on 2M Gaussian
  weights (row scales spread 0.5-2x, 0.1% outliers at 6x) quantized with per-row absmax scales: int4 values
  0.374 -> 0.350 B/param (lzma) and 0.341 -> 0.335 (brotli); int3 in 4-bit fields 0.272 -> 0.251 (lzma).
  Widths that do not divide 8 are never used: packing int6 as 6-bit fields made the output 7-15% larger
  (0.671 -> 0.719 B/param lzma, 0.659 -> 0.706 brotli) because it breaks the byte alignment both compressors
  model; zig-zag, offset-binary and column-major orders of int6 changed sizes by
  at most 0.2%, so int5..int8 values stay in plain int8 bytes (int6: 0.670 B/param lzma, 0.659 brotli; the
  order-0 entropy is 0.655).
- "grouped" (issue 11, written only by COMPRESSOR=group, lcq.grouping): a 2-D tensor of 1-byte values with "major"
  ("row" or "col") and "perm" (0, 2 or 4 bytes per row index), and "bits"/"bias" as above (bits 0: plain bytes). The
  data is the row order first when perm > 0 (u16/u32 indices: stored row i is tensor row perm[i]), then the rows in
  that order, written row-major or column-major, packed as "bits"/"raw" would pack them. Decode checks that the order
  is a permutation and puts every row back. A reader without this layout refuses the tensor by name.

Compressors are fixed so the same input always gives the same bytes ("lrzip", the ZPAQ back-end of the lrzip binary,
is run with fixed flags, see _LRZIP_ARGS; reading it needs the binary): "lzma" is a raw LZMA2 stream at
preset 9 | PRESET_EXTREME (raw, because our header already carries lengths and a checksum, which saves the 51-byte
xz container); "brotli" is quality 11, lgwin 24; "none" is for debugging. Both are fed in fixed SLICE_BYTES slices
(so a running job can stop early) and flushed once at the end. Tuning lc/lp/pb moved int6 sizes by under 0.5%
either way and a delta filter made them ~7% larger, so the preset's defaults stay.
"""
from __future__ import annotations

import contextlib
import hashlib
import heapq
import json
import lzma
import math
import os
import re
import shutil
import struct
import subprocess
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import brotli
import numpy as np
import torch

ARTIFACT_CAP_BYTES = 16_000_000  # decimal bytes, the competition's cap on code + model
MAGIC = b"LCQA"
FORMAT_VERSION = 2  # 2: sections of chunks (issue 8); 1 was one compressed payload
_HEAD = struct.Struct("<4sHHQ")
HEADER_BYTES = _HEAD.size + 32
_SECTION = struct.Struct("<BQI")  # compressor id, raw length, chunk count (after the name)
_CHUNK = struct.Struct("<QQ")  # raw length, stored length
_MANIFEST_LEN = struct.Struct("<I")
_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
# A section is split into chunks of this many raw bytes, each compressed by its own thread. Fixed (never derived
# from the core count) so the bytes are the same on every machine. Measured on the record-size int6 payload (32.4 MB;
# BENCHMARKS.md, "Serialization"): two chunks instead of one stream cost brotli -0.0004% (13,741,407 -> 13,741,353
# bytes) and lzma +0.11%; 4 MiB chunks of the 35.4 MB payload of the later record preset cost brotli -0.006%, far
# under the 0.5% issue 8 allows: int6 codes are near-iid, so little context is lost at a cut. 9 chunks at record size.
CHUNK_BYTES = 4 << 20
# Compressors are fed this many bytes at a time, so that a cancelled or dropped job stops within a slice (brotli-11
# took 0.1-0.6 s per 256 KiB slice of int6 codes on the 2-core CI machine); the bytes do not depend on it.
SLICE_BYTES = 256 << 10


class ArtifactError(ValueError):
    """An artifact that cannot be written or read (bad input, corrupted or truncated file)."""


class GateError(RuntimeError):
    """The submission (code + model + LoRA bytes) is over the size cap."""


# dtype name -> (torch dtype, little-endian integer numpy dtype that carries its bits unchanged)
_DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "int8": (torch.int8, "<i1"),
    "uint8": (torch.uint8, "<u1"),
    "int16": (torch.int16, "<i2"),
    "int32": (torch.int32, "<i4"),
    "int64": (torch.int64, "<i8"),
    "float16": (torch.float16, "<i2"),
    "bfloat16": (torch.bfloat16, "<i2"),
    "float32": (torch.float32, "<i4"),
    "float64": (torch.float64, "<i8"),
    "bool": (torch.bool, "<u1"),  # 0/1 bytes, which the "bits" layout packs 8 per byte
}
_DTYPE_NAMES = {td: name for name, (td, _) in _DTYPES.items()}
_INT_CARRIER = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_PACK_WIDTHS = (1, 2, 4)

_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]


def _lzma_stream(stop=None):
    c = lzma.LZMACompressor(format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    return c.compress, c.flush


def _brotli_stream(stop=None):
    c = brotli.Compressor(quality=11, lgwin=24)
    return c.process, c.finish


LRZIP_INSTALL = "apt-get install lrzip"  # Debian/Ubuntu package of the binary (#1855's README asks for the same)
# lrzip (Con Kolivas) with its ZPAQ context-mixing back-end, as #1855's per-group compressor ran it (`-z -L 9`), plus
# what makes its bytes the same on every machine: -T keeps its LZ4 pre-test from storing int6 codes uncompressed (it
# did on a 4 MiB int6 chunk: ratio 1.000), -p 1 fixes the thread count (lrzip otherwise takes it from the host, and
# our pool already runs one chunk per core), -w 1 fixes the window (100 MB, above any chunk; the default follows the
# RAM), LRZIP=NOCONFIG ignores any lrzip.conf. -N 0: its default nice 19 lets any other work on the host starve it; the
# brotli threads are not niced either.
_LRZIP_ARGS = ("-z", "-L", "9", "-T", "-p", "1", "-w", "1", "-N", "0", "-Q", "-f")


def lrzip_binary() -> str | None:
    """Path of the lrzip binary on PATH (None: not installed)."""
    return shutil.which("lrzip")


def _lrzip(args: tuple[str, ...], data: bytes, what: str, stop: Callable[[], bool] | None = None) -> bytes | None:
    """Run lrzip on `data` through temp files (it reads and writes files; stdin/stdout mode buffers the same). The
    child is killed, and None returned, as soon as `stop()` says so (a job that dropped lrzip, issue 25: a running
    chunk held a core for seconds after the drop)."""
    exe = lrzip_binary()
    if exe is None:
        raise ArtifactError(f"{what} needs the lrzip binary, which is not on PATH: install it ({LRZIP_INSTALL}) "
                            "and run again")
    with tempfile.TemporaryDirectory(prefix="lcq-lrzip-") as tmp:
        src, dst = os.path.join(tmp, "in"), os.path.join(tmp, "out")
        Path(src).write_bytes(data)
        proc = subprocess.Popen([exe, *args, "-o", dst, src], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=dict(os.environ, LRZIP="NOCONFIG"))
        while True:
            try:
                out, err = proc.communicate(timeout=0.05)
                break
            except subprocess.TimeoutExpired:
                if stop is not None and stop():
                    proc.kill()
                    proc.communicate()
                    return None
        if proc.returncode != 0 or not os.path.exists(dst):
            err = (err or out).decode("utf-8", "replace").strip()[-300:]
            raise ArtifactError(f"{what}: {exe} {' '.join(args)} failed with exit status {proc.returncode}: {err}")
        return Path(dst).read_bytes()


def _lrzip_stream(stop=None):
    """lrzip compresses whole files: feed collects the chunk, finish compresses it (None: stopped, see _lrzip)."""
    parts: list[bytes] = []

    def feed(piece) -> bytes:
        parts.append(bytes(piece))
        return b""

    return feed, lambda: _lrzip(_LRZIP_ARGS, b"".join(parts), "lrzip compression", stop)


# name -> (id, stream factory (stop) -> (feed, finish), decompress)
_COMPRESSORS: dict[str, tuple[int, Callable[[], tuple[Callable, Callable]], Callable[[bytes], bytes]]] = {
    "none": (0, lambda stop=None: (bytes, bytes), bytes),
    "lzma": (1, _lzma_stream, lambda b: lzma.decompress(b, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)),
    "brotli": (2, _brotli_stream, brotli.decompress),
    "lrzip": (3, _lrzip_stream, lambda b: _lrzip(("-d", "-Q", "-f"), bytes(b), "this artifact (lrzip section)")),
}
_COMPRESSOR_BY_ID = {cid: name for name, (cid, _, _) in _COMPRESSORS.items()}
AUTO_ORDER = ("lzma", "brotli")  # "auto" tries these; on equal sizes the earlier one wins


def _chunk_spans(n: int, chunk_bytes: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + chunk_bytes, n)) for lo in range(0, n, chunk_bytes)] or [(0, 0)]


def _section_head_bytes(name: str, chunks: int) -> int:
    return 1 + len(name) + _SECTION.size + chunks * _CHUNK.size


# ---------------------------------------------------------------------------------------------- encode

def _to_le_array(name: str, t: torch.Tensor) -> tuple[str, np.ndarray]:
    """The tensor's values as a flat little-endian integer array with the same bits (floats viewed, not cast)."""
    if not isinstance(t, torch.Tensor):
        raise ArtifactError(f"tensor {name!r}: expected a torch.Tensor, got {type(t).__name__}")
    dtype = _DTYPE_NAMES.get(t.dtype)
    if dtype is None:
        raise ArtifactError(f"tensor {name!r}: dtype {t.dtype} is not one of {', '.join(_DTYPES)}")
    t = t.detach().cpu().contiguous().reshape(-1)
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    elif t.dtype.is_floating_point:
        t = t.view(_INT_CARRIER[t.element_size()])
    return dtype, t.numpy().astype(_DTYPES[dtype][1], copy=False)


def _pack_bits(u: np.ndarray, bits: int) -> bytes:
    per = 8 // bits
    u = np.concatenate([u, np.zeros((-u.size) % per, np.uint8)]).reshape(-1, per)
    out = np.zeros(u.shape[0], np.uint8)
    for j in range(per):
        out |= u[:, j] << np.uint8(j * bits)
    return out.tobytes()


def _unpack_bits(b: np.ndarray, bits: int, n: int) -> np.ndarray:
    per, mask = 8 // bits, np.uint8((1 << bits) - 1)
    out = np.empty((b.size, per), np.uint8)
    for j in range(per):
        out[:, j] = (b >> np.uint8(j * bits)) & mask
    return out.reshape(-1)[:n]


def _pack_bytes(arr: np.ndarray) -> tuple[dict, bytes]:
    """1-byte values: bit-packed ("bits", "bias") when their range fits 1, 2 or 4 bits, else their bytes (bits 0)."""
    lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 255)
    bits = next((w for w in _PACK_WIDTHS if hi - lo < (1 << w)), None)
    if bits is None:
        return {"bits": 0}, arr.tobytes()
    return {"bits": bits, "bias": lo}, _pack_bits((arr.astype(np.int16) - lo).astype(np.uint8), bits)


@dataclass(frozen=True)
class Arrangement:
    """How a 2-D tensor of 1-byte values is laid out in the "grouped" layout (issue 11, lcq.grouping): rows taken in
    the order `perm` (None: as they are; stored[i] = tensor[perm[i]]), then written row-major or column-major."""

    major: str = "row"
    perm: np.ndarray | None = None


def _encode_tensor(name: str, t: torch.Tensor, arrange: Arrangement | None = None) -> tuple[dict, bytes]:
    dtype, arr = _to_le_array(name, t)
    entry: dict = {"name": name, "dtype": dtype, "shape": list(t.shape)}
    k = arr.dtype.itemsize
    if arrange is not None:
        if k != 1 or t.dim() != 2:
            raise ArtifactError(f"tensor {name!r}: the grouped layout takes 2-D tensors of 1-byte values, got "
                                f"{dtype} {list(t.shape)}")
        rows, cols = t.shape
        a = arr.reshape(rows, cols)
        prefix, width = b"", 0
        if arrange.perm is not None:
            perm = np.asarray(arrange.perm)
            if perm.shape != (rows,) or not np.array_equal(np.sort(perm), np.arange(rows)):
                raise ArtifactError(f"tensor {name!r}: perm is not a permutation of its {rows} rows")
            width = 2 if rows <= 1 << 16 else 4
            prefix, a = perm.astype(f"<u{width}").tobytes(), a[perm]
        fields, data = _pack_bytes(np.ascontiguousarray(a.T if arrange.major == "col" else a).reshape(-1))
        entry.update(layout="grouped", major=arrange.major, perm=width, **fields)
        data = prefix + data
    elif k > 1:
        entry["layout"] = "planes"
        data = arr.view(np.uint8).reshape(-1, k).T.tobytes()
    else:
        fields, data = _pack_bytes(arr)
        if fields["bits"]:
            entry.update(layout="bits", **fields)
        else:
            entry["layout"] = "raw"
    entry["nbytes"] = len(data)
    return entry, data


def _payload(tensors: Mapping[str, torch.Tensor], meta: dict,
             arrange: Mapping[str, Arrangement] | None = None) -> bytes:
    """Uncompressed payload: u32 manifest length, manifest JSON, data region (sorted names, back to back). Tensors
    named in `arrange` take the "grouped" layout."""
    if not isinstance(meta, dict):
        raise ArtifactError(f"meta must be a dict, got {type(meta).__name__}")
    arrange = arrange or {}
    entries, chunks, offset = [], [], 0
    for name in sorted(tensors):
        if not isinstance(name, str):
            raise ArtifactError(f"tensor names must be str, got {name!r}")
        entry, data = _encode_tensor(name, tensors[name], arrange.get(name))
        entry["offset"] = offset
        offset += len(data)
        entries.append(entry)
        chunks.append(data)
    try:
        manifest = json.dumps({"meta": meta, "tensors": entries}, sort_keys=True, separators=(",", ":"),
                              allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"meta is not JSON ({e})") from e
    return b"".join([_MANIFEST_LEN.pack(len(manifest)), manifest, *chunks])


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ArtifactError(f"section name {name!r}: use 1-32 characters [a-z0-9_] starting with a letter")


def _check_compressor(compressor: str) -> None:
    if compressor != "auto" and compressor not in _COMPRESSORS:
        raise ArtifactError(f"unknown compressor {compressor!r}; use one of {', '.join(_COMPRESSORS)} or 'auto'")


@dataclass(frozen=True)
class Section:
    """One compressed section as it is stored: name, compressor, raw payload length and (raw length, stored bytes)
    per chunk. `seconds` is the wall time its compression took and `variant` the payload layout kept (not stored)."""

    name: str
    compressor: str
    raw_bytes: int
    chunks: tuple[tuple[int, bytes], ...]
    seconds: float = 0.0
    variant: str = ""  # which layout of the payload was kept, when a job tried several (lcq.grouping)

    @property
    def nbytes(self) -> int:
        """Bytes this section takes in the file: what it costs under the cap."""
        return _section_head_bytes(self.name, len(self.chunks)) + sum(len(c) for _, c in self.chunks)

    def to_bytes(self) -> bytes:
        name = self.name.encode("ascii")
        head = bytes([len(name)]) + name + _SECTION.pack(_COMPRESSORS[self.compressor][0], self.raw_bytes,
                                                         len(self.chunks))
        table = b"".join(_CHUNK.pack(n, len(c)) for n, c in self.chunks)
        return b"".join([head, table, *(c for _, c in self.chunks)])


@dataclass(frozen=True)
class Unit:
    """One section to compress: its name, its payload in one or more layouts (`variants`: (label, raw payload), e.g.
    the plain layout and a grouped one, lcq.grouping) and the compressors to try; the smallest (variant, compressor)
    pair is stored (ties: the earlier variant, then the earlier compressor)."""

    name: str
    variants: tuple[tuple[str, bytes], ...]
    compressors: tuple[str, ...]


def serialize_threads(requested: int) -> int:
    """Compression threads for SERIALIZE_THREADS=requested. 0: the host's cores less two per rank process on this host
    (LOCAL_WORLD_SIZE, set by torchrun), at least one: the ranks are still running LCQ while the model section
    compresses, and a launch-bound rank needs its core and its loader thread's (issue 18)."""
    if requested:
        return requested
    return max(1, (os.cpu_count() or 1) - 2 * int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def projected_seconds(tasks: list[tuple[str, int, float | None]], rates: Mapping[str, float], threads: int,
                      skip: tuple[str, ...] = ()) -> float:
    """Seconds until a pool of `threads` threads is done with `tasks`, (compressor, raw bytes, seconds it has run;
    None while queued) in queue order, at `rates` (bytes per thread-second): a running task takes what its rate leaves
    of it, each queued one goes to the first thread free, as in ThreadPoolExecutor; those of `skip` (dropped: they stop
    at their next slice, lrzip's child killed) take none. Exact when the rates are."""
    free = sorted(max(0.0, n / rates[c] - ran) for c, n, ran in tasks if ran is not None and c not in skip)
    free = [0.0] * (threads - len(free)) + free  # ascending: a heap
    for c, n, ran in tasks:
        if ran is None and c not in skip:
            heapq.heappush(free, heapq.heappop(free) + n / rates[c])
    return max(free, default=0.0)


def to_drop(tasks: list[tuple[str, int, float | None]], rates: Mapping[str, float], threads: int, seconds: float,
            droppable: set[str]) -> tuple[str, ...]:
    """The compressors of `droppable` to drop, slowest rate first, until the rest of `tasks` is projected done within
    `seconds` (projected_seconds)."""
    out: tuple[str, ...] = ()
    for c in sorted(droppable, key=rates.get):
        if projected_seconds(tasks, rates, threads, out) <= seconds:
            break
        out += (c,)
    return out


@dataclass
class _Task:
    """One (chunk, compressor) of a job: its raw bytes, when a thread started it, how long it took (inf: stopped)."""

    compressor: str
    nbytes: int
    start: float | None = None
    seconds: float | None = None


class CompressJob:
    """Sections being compressed on host threads (lzma and brotli release the GIL; lrzip runs as a child process),
    started at construction.

    `units` is the list of sections to compress, or a function that builds it: the function then runs on the job's
    first thread (so a caller does not wait for it, e.g. the row sort of lcq.grouping), and the compression starts when
    it returns. Every (unit, variant, chunk, compressor) is a task for a pool of `threads` threads (default: the host's
    cores), queued largest first, equal sizes taking the compressors in turn (so the first tasks time each compressor
    on a full chunk). A task is timed whole, finish included, and the job projects when it will be done from the rates
    of the chunks it has finished in this process (the pipeline budgets LCQ with it): none before, because a chunk's
    first slices compress several times faster than its last (brotli's window fills; issue 17's 9.4 s projection of a
    95 s job came from such slices) and a small section faster than a large one.

    `deadline`: seconds from the start by which the job must be done. A unit's last compressor is its fallback (brotli
    in COMPRESSOR=group and auto: lrzip, lzma are dropped); at every slice boundary the others are dropped, slowest first, while the job is
    projected to finish later (to_drop). That projection does not wait for a finished chunk: a compressor not timed
    yet is taken at the fastest rate its running tasks still allow (their bytes over the seconds they have run; none
    started: no time), so a drop needs only evidence that the job would be late, and comes as soon as there is some.
    A dropped compressor's queued tasks are skipped and its running lrzip children killed; `choice` says what was kept and why."""

    def __init__(self, units: list[Unit] | Callable[[], list[Unit]], threads: int | None = None,
                 chunk_bytes: int = CHUNK_BYTES, deadline: float | None = None, cache: dict | None = None):
        self.started = time.perf_counter()
        # (compressor, sha256 of a chunk) -> its stored bytes, shared by jobs over nearly equal payloads (the fit's
        # probes, lcq.shipping); a chunk found there is not timed
        self._cache = cache
        self.threads = max(1, threads or os.cpu_count() or 1)
        self.raw_bytes = 0  # bytes each compressor reads (every variant of every unit), once the units are known
        self.plan_seconds: float | None = None  # building the units (lcq.grouping's planning), before any task
        self.deadline, self.choice, self.dropped = deadline, "", set()
        self.tasks: list[_Task] = []
        self._chunk_bytes = chunk_bytes
        self._lock = threading.Lock()
        self._cancelled = threading.Event()
        self._droppable: set[str] = set()  # compressors that are no unit's last
        self._plan: list[tuple[Unit, list[tuple[str, bytes, list, dict[str, list[Future]]]]]] = []
        self._sections: list[Section] | None = None
        self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="lcq-compress")
        if callable(units):
            self._prepared = self._pool.submit(self._start, units)
        else:
            self._prepared = Future()
            self._prepared.set_result(self._start(units))

    def _start(self, units: list[Unit] | Callable[[], list[Unit]]) -> None:
        try:
            if callable(units):
                units = units()
            if self._cancelled.is_set():
                return
            for u in units:  # our own code builds the units; the caller's names and compressors are checked here
                _check_name(u.name)
                for c in u.compressors:
                    _check_compressor(c)
            queue, turn = [], {}
            with self._lock:
                self._droppable = {c for u in units for c in u.compressors} - {u.compressors[-1] for u in units}
                self.raw_bytes = sum(len(raw) for u in units for _, raw in u.variants)
                for u in units:
                    variants = []
                    for label, raw in u.variants:
                        spans = _chunk_spans(len(raw), self._chunk_bytes)
                        futures = {c: [None] * len(spans) for c in u.compressors}
                        for c in u.compressors:
                            for i, (lo, hi) in enumerate(spans):
                                turn[c] = turn.get(c, 0) + 1
                                queue.append((lo - hi, turn[c], len(queue), _Task(c, hi - lo), raw, lo, futures[c], i))
                        variants.append((label, raw, spans, futures))
                    self._plan.append((u, variants))
                for *_, task, raw, lo, futures, i in sorted(queue, key=lambda q: q[:3]):
                    self.tasks.append(task)
                    futures[i] = self._pool.submit(self._compress, task, raw, lo, lo + task.nbytes)
                self.threads = max(1, min(self.threads, len(queue)))
                self.plan_seconds = time.perf_counter() - self.started
        finally:
            self._pool.shutdown(wait=False)  # the workers exit once the queue is drained

    def _stopped(self, compressor: str) -> bool:
        """Decide (with a deadline), then whether a task of `compressor` stops."""
        if self.deadline is not None:
            self._decide()
        return self._cancelled.is_set() or compressor in self.dropped

    def _compress(self, task: _Task, raw: bytes, lo: int, hi: int) -> bytes | None:
        key = None if self._cache is None else (task.compressor, hashlib.sha256(memoryview(raw)[lo:hi]).digest())
        if key in (self._cache or {}):
            task.start, task.seconds = time.perf_counter(), math.inf
            return self._cache[key]
        task.start = time.perf_counter()
        feed, finish = _COMPRESSORS[task.compressor][1](lambda: self._stopped(task.compressor))
        view = memoryview(raw)
        out = []
        for at in [*range(lo, hi, SLICE_BYTES), None]:  # None: the finish, where lrzip does all its work
            piece = None if self._stopped(task.compressor) else finish() if at is None else \
                feed(view[at:min(at + SLICE_BYTES, hi)])
            if piece is None:
                task.seconds = math.inf
                return None
            out.append(piece)
        task.seconds = time.perf_counter() - task.start
        self._stopped(task.compressor)  # a new rate: decide again
        if key is not None:
            self._cache[key] = b"".join(out)
        return b"".join(out)

    def _rates(self, bound: bool = False) -> dict[str, float] | None:
        """Under the lock: bytes per thread-second of each compressor over its finished tasks; None until each one in
        use has finished one. With `bound`, one not timed yet gets the most its running tasks allow (inf: none runs)."""
        now, n, s, most = time.perf_counter(), {}, {}, {}
        for t in self.tasks:
            c = t.compressor
            if t.seconds is None and t.start is not None:
                most[c] = min(most.get(c, math.inf), t.nbytes / max(now - t.start, 1e-9))
            elif t.seconds is not None and t.seconds < math.inf:
                n[c], s[c] = n.get(c, 0) + t.nbytes, s.get(c, 0) + t.seconds
        rates = {c: n[c] / max(s[c], 1e-9) for c in n}
        if bound:
            return {t.compressor: rates.get(t.compressor, most.get(t.compressor, math.inf)) for t in self.tasks}
        use = {t.compressor for t in self.tasks} - self.dropped
        return rates if self.tasks and use <= set(rates) else None

    def _left(self) -> list[tuple[str, int, float | None]]:
        """Under the lock: the tasks still to run, as projected_seconds takes them (a dropped compressor's stop at
        their next slice; its lrzip children are killed)."""
        now = time.perf_counter()
        return [(t.compressor, t.nbytes, None if t.start is None else now - t.start) for t in self.tasks
                if t.seconds is None and t.compressor not in self.dropped]

    def _decide(self) -> None:
        """Drop what would make the job late (see the class); say what was kept or dropped, and why."""
        with self._lock:
            if not self.tasks:
                return
            rates, tasks, t = self._rates(bound=True), self._left(), time.perf_counter() - self.started
            drop = to_drop(tasks, rates, self.threads, self.deadline - t, self._droppable - self.dropped)
            self.dropped.update(drop)
            if drop or not self.choice and self._rates():  # with a drop, the projection is with what it drops
                self.choice = (f"at {t:.1f}s {' '.join(drop or sorted(rates))} {'dropped' if drop else 'kept'}: "
                               f"projected done at {t + projected_seconds(tasks, rates, self.threads):.1f}s, due {self.deadline:.1f}s")

    def _futures(self) -> list[Future]:
        with self._lock:
            return [f for _, variants in self._plan for *_, futures in variants for fs in futures.values() for f in fs]

    def done(self) -> bool:
        return self._prepared.done() and all(f.done() for f in self._futures())

    def rates(self, wait_s: float = 0.0) -> dict[str, float] | None:
        """Bytes per thread-second of each compressor over the chunks it has finished (None until each compressor
        still in use has finished one; waits up to `wait_s` for that). Wall time of the compressing threads, so it
        includes whatever else competes for the cores."""
        deadline = time.perf_counter() + wait_s
        while True:
            with self._lock:
                rates = self._rates()
            if rates is not None or self.done() or time.perf_counter() >= deadline:
                return rates
            time.sleep(0.01)

    def seconds_left(self, wait_s: float = 0.0) -> float | None:
        """Projected wall seconds until the job is done: the tasks not finished at their compressors' measured rates
        on the job's threads (projected_seconds); None until each compressor in use has finished a chunk."""
        if self.done():
            return 0.0
        if self.rates(wait_s) is None:
            return None
        with self._lock:  # a dropped compressor's running chunk may not be timed yet: its bound
            return projected_seconds(self._left(), self._rates(bound=True), self.threads)

    def cancel(self) -> None:
        """Stop at the next slice (the inputs changed: e.g. baked LCQ re-quantized the model)."""
        self._cancelled.set()

    def sections(self) -> list[Section]:
        """Wait for every chunk and return the sections in the order of the units (raises what a compressor or the
        units' builder raised). A dropped compressor's results are used for a section whose chunks it all finished."""
        if self._sections is None:
            self._prepared.result()
            if self._cancelled.is_set():
                raise ArtifactError("the compression job was cancelled")
            out = []
            for unit, variants in self._plan:
                best = None
                for label, raw, spans, futures in variants:
                    for c in unit.compressors:
                        chunks = [f.result() for f in futures[c]]
                        if None in chunks:  # cancelled, or dropped before it finished
                            continue
                        size = sum(len(b) for b in chunks)
                        if best is None or size < best[0]:
                            best = (size, label, c, len(raw), tuple((hi - lo, b) for (lo, hi), b in zip(spans, chunks)))
                if best is None:  # a unit's last compressor is never dropped
                    raise ArtifactError("the compression job was cancelled")
                _, label, c, raw_len, chunks = best
                out.append(Section(unit.name, c, raw_len, chunks, time.perf_counter() - self.started, label))
            self._sections = out
            self._plan = []  # the payloads are no longer needed
        return self._sections


class SectionJob(CompressJob):
    """One section being compressed on host threads, started at construction (see CompressJob).

    The payload is built in the caller's thread (so the tensors may change afterwards), cut into CHUNK_BYTES chunks,
    and every (chunk, candidate compressor) pair is compressed by the pool. "auto" compresses every chunk with each of
    AUTO_ORDER and keeps the compressor with the smaller section."""

    def __init__(self, name: str, tensors: Mapping[str, torch.Tensor], meta: dict, compressor: str,
                 threads: int | None = None, chunk_bytes: int = CHUNK_BYTES, deadline: float | None = None,
                 cache: dict | None = None):
        candidates = AUTO_ORDER if compressor == "auto" else (compressor,)
        super().__init__([Unit(name, (("", _payload(tensors, meta)),), candidates)], threads, chunk_bytes, deadline,
                         cache)

    def result(self) -> Section:
        """Wait for every chunk and return the section (raises what a compressor raised)."""
        return self.sections()[0]


def assemble(sections: list[Section]) -> bytes:
    """The artifact file: header + the sections in the given order."""
    if not sections or len(sections) > 0xFFFF:
        raise ArtifactError(f"an artifact holds 1..65535 sections, got {len(sections)}")
    names = [sec.name for sec in sections]
    if len(set(names)) != len(names):
        raise ArtifactError(f"section names must be unique, got {names}")
    body = b"".join(sec.to_bytes() for sec in sections)
    head = _HEAD.pack(MAGIC, FORMAT_VERSION, len(sections), len(body))
    return head + hashlib.sha256(head + body).digest() + body


# ---------------------------------------------------------------------------------------------- decode

def _read_header(blob: bytes, source: str) -> tuple[int, memoryview]:
    """Check everything the header promises; return (section count, body)."""
    if len(blob) < HEADER_BYTES:
        raise ArtifactError(f"{source}: truncated: {len(blob)} bytes is shorter than the {HEADER_BYTES}-byte "
                            "artifact header")
    magic, version, count, body_len = _HEAD.unpack_from(blob)
    if magic != MAGIC:
        raise ArtifactError(f"{source}: bad magic {magic!r} (expected {MAGIC!r}); not an lcq artifact")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{source}: format version {version}; this lcq reads {FORMAT_VERSION} only")
    have = len(blob) - HEADER_BYTES
    if have < body_len:
        raise ArtifactError(f"{source}: truncated: header says {body_len} body bytes but only {have} follow")
    if have > body_len:
        raise ArtifactError(f"{source}: {have - body_len} trailing bytes after the {body_len}-byte body")
    view = memoryview(blob)
    body = view[HEADER_BYTES:]
    digest = hashlib.sha256(view[:_HEAD.size])
    digest.update(body)
    if digest.digest() != bytes(view[_HEAD.size:HEADER_BYTES]):
        raise ArtifactError(f"{source}: checksum mismatch: the artifact is corrupted")
    if count < 1:
        raise ArtifactError(f"{source}: bad header: 0 sections")
    return count, body


@dataclass(frozen=True)
class SectionInfo:
    """Where a section sits in a verified file and what it holds (from its header)."""

    name: str
    compressor: str
    raw_bytes: int
    nbytes: int  # bytes it takes in the file, header and chunk table included
    chunks: tuple[tuple[int, memoryview], ...]  # (raw length, stored bytes)


def max_raw_bytes(file_bytes: int) -> int:
    """The most uncompressed bytes a reader accepts from a file of `file_bytes` (issue 17: a re-hashed 3.3 KB chunk
    inflated to 4 GiB). Our payloads are int codes and scales that compress 1.3-3x, so 32x the file, with a floor for
    the small files of tests and all-zero factors (a zero-started LoRA compresses ~1000x), bounds a crafted file's
    memory by a multiple of its size."""
    return max(128 << 20, 32 * file_bytes)


def _read_sections(blob: bytes, source: str) -> list[SectionInfo]:
    count, body = _read_header(blob, source)
    out, at = [], 0

    def take(n: int, what: str) -> memoryview:
        nonlocal at
        if at + n > len(body):
            raise ArtifactError(f"{source}: bad section #{len(out)}: {what} extends past the {len(body)}-byte body")
        at += n
        return body[at - n:at]

    for _ in range(count):
        start = at
        name = bytes(take(take(1, "name length")[0], "name")).decode("ascii", "replace")
        if not _NAME.fullmatch(name):
            raise ArtifactError(f"{source}: bad section #{len(out)}: name {name!r} is not [a-z][a-z0-9_]*")
        if any(sec.name == name for sec in out):
            raise ArtifactError(f"{source}: section {name!r} appears twice")
        cid, raw_len, k = _SECTION.unpack(take(_SECTION.size, "header"))
        if cid not in _COMPRESSOR_BY_ID:
            raise ArtifactError(f"{source}: section {name!r}: unknown compressor id {cid}")
        if k < 1:
            raise ArtifactError(f"{source}: section {name!r}: 0 chunks")
        packed = take(_CHUNK.size * k, "chunk table")
        table = [_CHUNK.unpack_from(packed, i * _CHUNK.size) for i in range(k)]
        if sum(n for n, _ in table) != raw_len:
            raise ArtifactError(f"{source}: section {name!r}: chunk lengths add up to {sum(n for n, _ in table)}, "
                                f"not the raw length {raw_len}")
        chunks = tuple((n, take(stored, f"chunk of {stored} bytes")) for n, stored in table)
        out.append(SectionInfo(name, _COMPRESSOR_BY_ID[cid], raw_len, at - start, chunks))
    if at != len(body):
        raise ArtifactError(f"{source}: {len(body) - at} bytes after the last of {count} sections")
    raw = sum(sec.raw_bytes for sec in out)
    if raw > max_raw_bytes(len(blob)):
        raise ArtifactError(f"{source}: chunk tables claim {raw} raw bytes from {len(blob)}, refused before "
                            "decompressing")
    return out


def sections_of(blob: bytes, source: str = "<bytes>") -> dict[str, SectionInfo]:
    """The sections of a verified artifact blob, by name, in file order (their nbytes add up to len(blob) minus
    HEADER_BYTES)."""
    return {sec.name: sec for sec in _read_sections(blob, source)}


def _field(entry: dict, key: str, kind: type, where: str):
    value = entry.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ArtifactError(f"{where}: field {key!r} must be {kind.__name__}, got {value!r}")
    return value


def _decode_tensor(entry, data: memoryview, where: str) -> tuple[str, torch.Tensor]:
    if not isinstance(entry, dict):
        raise ArtifactError(f"{where}: expected an object, got {entry!r}")
    name = _field(entry, "name", str, where)
    where = f"{where} ({name!r})"
    dtype = _field(entry, "dtype", str, where)
    if dtype not in _DTYPES:
        raise ArtifactError(f"{where}: unknown dtype {dtype!r} (known: {', '.join(_DTYPES)})")
    shape = _field(entry, "shape", list, where)
    if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**63 for d in shape):
        raise ArtifactError(f"{where}: shape must be a list of ints in [0, 2**63), got {shape!r}")
    offset, nbytes = _field(entry, "offset", int, where), _field(entry, "nbytes", int, where)
    if offset < 0 or nbytes < 0 or offset + nbytes > len(data):
        raise ArtifactError(f"{where}: tensor extends past payload (offset {offset}, nbytes {nbytes}, "
                            f"data region {len(data)} bytes)")
    torch_dtype, le = _DTYPES[dtype]
    n, k = math.prod(shape), np.dtype(le).itemsize
    layout = _field(entry, "layout", str, where)
    expected = {"raw": n * k if k == 1 else None, "planes": n * k if k > 1 else None}
    bits, width = 0, 0
    if layout in ("bits", "grouped") and k == 1:
        bits = _field(entry, "bits", int, where)
        if bits or layout == "bits":
            bias = _field(entry, "bias", int, where)
            info = np.iinfo(le)
            if bits not in _PACK_WIDTHS or bias < info.min or bias + (1 << bits) - 1 > info.max:
                raise ArtifactError(f"{where}: bad bit packing (bits {bits}, bias {bias}) for dtype {dtype}")
        codes = -(-n * bits // 8) if bits else n
        if layout == "bits":
            expected["bits"] = codes
        elif len(shape) == 2:
            major, width = _field(entry, "major", str, where), _field(entry, "perm", int, where)
            if major not in ("row", "col") or width not in (0, 2, 4):
                raise ArtifactError(f"{where}: bad grouped layout (major {major!r}, perm {width})")
            expected["grouped"] = shape[0] * width + codes
    if expected.get(layout) is None:
        raise ArtifactError(f"{where}: unknown layout {layout!r} for dtype {dtype}"
                            + (f" and shape {shape}" if layout == "grouped" else ""))
    if nbytes != expected[layout]:
        raise ArtifactError(f"{where}: nbytes {nbytes} does not match shape {shape}, dtype {dtype}, layout "
                            f"{layout} ({expected[layout]} bytes expected)")
    buf = np.frombuffer(data[offset:offset + nbytes], np.uint8)
    perm = None
    if width:
        perm, buf = buf[:shape[0] * width].view(f"<u{width}"), buf[shape[0] * width:]
        if perm.size and int(perm.max()) >= shape[0]:  # before bincount, which allocates max + 1 counters
            raise ArtifactError(f"{where}: row order names row {perm.max()} of {shape[0]}")
        seen = np.bincount(perm, minlength=shape[0])
        if seen.size != shape[0] or not np.all(seen == 1):
            raise ArtifactError(f"{where}: the stored row order is not a permutation of {shape[0]} rows")
    if bits:
        arr = (_unpack_bits(buf, bits, n).astype(np.int16) + bias).astype(le)
    elif layout == "planes":
        arr = buf.reshape(k, n).T.copy().view(le).reshape(-1)
    else:
        arr = buf.view(le)
    if layout == "grouped":  # undo what Arrangement did: column-major back to rows, rows back to their places
        rows, cols = shape
        a = arr.reshape(cols, rows).T if major == "col" else arr.reshape(rows, cols)
        if perm is not None:
            out = np.empty_like(a)
            out[perm] = a
            a = out
        arr = np.ascontiguousarray(a).reshape(-1)
    if dtype == "bool" and arr.size and arr.max() > 1:
        raise ArtifactError(f"{where}: bool tensor holds values other than 0 and 1")
    arr = arr.astype(np.dtype(le).newbyteorder("="))  # native order, owned and writable
    t = torch.from_numpy(arr)
    if t.dtype != torch_dtype:
        t = t.view(torch_dtype)
    return name, t.reshape(shape)


def _parse(raw: bytes, source: str) -> tuple[dict[str, torch.Tensor], dict]:
    if len(raw) < _MANIFEST_LEN.size:
        raise ArtifactError(f"{source}: bad payload: {len(raw)} bytes cannot hold the manifest length")
    (mlen,) = _MANIFEST_LEN.unpack_from(raw)
    start = _MANIFEST_LEN.size
    if start + mlen > len(raw):
        raise ArtifactError(f"{source}: bad manifest: length {mlen} extends past the {len(raw)}-byte payload")
    try:
        manifest = json.loads(raw[start:start + mlen].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{source}: bad manifest: not valid JSON ({e})") from e
    if not (isinstance(manifest, dict) and isinstance(manifest.get("meta"), dict)
            and isinstance(manifest.get("tensors"), list)):
        raise ArtifactError(f"{source}: bad manifest: expected an object with a 'meta' object and a "
                            "'tensors' list")
    data = memoryview(raw)[start + mlen:]
    tensors: dict[str, torch.Tensor] = {}
    for i, entry in enumerate(manifest["tensors"]):
        name, t = _decode_tensor(entry, data, f"{source}: manifest tensor #{i}")
        if name in tensors:
            raise ArtifactError(f"{source}: bad manifest: tensor {name!r} appears twice")
        tensors[name] = t
    return tensors, manifest["meta"]


def _bounded(compressor: str, stored: memoryview, n: int) -> bytes:
    """Decompress at most n + 1 bytes (enough to see a chunk that is longer than its table says) and stop there."""
    if compressor == "brotli":  # the output stops growing at the limit: fewer bytes means the stream ended
        return brotli.Decompressor().process(stored, output_buffer_limit=n + 1)
    if compressor == "lzma":
        return lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS).decompress(stored, max_length=n + 1)
    if compressor == "lrzip":  # lrzip stores the decoded size at bytes 6..14 of its header and allocates by it
        if len(stored) < 14 or bytes(stored[:4]) != b"LRZI" or struct.unpack_from("<Q", stored, 6)[0] != n:
            raise ValueError("lrzip header does not declare the table's length")
    return _COMPRESSORS[compressor][2](stored)


def _decompress_chunk(sec: SectionInfo, i: int, source: str) -> bytes:
    n, stored = sec.chunks[i]
    try:
        raw = _bounded(sec.compressor, stored, n)
    except Exception as e:  # lzma.LZMAError, brotli.error, a failed lrzip: wrap whatever the codec raises
        raise ArtifactError(f"{source}: section {sec.name!r}: {sec.compressor} chunk {i} does not decompress "
                            f"({e})") from e
    if len(raw) != n:
        raise ArtifactError(f"{source}: section {sec.name!r}: chunk {i} decompressed to "
                            f"{'more than ' * (len(raw) > n)}{len(raw)} bytes but the table says {n}")
    return raw


def _decompress(sec: SectionInfo, source: str) -> bytes:
    return b"".join(_decompress_chunk(sec, i, source) for i in range(len(sec.chunks)))


def decode(blob: bytes, source: str = "<bytes>") -> tuple[dict[str, torch.Tensor], dict]:
    """Verify and parse an artifact blob; every failure is an ArtifactError naming `source`.

    Returns every section's tensors together and the first section's meta with each later section's meta under its
    section name (the first section may only hold null there). Every chunk of every section is decompressed on its own
    thread (lrzip's ZPAQ decodes about as slowly as it encodes: 8.5 s per 4 MiB chunk on the 2-core CI machine,
    BENCHMARKS.md); errors are reported in file order, as a sequential read would."""
    sections = _read_sections(blob, source)
    for sec in sections:
        if sec.compressor == "lrzip" and lrzip_binary() is None:
            raise ArtifactError(f"{source}: section {sec.name!r} is compressed with lrzip, and no lrzip binary is on "
                                f"PATH: install it ({LRZIP_INSTALL}) and load the artifact again")
    tensors: dict[str, torch.Tensor] = {}
    meta: dict = {}
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="lcq-decompress") as pool:
        pending = [[pool.submit(_decompress_chunk, sec, i, source) for i in range(len(sec.chunks))]
                   for sec in sections]
        for i, (sec, chunks) in enumerate(zip(sections, pending)):
            raw = b"".join(f.result() for f in chunks)
            part, sec_meta = _parse(raw, f"{source}: section {sec.name!r}")
            clash = sorted(set(part) & set(tensors))
            if clash:
                raise ArtifactError(f"{source}: section {sec.name!r}: tensor {clash[0]!r} is also in an earlier "
                                    "section")
            tensors.update(part)
            if i == 0:
                meta = sec_meta
            elif meta.get(sec.name) is not None:
                raise ArtifactError(f"{source}: section {sec.name!r}: its meta key is taken")
            else:
                meta[sec.name] = sec_meta
    return tensors, meta


# ---------------------------------------------------------------------------------------------- files

def write(path: str | os.PathLike, blob: bytes) -> int:
    """Write an artifact blob atomically (temp file in the same directory, fsync, then os.replace); return its
    size."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return len(blob)


def load(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read and decode an artifact file; errors name the path."""
    try:
        blob = Path(path).read_bytes()
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read artifact ({e})") from e
    return decode(blob, str(path))


# ---------------------------------------------------------------------------------------------- the gate

@dataclass(frozen=True)
class SizeReport:
    """Submission bytes: code + model + LoRA (model_bytes + lora_bytes = artifact file size) against the cap."""

    code_bytes: int
    model_bytes: int
    lora_bytes: int
    cap: int = ARTIFACT_CAP_BYTES

    def __post_init__(self) -> None:
        for name in ("code_bytes", "model_bytes", "lora_bytes", "cap"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"SizeReport.{name} must be a non-negative int, got {value!r}")

    @property
    def total(self) -> int:
        return self.code_bytes + self.model_bytes + self.lora_bytes

    @property
    def ok(self) -> bool:
        return self.total <= self.cap

    @property
    def margin(self) -> int:
        return self.cap - self.total

    def line(self) -> str:
        return (f"Total submission size: {self.total} bytes (code {self.code_bytes}, model {self.model_bytes}, "
                f"lora {self.lora_bytes}, cap {self.cap})")


def check_gate(report: SizeReport, hint: str = "use fewer parameters or fewer bits per weight") -> None:
    """Raise GateError when the submission is over the cap; `hint` names the knob that would bring it under."""
    if not report.ok:
        over = -report.margin
        raise GateError(f"{report.line()} is {over} byte{'s' if over != 1 else ''} over the cap; to fit: {hint}")
