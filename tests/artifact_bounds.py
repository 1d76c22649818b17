"""What tests bound an artifact by, or read off it, that a run never needs: kept out of lcq/artifact.py, whose every
byte ships in the single-file script (issue 17 paid for the compression job's deadline with them)."""
from lcq import artifact as A


def max_compressed_bytes(n: int) -> int:
    """The most bytes one compressed chunk of n input bytes can take, written by none, lzma or brotli (lrzip has its
    own file header; a COMPRESSOR=group section keeps lrzip only when that section is smaller than with brotli).

    Incompressible input is where compressors expand: raw LZMA2 then stores uncompressed chunks of at most 64 KiB
    behind a 3-byte header and ends with a 1-byte marker (liblzma's lzma_block_buffer_bound); brotli stores
    uncompressed meta-blocks and bounds its output by n + 2 + 4 * (n >> 14) + 3 + 1 (BrotliEncoderMaxCompressedSize,
    brotli/encode.h). "none" stores the n bytes."""
    return max(n + 3 * -(-n // 65536) + 1, n + 2 + 4 * (n >> 14) + 4)


def max_section_bytes(name: str, raw_bytes: int, chunk_bytes: int = A.CHUNK_BYTES) -> int:
    """The most bytes a section of `raw_bytes` uncompressed payload can take in the file (header, chunk table, and
    every chunk at max_compressed_bytes)."""
    spans = A._chunk_spans(raw_bytes, chunk_bytes)
    return A._section_head_bytes(name, len(spans)) + sum(max_compressed_bytes(hi - lo) for lo, hi in spans)


def compressor_of(blob: bytes, source: str = "<bytes>") -> str:
    """Name of the compressor the first section of a (verified) artifact blob was written with."""
    return next(iter(A.sections_of(blob, source).values())).compressor
