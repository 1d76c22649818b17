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
    (lambda p: p.write_bytes(p.read_bytes()[:100]), "shorter than a shard header"),
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


def _records_shard(path, values) -> None:
    """A shard written the way the CaseOps exporter writes it (2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611
    /prepare_caseops_data.py): 256 native int32 header ints (magic, version 1, count), then the uint16 values."""
    header = np.zeros(256, dtype=np.int32)
    header[0], header[1], header[2] = 20240520, 1, len(values)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(values, dtype=np.uint16).tobytes())


def test_val_byte_sidecar_in_the_records_format(tmp_path):
    from lcq.data import list_shards, load_val_bytes, val_pattern

    # Two val shards, a document running across the shard boundary; sidecar entries are original-text bytes per
    # token, 0 for BOS and for the case operators (values well above any piece length, so a table could not match them).
    tokens = [[1, 40, 41, 1, 42], [43, 44, 1, 45]]
    counts = [[0, 0, 17, 0, 300], [9, 1, 0, 65535]]
    for i, (t, c) in enumerate(zip(tokens, counts)):
        _records_shard(tmp_path / f"fineweb_val_{i:06d}.bin", t)
        _records_shard(tmp_path / f"fineweb_val_bytes_{i:06d}.bin", c)
    assert [p.rsplit("/", 1)[1] for p in list_shards(val_pattern(str(tmp_path)), "val")] == \
        ["fineweb_val_000000.bin", "fineweb_val_000001.bin"]
    flat = sum(tokens, [])
    assert load_val_tokens(str(tmp_path)).tolist() == flat
    got = load_val_bytes(str(tmp_path), len(flat))
    assert got.dtype == np.int32 and got.tolist() == sum(counts, [])
    assert load_val_bytes(str(tmp_path), 6).tolist() == sum(counts, [])[:6]  # the same cut as VAL_MAX_TOKENS
    with pytest.raises(ShardError, match="covers 9 val tokens, 10 requested"):
        load_val_bytes(str(tmp_path), 10)


def test_no_sidecar_means_table_bytes(tmp_path):
    from lcq.data import load_val_bytes

    write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(5))
    assert load_val_bytes(str(tmp_path), 5) is None


def test_sidecar_that_does_not_pair_with_the_val_shards(tmp_path):
    from lcq.data import load_val_bytes

    write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(5))
    write_shard(tmp_path / "fineweb_val_000001.bin", np.arange(3))
    write_shard(tmp_path / "fineweb_val_bytes_000000.bin", np.ones(5))
    with pytest.raises(ShardError, match="do not pair"):
        load_val_bytes(str(tmp_path), 8)
    write_shard(tmp_path / "fineweb_val_bytes_000001.bin", np.ones(4))
    with pytest.raises(ShardError, match="fineweb_val_bytes_000001.bin: 4 entries for 3 tokens"):
        load_val_bytes(str(tmp_path), 8)


def test_open_run_scores_bytes_from_the_sidecar(tmp_path, demo_data):
    """A dataset with a sidecar: the run logs it, carries it, and the eval counts its bytes instead of the tables'."""
    import os
    import shutil

    from lcq.config import make_config
    from lcq.dist import DistInfo
    from lcq.pipeline import build, open_run, score

    torch.set_num_threads(1)
    data_dir = tmp_path / "data"
    shutil.copytree(demo_data[0], data_dir)
    n = sum(int(np.asarray(read_shard(data_dir / f)).size) for f in sorted(os.listdir(data_dir)) if "_val_" in f)
    write_shard(data_dir / "fineweb_val_bytes_000000.bin", np.full(n, 7))  # 7 bytes a token: no piece table says so
    cpu = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    cfg = make_config("tiny", data_path=str(data_dir), tokenizer_path=demo_data[1], log_dir=str(tmp_path / "logs"),
                      run_id="sidecar", submission_json="", val_max_tokens=600, eval_stride=64)
    run = open_run(cfg, cpu)
    try:
        assert run.val_tokens.size == 600 and run.val_bytes.tolist() == [7] * 600
        res = score(run, build(run))
        assert res.bytes == 7 * (600 - 1)  # every token but the stream's first is a target
        run.val_bytes = None  # the same run scored from the tables
        assert score(run, run.model).bytes != res.bytes
    finally:
        run.log.close()
    assert "val bytes from sidecar fineweb_val_bytes_000000.bin" in (tmp_path / "logs" / "sidecar.txt").read_text()
