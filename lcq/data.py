"""Token shards in the challenge's format, per-rank train streams, val tokens, document boundaries, the demo layout.

Shard format (docs/competition.md): 256 little-endian int32 header ints ([0]=magic 20240520, [1]=version 1,
[2]=num_tokens), then num_tokens little-endian uint16 token ids.

Per-token byte sidecar (CaseOps data, PR #1729; records/track_10min_16mb/2026-04-18_PR1626_CaseOps_Taper and
2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611): `fineweb_val_bytes_XXXXXX.bin` next to each
`fineweb_val_XXXXXX.bin`, in the same shard format and of the same length, entry i = the UTF-8 bytes of the original
(pre-transform) text that val token i stands for (0 for BOS and for the case-operator tokens). A tokenizer whose pieces
are not the scored text (CaseOps lowercases and inserts operators) cannot count bytes from its piece table; the sidecar
is the count. Its names also match `fineweb_val_*.bin`, so the val token listing leaves them out.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4


# The demo dataset's layout under one root (built by lcq/tools/corpus.py): the demo/tiny presets' default paths, and
# the only place those presets build data themselves (lcq/from_repo.py).
DEMO_NAME = "demo_sp1024"
DEMO_ROOT = "data/demo"


def demo_paths(root: str | os.PathLike = DEMO_ROOT) -> tuple[Path, Path]:
    root = Path(root)
    return root / "datasets" / DEMO_NAME, root / "tokenizers" / f"{DEMO_NAME}.model"


class ShardError(ValueError):
    """A shard file that is not in the challenge's format."""


# Every shard read goes through read_shard; observers registered here see each path. Tests use
# this to prove that calibration and distillation never open a val shard.
_read_observers: list[list[str]] = []


@contextlib.contextmanager
def record_reads():
    """Collect the path of every shard read inside the block (a list filled as reads happen)."""
    seen: list[str] = []
    _read_observers.append(seen)
    try:
        yield seen
    finally:
        _read_observers.remove(seen)


def write_shard(path: str | os.PathLike, tokens) -> None:
    """Write tokens as a shard, atomically (temp file, then rename)."""
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"write_shard({path}): tokens must be 1-D, got shape {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() >= 2**16):
        raise ValueError(f"write_shard({path}): token ids must fit in uint16 (0..65535)")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, arr.size
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(arr.astype("<u2").tobytes())
    os.replace(tmp, path)


def read_header(path: str | os.PathLike) -> int:
    """Validate a shard's header and size; return its token count."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: {size} bytes, shorter than a shard header; truncated or not a shard")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != MAGIC:
        raise ShardError(f"{path}: bad magic {int(header[0])} (expected {MAGIC}); not a token shard")
    if header[1] != VERSION:
        raise ShardError(f"{path}: unsupported shard version {int(header[1])} (expected {VERSION})")
    n = int(header[2])
    expected = HEADER_BYTES + 2 * n
    if size != expected:
        raise ShardError(f"{path}: header says {n} tokens but the file has {size} bytes; re-download or rebuild it")
    return n


def read_shard(path: str | os.PathLike) -> np.ndarray:
    """Return the shard's tokens as a read-only uint16 memmap."""
    n = read_header(path)
    for seen in _read_observers:
        seen.append(str(path))
    if n == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n,))


SIDECAR_PREFIX = "fineweb_val_bytes_"


def list_shards(pattern: str, what: str) -> list[str]:
    files = [f for f in sorted(glob.glob(pattern)) if not os.path.basename(f).startswith(SIDECAR_PREFIX)]
    if not files:
        raise FileNotFoundError(
            f"no {what} shards match {pattern!r}. Fix: set DATA_PATH, or `python -m lcq.corpus demo|download`")
    return files


def train_pattern(data_path: str) -> str:
    return os.path.join(data_path, "fineweb_train_*.bin")


def val_pattern(data_path: str) -> str:
    return os.path.join(data_path, "fineweb_val_*.bin")


def file_sha256(path: str, limit: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = limit
        while True:
            chunk = f.read(1 << 20 if remaining is None else min(1 << 20, remaining))
            if not chunk:
                break
            h.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
                if remaining <= 0:
                    break
    return h.hexdigest()


def load_val_tokens(data_path: str, max_tokens: int = 0) -> np.ndarray:
    """All val shards concatenated (optionally only the first max_tokens, cut at a document start)."""
    parts = [np.asarray(read_shard(f)) for f in list_shards(val_pattern(data_path), "val")]
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)
    if max_tokens and tokens.size > max_tokens:
        tokens = tokens[:max_tokens]
    return tokens


