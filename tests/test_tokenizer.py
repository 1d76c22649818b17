"""Byte tables for val_bpb, checked on a tiny SentencePiece model trained in-process."""
from __future__ import annotations

import io
import random

import pytest
import sentencepiece as spm
import torch

from lcq.tokenizer import ByteTables, byte_tables, check_byte_source, load_tokenizer, token_bytes, transform_operators

WORDS = ["the", "banana", "river", "stone", "quiet", "running", "over", "under", "light", "garden"]


@pytest.fixture(scope="module")
def model_bytes() -> bytes:
    """A 400-piece BPE model with byte fallback and the demo tokenizer's special ids (pad 0, bos 1,
    eos 2, unk 3), trained on ~15 KB of generated sentences; 'café' is frequent enough to be learned."""
    rng = random.Random(0)
    lines = []
    for i in range(300):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 12))]
        if i % 3 == 0:
            words.append("café")
        lines.append(" ".join(words).capitalize() + ".")
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=writer, model_type="bpe", vocab_size=400, byte_fallback=True,
        character_coverage=1.0, add_dummy_prefix=False, normalization_rule_name="identity",
        remove_extra_whitespaces=False, pad_id=0, bos_id=1, eos_id=2, unk_id=3, hard_vocab_limit=False,
        num_threads=1, minloglevel=2)
    return writer.getvalue()


@pytest.fixture(scope="module")
def sp(model_bytes, tmp_path_factory) -> spm.SentencePieceProcessor:
    path = tmp_path_factory.mktemp("tok") / "tiny.model"
    path.write_bytes(model_bytes)
    return load_tokenizer(path)


def known_id(sp, piece: str) -> int:
    i = sp.piece_to_id(piece)
    assert i != sp.unk_id(), f"the tiny model did not learn {piece!r}"
    return i


def test_special_id_layout(sp):
    assert [sp.id_to_piece(i) for i in range(5)] == ["<pad>", "<s>", "</s>", "<unk>", "<0x00>"]
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)


def test_tables_hand_computed_pieces(sp):
    t = byte_tables(sp, sp.vocab_size())
    assert isinstance(t, ByteTables) and t.base_bytes.dtype == torch.int16 and t.has_leading_space.dtype == torch.bool
    assert t.base_bytes.shape == t.is_boundary.shape == (sp.vocab_size(),)

    def row(i):
        return int(t.base_bytes[i]), bool(t.has_leading_space[i]), bool(t.is_boundary[i])

    assert row(known_id(sp, "\u2581banana")) == (6, True, False)
    assert row(known_id(sp, "\u2581café")) == (5, True, False)   # 'é' is 2 UTF-8 bytes
    assert row(known_id(sp, "an")) == (2, False, False)
    assert row(known_id(sp, "é")) == (2, False, False)
    assert row(known_id(sp, "\u2581")) == (0, True, False)       # a bare space piece: 1 byte after a word
    assert row(known_id(sp, "<0xE4>")) == (1, False, False)      # byte fallback: one byte
    assert sp.is_byte(known_id(sp, "<0xE4>"))
    for special in (0, 1, 2, 3):                                 # pad, BOS, EOS, UNK
        assert row(special) == (0, False, True)


def test_padding_ids_and_too_small_vocab(sp):
    n = sp.vocab_size()
    t = byte_tables(sp, n + 8)
    assert t.base_bytes.shape == (n + 8,)
    assert t.is_boundary[n:].all() and not t.has_leading_space[n:].any() and (t.base_bytes[n:] == 0).all()
    assert torch.equal(t.base_bytes[:n], byte_tables(sp, n).base_bytes)
    with pytest.raises(ValueError, match="VOCAB_SIZE"):
        byte_tables(sp, n - 1)


def test_token_bytes_leading_space_depends_on_previous_token(sp):
    t = byte_tables(sp, sp.vocab_size())
    banana, an = known_id(sp, "\u2581banana"), known_id(sp, "an")
    targets = torch.tensor([banana, banana, banana, banana, an, sp.eos_id()])
    prevs = torch.tensor([sp.bos_id(), an, sp.eos_id(), sp.pad_id(), sp.bos_id(), an])
    assert token_bytes(targets, prevs, t).tolist() == [6, 7, 6, 6, 2, 0]
    # int32 ids and 2-D shapes give the same counts
    out = token_bytes(targets.int().view(2, 3), prevs.int().view(2, 3), t.to("cpu"))
    assert out.dtype == torch.int32 and out.view(-1).tolist() == [6, 7, 6, 6, 2, 0]


@pytest.mark.parametrize("sentence", [
    "The quiet river runs over the light stone garden.",     # plain ASCII, learned pieces
    "Stone café 中文 río, naïve  spacing\tand tabs.",          # unseen characters -> byte fallback
])
def test_bytes_of_an_encoded_sentence_sum_to_its_utf8_length(sp, sentence):
    ids = sp.encode(sentence)
    assert sp.decode(ids) == sentence
    seq = torch.tensor([sp.bos_id()] + ids)
    t = byte_tables(sp, sp.vocab_size() + 3)
    assert int(token_bytes(seq[1:], seq[:-1], t).sum()) == len(sentence.encode("utf-8"))


def test_non_ascii_sentence_really_uses_byte_fallback(sp):
    ids = sp.encode("中文")
    assert len(ids) == 6 and all(sp.is_byte(i) for i in ids)


def test_load_tokenizer_bad_paths(tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match="TOKENIZER_PATH") as e:
        load_tokenizer(missing)
    assert str(missing) in str(e.value)
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="garbage.model"):
        load_tokenizer(garbage)



def test_caseops_style_operators_need_the_byte_sidecar(sp, tmp_path):
    """A tokenizer that reserves private-use operator pieces the way the CaseOps one does (U+E001..U+E004 right after
    the special ids, user-defined symbols; PR #1729) is recognised, and without a sidecar it is refused."""
    ops = ["\ue001", "\ue002", "\ue003", "\ue004"]
    rng = random.Random(1)
    lines = [" ".join(rng.choice(WORDS) for _ in range(8)) + " \ue001" + rng.choice(WORDS) for _ in range(200)]
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=writer, model_type="bpe", vocab_size=300, byte_fallback=True,
        user_defined_symbols=ops, add_dummy_prefix=False, normalization_rule_name="identity", pad_id=0, bos_id=1,
        eos_id=2, unk_id=3, hard_vocab_limit=False, num_threads=1, minloglevel=2)
    path = tmp_path / "caseops_like.model"
    path.write_bytes(writer.getvalue())
    caseops = load_tokenizer(path)
    assert transform_operators(caseops) == [4, 5, 6, 7] and transform_operators(sp) == []
    # The operators' UTF-8 (3 bytes each) is what a piece table would count; the sidecar says 0.
    assert byte_tables(caseops, 300).base_bytes[4:8].tolist() == [3, 3, 3, 3]
    check_byte_source(sp, False, "plain.model", "data")
    check_byte_source(caseops, True, str(path), "data")
    with pytest.raises(ValueError, match="no fineweb_val_bytes_.*download --variant caseops"):
        check_byte_source(caseops, False, str(path), "data")
