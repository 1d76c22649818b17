"""One-call conveniences over lcq.artifact for benchmarks and tests: compress one section now, encode a one-section
artifact, save it. A run never calls them (it compresses through jobs, lcq.grouping.model_job), so they live outside
the modules the single-file script carries (lcq/bundle.py MODULES), whose every byte counts against the cap."""
from __future__ import annotations

import os
from typing import Mapping

import torch

from ..artifact import CHUNK_BYTES, Section, SectionJob, assemble, write


def compress_section(name: str, tensors: Mapping[str, torch.Tensor], meta: dict, compressor: str,
                     threads: int | None = None, chunk_bytes: int = CHUNK_BYTES) -> Section:
    """Compress one section now (see SectionJob)."""
    return SectionJob(name, tensors, meta, compressor, threads, chunk_bytes).result()


def encode(tensors: Mapping[str, torch.Tensor], meta: dict, compressor: str, threads: int | None = None) -> bytes:
    """Serialize tensors + JSON meta into a one-section ("model") artifact; compressor is "lzma", "brotli", "none"
    or "auto" (each of AUTO_ORDER, keep the smaller). meta comes back as JSON gives it (tuples as lists)."""
    return assemble([compress_section("model", tensors, meta, compressor, threads)])


def save(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], meta: dict, compressor: str) -> int:
    """Encode (one section) and write atomically; return bytes written."""
    return write(path, encode(tensors, meta, compressor))