def sidecar_files(data_path: str) -> list[str]:
    """The val byte sidecar shards in DATA_PATH (empty when the data has none)."""
    return sorted(glob.glob(os.path.join(data_path, SIDECAR_PREFIX + "*.bin")))


def load_val_bytes(data_path: str, n_tokens: int) -> np.ndarray | None:
    """Bytes of val token i when it is a target, from the sidecar shards, for the first n_tokens val tokens (the same cut
    as load_val_tokens); None when DATA_PATH has no sidecar (bytes then come from the tokenizer's piece table).

    Each sidecar shard must pair with the val shard of the same index and length: a sidecar from another export would
    score the right tokens with the wrong bytes, silently."""
    sidecars = sidecar_files(data_path)
    if not sidecars:
        return None
    vals = list_shards(val_pattern(data_path), "val")
    names = [os.path.basename(f)[len(SIDECAR_PREFIX):] for f in sidecars]
    expected = [os.path.basename(f)[len("fineweb_val_"):] for f in vals]
    if names != expected:
        raise ShardError(f"{data_path}: byte sidecars {names} do not pair with val shards {expected}; re-download "
                         "the dataset")
    parts = []
    for tok_file, byte_file in zip(vals, sidecars):
        if read_header(byte_file) != read_header(tok_file):
            raise ShardError(f"{byte_file}: {read_header(byte_file)} entries for {read_header(tok_file)} tokens; "
                             "re-download the dataset")
        parts.append(np.asarray(read_shard(byte_file)))
    counts = np.concatenate(parts)
    if n_tokens > counts.size:
        raise ShardError(f"{data_path}: the byte sidecar covers {counts.size} val tokens, {n_tokens} requested")
    return counts[:n_tokens].astype(np.int32)  # int32: sums and device tensors never see uint16 arithmetic


class TokenStream:
    """Reads train shards in order, forever, wrapping around. Records which files it opened."""

    def __init__(self, pattern: str, vocab_size: int = 0):
        self.vocab_size = vocab_size  # > 0: every token taken is checked < vocab_size (issue 17)
        self.files = list_shards(pattern, "train")
        self.files_read: list[str] = []
        self._file_idx = -1
        self._tokens = np.zeros(0, dtype=np.uint16)
        self._pos = 0

    def _advance(self) -> None:
        self._file_idx = (self._file_idx + 1) % len(self.files)
        path = self.files[self._file_idx]
        self._tokens = read_shard(path)
        if path not in self.files_read:
            self.files_read.append(path)
        self._pos = 0

    def take(self, n: int) -> np.ndarray:
        out = []
        while n > 0:
            if self._pos >= self._tokens.size:
                self._advance()
                if self._tokens.size == 0:
                    continue
            k = min(n, self._tokens.size - self._pos)
            piece = np.asarray(self._tokens[self._pos:self._pos + k])
            # start-up samples ~1M ids; the rest are checked as read: 0.02 ms per 786K-token batch (BENCHMARKS.md)
            if self.vocab_size and k and int(piece.max()) >= self.vocab_size:
                at = self._pos + int(np.argmax(piece >= self.vocab_size))
                raise ShardError(f"{self.files[self._file_idx]}: token id {self._tokens[at]} at position {at} >= "
                                 f"VOCAB_SIZE={self.vocab_size}. Fix: re-tokenize it with TOKENIZER_PATH")
            out.append(piece)
            self._pos += k
            n -= k
        return np.concatenate(out) if out else np.zeros(0, dtype=np.uint16)


def segment_bounds(x: torch.Tensor, bos_id: int, max_seqlen: int) -> torch.Tensor:
    """cu_seqlens for a flat token row: a segment starts at 0, at every BOS and every max_seqlen tokens.

    Attention never crosses a segment start, so packed documents never see each other and no
    segment is longer than max_seqlen."""
    n = x.numel()
    starts = torch.zeros(n, dtype=torch.bool, device=x.device)
    starts[0] = True
    starts |= x == bos_id
    starts[::max_seqlen] = True
    idx = torch.nonzero(starts, as_tuple=False).flatten()
    # A BOS inside a chunk splits it; re-split any segment that is still too long.
    bounds = torch.cat([idx, torch.tensor([n], device=x.device)])
    lens = bounds[1:] - bounds[:-1]
    if int(lens.max()) > max_seqlen:
        extra = [torch.arange(s, e, max_seqlen, device=x.device) for s, e in zip(bounds[:-1].tolist(), bounds[1:].tolist())]
        bounds = torch.cat(extra + [torch.tensor([n], device=x.device)])
    return bounds.to(torch.int32)


