"""Issue 18's static shapes and background loader: padded cu_seqlens change no logit, the compiled training loss builds
one graph per (cu_seqlens bucket, layer order) in the warm-up and none after, and the threaded loader hands out the
synchronous path's batches."""
import numpy as np
import torch
from torch._dynamo.testing import CompileCounter

from lcq.config import make_config
from lcq.data import TokenStream, TrainLoader, cu_buckets, pad_cu, segment_bounds, write_shard
from lcq.model import GPT
from lcq.train import compile_loss, warmup_batch

BOS = 1
STACK = {"num_layers": 3, "recur_passes": 2, "recur_start_layer": 1, "recur_end_layer": 1, "vocab_size": 64}


def test_buckets_and_padding():
    # (sizes, warmed): 4x apart from 65 to the first holding twice the measured maximum, then n + 1 (issue 27)
    assert cu_buckets(40, 5) == ([41], 1)
    assert cu_buckets(98304, 250) == ([65, 257, 1025, 98305], 3)
    assert cu_buckets(98304, 100) == ([65, 257, 98305], 2)
    assert cu_buckets(100, 45) == ([65, 101], 2)  # the bucket holding 90 is n + 1 itself: warmed
    cu = torch.tensor([0, 5, 9], dtype=torch.int32)
    assert pad_cu(cu, [2, 4, 8]).tolist() == [0, 5, 9, 9]
    assert pad_cu(cu, [3]).tolist() == [0, 5, 9]


def test_padded_cu_seqlens_change_no_logit():
    torch.manual_seed(0)
    model = GPT(make_config("tiny", **STACK), bos_id=BOS).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        ids = torch.randint(2, 64, (50,))
        ids[[0, 13, 31]] = BOS
        cu = segment_bounds(ids, BOS, 16)
        assert torch.equal(model(ids, cu, 16), model(ids, pad_cu(cu, [cu.numel() + 6]), 16))


def test_compiled_loss_builds_every_graph_in_the_warmup_and_none_after():
    torch.manual_seed(0)
    model = GPT(make_config("tiny", **STACK), bos_id=BOS)
    n, window = 120, 16
    buckets, warmed = cu_buckets(n, 60)  # [65, 121], both warmed
    assert warmed == len(buckets)
    counter = CompileCounter()
    fwd = compile_loss(model, 2 * len(buckets), backend=counter)
    gen = torch.Generator().manual_seed(1)
    for active in (False, True):  # the warm-up: every bucket, both layer orders
        model.recur_active = active
        for size in buckets:
            x, y, cu = warmup_batch(gen, 64, n, BOS, window, buckets, size)
            assert cu.numel() == size
            fwd(x, y, cu, window).backward()
    assert counter.frame_count == 2 * len(buckets)
    # training batches: other document layouts and segment counts, both orders, never a new graph
    for k, active in enumerate((True, False, True)):
        model.recur_active = active
        toks = torch.randint(2, 64, (n + 1,), generator=gen)
        toks[torch.randperm(n, generator=gen)[:5 + 20 * k]] = BOS
        cu = pad_cu(segment_bounds(toks[:-1], BOS, window), buckets)
        fwd(toks[:-1], toks[1:], cu, window).backward()
    assert counter.frame_count == 2 * len(buckets)


def test_threaded_loader_hands_out_the_synchronous_batches(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        toks = rng.integers(2, 50, 700)
        toks[rng.integers(0, 700, 9)] = BOS
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", toks)
    pattern = str(tmp_path / "fineweb_train_*.bin")
    local, world, rank = 150, 2, 1
    loader = TrainLoader(pattern, rank, world, torch.device("cpu"), cu_buckets(local, local)[0])
    stream = TokenStream(pattern)
    for step in range(12):  # past the end of the data: the stream wraps, as training does
        seq_len = 64 if step < 5 else 32  # a context stage change on the way
        x, y, cu = loader.next_batch(local, seq_len, BOS)
        chunk = stream.take((local + 1) * world)[rank * (local + 1):(rank + 1) * (local + 1)].astype(np.int64)
        assert torch.equal(x, torch.from_numpy(chunk[:-1])) and torch.equal(y, torch.from_numpy(chunk[1:]))
        assert torch.equal(cu, pad_cu(segment_bounds(x, BOS, seq_len), cu_buckets(local, local)[0]))
    assert loader.files_read == stream.files_read


def test_record_warmup_on_8_ranks_keeps_fa3_backward_scratch_under_1_gib(tmp_path):
    """Issue 27: FA3's varlen backward allocates accumulators over round128(tokens + 128 * segments) rows; the old
    warm-up padded to every token its own segment (~48 GiB at 98,304 tokens a rank). Now the ladder stops at twice the
    most segments a row of the train shards has. Shards here: documents of 20-1500 tokens (mean ~760; shorter
    documents mean more segments), so a row has ~130 BOS plus 48 cuts at seq 2048. Every warm-up batch of the record
    preset on 8 ranks must stay under 1 GiB of scratch per attention backward (1.25% of an H100, beside the ~42 GB of
    activations #1855 measured), and every real row of those shards must fit a warmed bucket."""
    from lcq.tools.estimates import fa3_scratch_bytes
    from lcq.train import bucket_plan, local_batch_tokens

    rng = np.random.default_rng(0)
    docs = rng.integers(20, 1500, 3000)
    toks = rng.integers(2, 8192, int(docs.sum()))
    toks[np.cumsum(docs) - docs] = BOS
    write_shard(tmp_path / "fineweb_train_000000.bin", toks)
    cfg = make_config("record", data_path=str(tmp_path))
    n = local_batch_tokens(cfg, 8)
    heads, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.model_dim // cfg.num_heads
    assert fa3_scratch_bytes(n, n, heads, kv, hd) > 45 * 2**30  # the old ladder's last bucket, as the issue measured
    buckets, warmed, most = bucket_plan(cfg, n, BOS, [cfg.train_seq_len])
    assert 48 < most < 400 and warmed < len(buckets), (most, buckets, warmed)
    gen = torch.Generator().manual_seed(0)
    for size in buckets[:warmed]:
        _, _, cu = warmup_batch(gen, cfg.vocab_size, n, BOS, cfg.train_seq_len, buckets, size)
        assert cu.numel() == size and fa3_scratch_bytes(n, size - 1, heads, kv, hd) < 2**30, size
    flat = torch.from_numpy(toks.astype(np.int64))
    for r in range(flat.numel() // (n + 1)):
        cu = segment_bounds(flat[r * (n + 1):r * (n + 1) + n], BOS, cfg.train_seq_len)
        assert pad_cu(cu, buckets).numel() <= buckets[warmed - 1]
