"""SentencePiece loading and the per-token byte tables behind val_bpb.

The byte rule (docs/scoring.md, the challenge's scorer): a target token is worth the UTF-8 length of its piece
without a leading '▁', plus one byte for that leading space unless the previous token is a boundary
token. Control, unknown and unused pieces are boundary tokens worth 0 bytes; byte-fallback pieces
(<0x..>) are worth 1 byte. Ids past the tokenizer's own vocabulary (padding up to VOCAB_SIZE) are
boundary tokens worth 0 bytes.

A tokenizer over transformed text (CaseOps: lowercased text plus case operators) cannot count the original bytes from
its pieces: its data ships a per-token byte sidecar (lcq/data.py, load_val_bytes) that the eval uses instead, and
check_byte_source refuses such a tokenizer without one.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import sentencepiece as spm
import torch

SPACE = "\u2581"  # SentencePiece's visible stand-in for a space


def load_tokenizer(path: str | os.PathLike) -> spm.SentencePieceProcessor:
    """Load a SentencePiece model, with an error that says which knob points at it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer model {str(path)!r} not found. Fix: set TOKENIZER_PATH (`python -m lcq.corpus demo|download`)")
    sp = spm.SentencePieceProcessor()
    try:
        sp.load(str(path))
    except (OSError, RuntimeError) as e:
        raise ValueError(f"{path}: not a readable SentencePiece model ({e}); check TOKENIZER_PATH") from e
    return sp


class ByteTables(NamedTuple):
    """Per-id look-ups for the byte rule; index them with token ids."""
    base_bytes: torch.Tensor         # int16: UTF-8 bytes of the piece without its leading '▁'
    has_leading_space: torch.Tensor  # bool: the piece starts with '▁'
    is_boundary: torch.Tensor        # bool: control / unknown / unused / padding id

    def to(self, device: torch.device | str) -> "ByteTables":
        return ByteTables(*(t.to(device) for t in self))


def byte_tables(sp: spm.SentencePieceProcessor, vocab_size: int) -> ByteTables:
    """Build the byte tables for ids 0..vocab_size-1 (vocab_size may exceed the tokenizer's: padding)."""
    n = int(sp.vocab_size())
    if vocab_size < n:
        raise ValueError(f"VOCAB_SIZE={vocab_size} < the tokenizer's {n} pieces; set VOCAB_SIZE >= {n}")
    base = np.zeros(vocab_size, dtype=np.int16)
    lead = np.zeros(vocab_size, dtype=np.bool_)
    boundary = np.ones(vocab_size, dtype=np.bool_)  # padding ids stay boundary tokens worth 0 bytes
    for i in range(n):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            # '<0x41>' stands for one raw byte, whatever its piece text says.
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        lead[i] = piece.startswith(SPACE)
        base[i] = len(piece[1:].encode("utf-8")) if lead[i] else len(piece.encode("utf-8"))
    return ByteTables(torch.from_numpy(base), torch.from_numpy(lead), torch.from_numpy(boundary))


def token_bytes(targets: torch.Tensor, prevs: torch.Tensor, tables: ByteTables) -> torch.Tensor:
    """Bytes of each target token given the token before it (same shapes); int32, on the tables' device."""
    targets, prevs = targets.long(), prevs.long()
    space = tables.has_leading_space[targets] & ~tables.is_boundary[prevs]
    return tables.base_bytes[targets].to(torch.int32) + space.to(torch.int32)


def transform_operators(sp: spm.SentencePieceProcessor) -> list[int]:
    """Ids of pieces made only of Unicode private-use characters: the operators of a reversible text transform. CaseOps
    (PR #1729, the tokenizer of #1855) reserves U+E001..U+E004 for TITLE / ALLCAPS / CAPNEXT / ESC and lowercases the
    text around them, so its pieces are not the scored text and cannot count its bytes."""
    return [i for i in range(int(sp.vocab_size())) if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))
            and (piece := sp.id_to_piece(i).lstrip(SPACE)) and all(0xE000 <= ord(c) <= 0xF8FF for c in piece)]


def check_byte_source(sp: spm.SentencePieceProcessor, has_sidecar: bool, tokenizer_path: str, data_path: str) -> None:
    """A transformed-text tokenizer must come with the data's per-token byte sidecar: its piece table would score the
    transformed text (3 bytes per operator, lowercase letters), a different and lower bpb than the challenge's."""
    ops = transform_operators(sp)
    if ops and not has_sidecar:
        raise ValueError(f"TOKENIZER_PATH={tokenizer_path} has text-transform pieces (ids {ops[:4]}, CaseOps) but "
                         f"DATA_PATH={data_path} has no fineweb_val_bytes_*.bin sidecar to count bytes. Fix: "
                         "`python -m lcq.corpus download --variant caseops`")