def max_segments(pattern: str, n: int, cut: int, bos_id: int) -> int:
    """At most how many segments an n-token row of the first train shard has, cut every `cut` (issue 27)."""
    starts = np.flatnonzero(read_shard(list_shards(pattern, "train")[0]) == bos_id)
    return int(np.bincount(starts // (n + 1)).max(initial=0)) + -(-n // cut)


def cu_buckets(n: int, most: int) -> tuple[list[int], int]:
    """(sizes, warmed): cu_seqlens lengths of an n-token row (issue 18), 65, 257, ... (4x) to the first holding 2 * most
    segments, then n + 1 (holds any row; unwarmed: FA3's scratch for 98,304 segments is ~48 GiB, issue 27)."""
    out = [65]
    while out[-1] - 1 < min(2 * most, n):
        out.append(4 * out[-1] - 3)
    out = [b for b in out if b <= n] + [n + 1]
    return out, next(i for i, b in enumerate(out) if b - 1 >= min(2 * most, n)) + 1


def pad_cu(cu: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """cu_seqlens padded with its last offset (empty segments, which attend to nothing) to the first size that fits."""
    size = next(s for s in sizes if s >= cu.numel())
    return torch.cat([cu, cu[-1:].expand(size - cu.numel())])


class TrainLoader:
    """Each rank takes a disjoint slice of the same global chunk of the stream every step.

    The next batch is prepared on a background thread while the current step runs (issue 18: the GPU no longer idles
    while the host reads, converts and cuts a batch), into pinned memory on CUDA, and copied without blocking. One
    worker takes the chunks in order, so the batches are those of the synchronous path."""

    def __init__(self, pattern: str, rank: int, world_size: int, device: torch.device, buckets: list[int] | None = None,
                 vocab_size: int = 0):
        self.stream = TokenStream(pattern, vocab_size)  # vocab_size > 0: ids checked as read (issue 17)
        self.rank, self.world_size, self.device, self.buckets = rank, world_size, device, buckets
        self.files_read: list[str] = []  # the shards the batches handed out so far came from
        self._pool, self._ahead = ThreadPoolExecutor(1), None

    def _bounds(self, x, seq_len: int, bos_id: int) -> torch.Tensor:
        cu = segment_bounds(x, bos_id, seq_len)
        return pad_cu(cu, self.buckets) if self.buckets else cu

    def _prepare(self, local_tokens: int, seq_len: int, bos_id: int):
        span = local_tokens + 1
        chunk = self.stream.take(span * self.world_size)
        local = torch.from_numpy(chunk[self.rank * span:(self.rank + 1) * span].astype(np.int64))
        out = [local[:-1], local[1:], self._bounds(local[:-1], seq_len, bos_id)]
        if self.device.type == "cuda":
            out = [t.pin_memory() for t in out]
        return out, seq_len, list(self.stream.files_read)

    def next_batch(self, local_tokens: int, seq_len: int, bos_id: int):
        """Return (x, y, cu_seqlens) for this rank: x, y flat int64 of local_tokens tokens."""
        if self._ahead is None:
            self._ahead = self._pool.submit(self._prepare, local_tokens, seq_len, bos_id)
        out, made_for, self.files_read = self._ahead.result()
        if made_for != seq_len:  # a new context stage: the same next tokens, cut at the new length
            out[2] = self._bounds(out[0], seq_len, bos_id)
        self._ahead = self._pool.submit(self._prepare, local_tokens, seq_len, bos_id)
        nb = self.device.type == "cuda"
        return tuple(t.to(self.device, non_blocking=nb) for t in out)


def doc_starts(tokens: np.ndarray, bos_id: int) -> np.ndarray:
    """Start offsets of the documents in a flat token array (a document begins at each BOS; leading
    tokens before the first BOS form a document of their own)."""
    starts = np.flatnonzero(tokens == bos_id)
    if tokens.size and (starts.size == 0 or starts[0] != 0):
        starts = np.concatenate([[0], starts])
    return starts.astype(np.int64)
