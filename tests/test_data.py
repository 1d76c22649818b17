import numpy as np
import pytest
import torch

from lcq.data import (HEADER_BYTES, MAGIC, ShardError, TrainLoader, doc_starts, load_val_tokens, read_shard,
                      record_reads, write_shard)


def test_shard_round_trip_and_layout(tmp_path):
    toks = np.array([1, 65535, 0, 42, 7], dtype=np.uint16)
    p = tmp_path / "fineweb_train_000000.bin"
    write_shard(p, toks)
    raw = p.read_bytes()
    assert len(raw) == HEADER_BYTES + 2 * toks.size
    header = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
    assert header[:3].tolist() == [MAGIC, 1, 5] and not header[3:].any()
    assert np.frombuffer(raw[HEADER_BYTES:], dtype="<u2").tolist() == toks.tolist()
    with record_reads() as seen:
        assert read_shard(p).tolist() == toks.tolist()
    assert seen == [str(p)]


def _corrupt(path, offset, value, dtype="<i4"):
    arr = np.fromfile(path, dtype=np.uint8)
    arr[offset:offset + 4] = np.frombuffer(np.array([value], dtype=dtype).tobytes(), dtype=np.uint8)
    arr.tofile(path)


@pytest.mark.parametrize("damage,match", [
    (lambda p: _corrupt(p, 0, 123), "bad magic 123"),
    (lambda p: _corrupt(p, 4, 2), "unsupported shard version 2"),
    (lambda p: _corrupt(p, 8, 6), "header says 6 tokens"),
    (lambda p: p.write_bytes(p.read_bytes()[:-1]), "header says 5 tokens"),
    (lambda p: p.write_bytes(p.read_bytes()[:100]), "shorter than the 1024-byte shard header"),
])
def test_bad_headers_name_the_file(tmp_path, damage, match):
    p = tmp_path / "fineweb_val_000000.bin"
    write_shard(p, np.arange(5))
    damage(p)
    with pytest.raises(ShardError, match=match) as e:
        read_shard(p)
    assert str(p) in str(e.value)


def test_write_shard_rejects_out_of_range(tmp_path):
    with pytest.raises(ValueError, match="uint16"):
        write_shard(tmp_path / "x.bin", np.array([70000]))


def test_missing_shards_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="DATA_PATH"):
        load_val_tokens(str(tmp_path))


def test_train_loader_ranks_take_disjoint_slices_across_shards(tmp_path):
    # Two shards of consecutive integers, so every token identifies its position in the stream.
    write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(0, 50))
    write_shard(tmp_path / "fineweb_train_000001.bin", np.arange(50, 130))
    pattern = str(tmp_path / "fineweb_train_*.bin")
    seen = []
    loaders = [TrainLoader(pattern, r, 2, torch.device("cpu")) for r in range(2)]
    for _ in range(3):
        for loader in loaders:
            x, y, cu = loader.next_batch(10, 5, bos_id=65000)
            assert torch.equal(y, x + 1)
            assert cu.tolist() == [0, 5, 10]
            seen.append(x.tolist())
    flat = [t for chunk in seen for t in chunk]
    assert len(flat) == len(set(flat)), "ranks must never get the same tokens in one pass"
    # Step k: global chunk of 2 * 11 tokens; rank r takes [22k + 11r, 22k + 11r + 11).
    assert seen[0] == list(range(0, 10)) and seen[1] == list(range(11, 21)) and seen[5] == list(range(55, 65))


def test_doc_starts():
    toks = np.array([5, 5, 1, 3, 1, 1, 4])
    assert doc_starts(toks, 1).tolist() == [0, 2, 4, 5]
    assert doc_starts(np.array([1, 2, 1]), 1).tolist() == [0, 2]
