"""COMPRESSOR=group (issue 11, lcq.grouping): role buckets as artifact sections, the grouped layout's known bytes, the
row order stored and undone bit for bit, what the mode guarantees about bytes, lrzip present or absent, the knob."""
import hashlib
import json
import math
import re
import shutil
import signal
import struct
import subprocess
import threading
import time

import numpy as np
import pytest
import torch

from lcq import artifact as A
from lcq import grouping as G
from lcq.config import ConfigError, make_config
from lcq.gptq import dequantize_state, quantize_state
from lcq.model import build_model
from lcq.pipeline import TIED, quant_spec
from lcq.tools import artifact_tools as AT
from artifact_bounds import compressor_of

HAVE_LRZIP = shutil.which("lrzip") is not None


def clustered_rows(rows=96, cols=48, clusters=4, seed=0) -> torch.Tensor:
    """int6-range rows drawn around a few centres, shuffled: what a similarity order can put side by side."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randint(-20, 21, (clusters, cols), generator=g)
    pick = torch.randint(0, clusters, (rows,), generator=g)
    noise = torch.randint(-1, 2, (rows, cols), generator=g)
    return (centres[pick] + noise).clamp(-31, 31).to(torch.int8)


def model_codes(seed=0) -> dict:
    """A tiny model's state quantized by the real code (RTN, the tiny preset's bits), every matrix N(0, 1/fan_in)."""
    cfg = make_config("tiny")
    torch.manual_seed(seed)
    model = build_model(cfg, 1, torch.device("cpu"))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, p.shape[1] ** -0.5)
    spec = quant_spec(cfg)
    tensors, qmeta = quantize_state({k: v.detach() for k, v in model.state_dict().items()}, None,
                                    type(spec)(**{**spec.__dict__, "method": "rtn"}), TIED)
    return tensors, qmeta


def group_blob(tensors, meta, threads=None) -> tuple[bytes, list]:
    sections = G.model_job(tensors, meta, "group", threads).sections()
    return A.assemble(sections), sections


def assert_bit_exact(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        x, y = a[k], b[k]
        assert x.dtype == y.dtype and x.shape == y.shape, k
        if x.dtype.is_floating_point:  # compare the bits, so -0.0 and NaN payloads count
            carrier = {2: torch.int16, 4: torch.int32}[x.element_size()]
            x, y = x.view(carrier), y.view(carrier)
        assert torch.equal(x, y), k


def section_manifest(blob: bytes, name: str) -> tuple[dict, bytes]:
    """(manifest, data region) of one section, decompressed by the artifact's own reader."""
    raw = A._decompress(A.sections_of(blob)[name], "t")
    (mlen,) = struct.unpack_from("<I", raw)
    return json.loads(raw[4:4 + mlen]), raw[4 + mlen:]


# ------------------------------------------------------------------------------------------- layout

def test_grouped_layout_known_bytes_and_round_trip():
    t = torch.tensor([[1, -2], [3, 40], [-5, 6]], dtype=torch.int8)  # range 45: plain bytes (bits 0)
    perm = np.array([2, 0, 1])
    raw = A._payload({"w": t}, {}, {"w": A.Arrangement("col", perm)})
    (mlen,) = struct.unpack_from("<I", raw)
    (entry,) = json.loads(raw[4:4 + mlen])["tensors"]
    assert (entry["layout"], entry["major"], entry["perm"], entry["bits"]) == ("grouped", "col", 2, 0)
    assert entry["nbytes"] == 3 * 2 + 6
    # stored rows t[2], t[0], t[1] = [-5, 6], [1, -2], [3, 40]; column-major: -5 1 3 | 6 -2 40; order as u16 first
    assert raw[4 + mlen:] == struct.pack("<3H", 2, 0, 1) + bytes([0xFB, 0x01, 0x03, 0x06, 0xFE, 0x28])
    out, _ = A._parse(raw, "t")
    assert torch.equal(out["w"], t)
    packed = torch.tensor([[0, 1], [2, 3], [-1, -2]], dtype=torch.int8)  # range 5 -> 4-bit fields, bias -2
    raw = A._payload({"p": packed}, {}, {"p": A.Arrangement("row", None)})
    assert A._parse(raw, "t")[0]["p"].tolist() == packed.tolist()


def test_grouped_layout_rejects_bad_input_and_bad_stored_orders():
    with pytest.raises(A.ArtifactError, match="'w'.*2-D tensors of 1-byte values"):
        A._payload({"w": torch.zeros(4, dtype=torch.int8)}, {}, {"w": A.Arrangement("col")})
    with pytest.raises(A.ArtifactError, match="'w': perm is not a permutation of its 3 rows"):
        A._payload({"w": torch.zeros(3, 2, dtype=torch.int8)}, {}, {"w": A.Arrangement("col", np.array([0, 0, 1]))})
    raw = bytearray(A._payload({"w": torch.ones(3, 2, dtype=torch.int8) * 50}, {},
                               {"w": A.Arrangement("row", np.array([1, 2, 0]))}))
    (mlen,) = struct.unpack_from("<I", raw)
    raw[4 + mlen:4 + mlen + 2] = struct.pack("<H", 2)  # order 2, 2, 0: not a permutation
    with pytest.raises(A.ArtifactError, match="stored row order is not a permutation of 3 rows"):
        A._parse(bytes(raw), "t")


# ------------------------------------------------------------------------------------------- the mode

def test_group_mode_round_trips_a_quantized_model_bit_exactly():
    tensors, qmeta = model_codes()
    meta = {"qmeta": qmeta, "lora": None}
    blob, sections = group_blob(tensors, meta)
    names = [s.name for s in sections]
    assert names[0] == "model" and names[1:] == [f"model_{r}" for r, _ in G.GROUPS if f"model_{r}" in names]
    assert {"model_embed", "model_attn_q", "model_mlp_up", "model_mlp_down"} <= set(names)
    out, meta_out = A.decode(blob)
    assert_bit_exact(tensors, out)
    assert meta_out["qmeta"] == json.loads(json.dumps(qmeta)) and meta_out["model_embed"] == {"group": "embed"}
    deq, ref = dequantize_state(out, qmeta), dequantize_state(tensors, qmeta)
    assert all(torch.equal(deq[k], ref[k]) for k in ref)
    # bytes never depend on the thread count (fixed chunks, exact row order)
    assert group_blob(tensors, meta, threads=1)[0] == group_blob(tensors, meta, threads=3)[0]


def test_group_job_can_be_cancelled_and_reports_builder_errors():
    tensors, qmeta = model_codes()
    job = G.model_job(tensors, {"qmeta": qmeta}, "group")
    job.cancel()  # baked LCQ re-quantizes the model: the pipeline cancels the job, wherever it is
    with pytest.raises(A.ArtifactError, match="cancelled"):
        job.sections()
    bad = G.model_job(tensors, {"t": torch.zeros(1)}, "group")  # meta that JSON cannot hold, found on the job's thread
    with pytest.raises(A.ArtifactError, match="meta is not JSON"):
        bad.sections()
    assert bad.done() and bad.seconds_left() == 0.0


def test_row_order_is_applied_stored_and_undone():
    emb = clustered_rows()
    tensors = {"tok_emb.weight.q": emb, "tok_emb.weight.scale": torch.ones(emb.shape[0], dtype=torch.float16)}
    blob, sections = group_blob(tensors, {})
    sec = next(s for s in sections if s.name == "model_embed")
    assert sec.variant == "sorted"  # clusters side by side: the proxy asks for the row order, and it compresses smaller
    manifest, data = section_manifest(blob, "model_embed")
    (entry,) = manifest["tensors"]
    assert entry["layout"] == "grouped" and entry["perm"] == 2 and entry["major"] == "col"
    rows = emb.shape[0]
    perm = np.frombuffer(data[:2 * rows], "<u2")
    assert sorted(perm.tolist()) == list(range(rows)) and perm.tolist() != list(range(rows))
    stored = np.frombuffer(data[2 * rows:], np.int8).reshape(emb.shape[1], rows).T
    assert np.array_equal(stored, emb.numpy()[perm])  # the rows are stored in that order ...
    assert not np.array_equal(stored, emb.numpy())  # ... so reading them without undoing it would be wrong
    out, _ = A.decode(blob)
    assert torch.equal(out["tok_emb.weight.q"], emb)  # and decode undoes it bit for bit


def test_similarity_order_is_a_greedy_nearest_neighbour_walk():
    codes = np.array([[0, 0], [9, 9], [1, 0], [8, 9], [1, 1]], np.int8)
    # from row 0: nearest (1,0) [d 1], then (1,1) [d 1], then (8,9) [d 113 < 128 for (9,9)], then (9,9)
    assert G.similarity_order(codes).tolist() == [0, 2, 4, 3, 1]
    assert G.similarity_order(np.zeros((3, 4), np.int8)).tolist() == [0, 1, 2]  # ties: the lowest index


@pytest.mark.parametrize("peak, cols", [(31, 64), (127, 400)])  # float32 path; 4 * 400 * 127**2 > 2**24: float64
def test_similarity_order_matches_an_exact_integer_walk(peak, cols):
    codes = np.random.default_rng(peak).integers(-peak, peak + 1, (40, cols)).astype(np.int8)
    c = codes.astype(np.int64)
    dist = ((c[:, None, :] - c[None, :, :]) ** 2).sum(-1)  # exact squared L2, no float anywhere
    order, left = [0], set(range(1, 40))
    while left:
        order.append(min(left, key=lambda j: (dist[order[-1], j], j)))
        left.remove(order[-1])
    assert G.similarity_order(codes).tolist() == order


def test_each_group_section_is_never_larger_than_brotli_of_its_plain_layout():
    # What the mode guarantees: every role section compresses its plain layout with brotli among its candidates (same
    # manifest, same chunks) and keeps the smallest, so it is at most that section; nothing is claimed for the sum.
    tensors, qmeta = model_codes(seed=1)
    tensors["tok_emb.weight.q"] = clustered_rows(tensors["tok_emb.weight.q"].shape[0],
                                                 tensors["tok_emb.weight.q"].shape[1])
    groups, _ = G.split(tensors)
    _, sections = group_blob(tensors, {"qmeta": qmeta})
    for sec in sections[1:]:
        role = sec.name.removeprefix("model_")
        plain = AT.compress_section(sec.name, groups[role], {"group": role}, "brotli")
        assert sec.nbytes <= plain.nbytes, sec.name
    assert any(s.variant != "row" for s in sections[1:])  # and some layout other than the plain one did win


# ------------------------------------------------------------------------------------------- back-ends

def test_without_lrzip_every_section_falls_back_to_brotli(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no lrzip binary
    assert G.backends() == ("brotli",) and "brotli fallback" in G.describe_backends()
    assert "apt-get install lrzip" in G.describe_backends()
    tensors, qmeta = model_codes()
    _, sections = group_blob(tensors, {"qmeta": qmeta})
    assert {s.compressor for s in sections} == {"brotli"}


def test_missing_lrzip_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(A.ArtifactError, match=r"lrzip compression needs the lrzip binary.*apt-get install lrzip"):
        AT.compress_section("model", {"w": torch.ones(4)}, {}, "lrzip")
    # an artifact whose section says lrzip (id 3), framed by the documented layout
    body = bytes([5]) + b"model" + struct.pack("<BQI", 3, 10, 1) + struct.pack("<QQ", 10, 4) + b"LRZI"
    head = struct.pack("<4sHHQ", b"LCQA", 2, 1, len(body))
    blob = head + hashlib.sha256(head + body).digest() + body
    with pytest.raises(A.ArtifactError, match=r"^m\.lcq: section 'model' is compressed with lrzip, and no lrzip "
                                              r"binary is on PATH: install it \(apt-get install lrzip\)"):
        A.decode(blob, "m.lcq")


@pytest.mark.skipif(not HAVE_LRZIP, reason="lrzip binary not on PATH (apt-get install lrzip); the brotli fallback "
                                           "is tested above")
def test_lrzip_back_end_round_trips_and_is_deterministic():
    codes = {"q": clustered_rows(64, 64)}
    blob = AT.encode(codes, {"k": 1}, "lrzip")
    assert compressor_of(blob) == "lrzip" and blob == AT.encode(codes, {"k": 1}, "lrzip")
    out, meta = A.decode(blob)
    assert torch.equal(out["q"], codes["q"]) and meta == {"k": 1}
    assert G.backends() == ("lrzip", "brotli")
    tensors, qmeta = model_codes()
    blob, sections = group_blob(tensors, {"qmeta": qmeta})
    assert_bit_exact(tensors, A.decode(blob)[0])


# ------------------------------------------------------------------------------------------- time (issue 17)

def test_projected_seconds_lays_tasks_out_as_the_pool_does():
    rate = {"z": 1.0, "b": 2.0}  # bytes per thread-second
    nine = [("z", 8, None)] * 9  # nine 8-second tasks
    assert A.projected_seconds(nine, rate, 2) == 40.0  # 5 rounds on 2 threads
    assert A.projected_seconds(nine, rate, 16) == 8.0  # one round: the longest task
    # running tasks with 3 s and 1 s left, then 2 s, 1 s and 4 s queued: 1 -> +2 = 3; 3 -> +1 = 4; 3 -> +4 = 7
    tasks = [("z", 5, 2.0), ("z", 3, 2.0), ("b", 4, None), ("z", 1, None), ("b", 8, None)]
    assert A.projected_seconds(tasks, rate, 2) == 7.0
    assert A.projected_seconds(tasks, rate, 2, skip=("b",)) == 3.0  # b's queued left out: 1 -> +1 = 2; 3 stays
    assert A.projected_seconds([("z", 2, 9.0)], rate, 4) == 0.0  # ran past its projection: nothing left


def test_measured_rates_decide_between_lrzip_and_brotli():
    """The decision COMPRESSOR=group makes, fed the rates BENCHMARKS.md measured at record size on the 2-core CI
    machine (lrzip 8.5 s per 4 MiB chunk, brotli 6 s): 9 chunks each cannot finish in a 40 s LCQ window on 2 threads,
    so lrzip is dropped (brotli alone: 30 s); on 24 threads every chunk runs at once and lrzip stays."""
    chunk = 4 << 20
    rates = {"lrzip": chunk / 8.5, "brotli": chunk / 6.0}
    tasks = [(c, chunk, None) for _ in range(9) for c in ("lrzip", "brotli")]
    assert A.to_drop(tasks, rates, 2, 40.0, {"lrzip"}) == ("lrzip",)
    assert A.projected_seconds(tasks, rates, 2, ("lrzip",)) == 30.0 <= 40.0
    assert A.to_drop(tasks, rates, 24, 40.0, {"lrzip"}) == ()
    assert A.to_drop(tasks, rates, 2, 20.0, {"lrzip"}) == ("lrzip",)  # late either way: still the faster one
    assert A.to_drop(tasks, rates, 2, 40.0, set()) == ()  # a section's fallback is never dropped
    # a dropped back-end's running chunks stop (lrzip's child is killed, issue 25): the 4 threads busy with lrzip are
    # free at once, and the 9 brotli chunks take 3 rounds of 6 s
    running = [("lrzip", chunk, 0.0)] * 4 + [("brotli", chunk, None)] * 9
    assert A.projected_seconds(running, rates, 4, ("lrzip",)) == 18.0
    assert A.projected_seconds(running, rates, 4) == 8.5 + 18.0  # kept, they run on


def test_a_late_job_drops_its_slower_back_end_and_ships_the_fallback():
    """A real job due at once (deadline 0) on one thread, no lrzip needed: COMPRESSOR=auto's lzma starts first and is
    dropped at its first slice, so the section is brotli's, byte for byte, and decodes; `choice` says why."""
    tensors, _ = model_codes()
    job = A.SectionJob("model", tensors, {}, "auto", threads=1, deadline=0.0)
    while not job.done():  # the projection holds while a dropped compressor's task winds down
        assert job.seconds_left() is None or job.seconds_left() >= 0
        time.sleep(0.001)
    sec = job.result()
    assert job.dropped == {"lzma"} and sec.compressor == "brotli"
    assert sec.to_bytes() == AT.compress_section("model", tensors, {}, "brotli").to_bytes()
    assert_bit_exact(tensors, A.decode(A.assemble([sec]))[0])
    assert re.fullmatch(r"at [0-9.]+s lzma dropped: projected done at [0-9.]+s, due 0\.0s", job.choice)
    roomy = A.SectionJob("model", tensors, {}, "auto", threads=1, deadline=1e6)
    assert roomy.result().to_bytes() == AT.compress_section("model", tensors, {}, "auto").to_bytes()  # the smaller
    assert not roomy.dropped
    assert re.fullmatch(r"at [0-9.]+s brotli lzma kept: projected done at [0-9.]+s, due 1000000\.0s",
                        roomy.choice)


def test_projection_counts_the_planning_and_every_chunk_whole():
    """Issue 17: the group job projected 9.4 s for a 95 s job. Timed on a real group job (one thread, 16 KiB chunks,
    so ~20 tasks), polled from its start:
    - no projection while it plans, and none before a chunk has finished (a first slice is no rate);
    - the planning plus every task's own timed seconds, laid out as the pool runs them, is the job's wall time (nothing
      it does goes uncounted: the finish of a chunk, its tail, the small sections);
    - the first projection's error is only the spread of the chunks' own rates: the time it really took lies within
      [slowest/fastest remaining chunk's rate ratio] of what was projected (bounds from the job's own task timings,
      not from this machine's speed)."""
    tensors, qmeta = model_codes()
    groups, rest = G.split(tensors)
    job = A.CompressJob(lambda: G.build_units(groups, rest, {"qmeta": qmeta}, ("brotli",)), 1, chunk_bytes=16 << 10)
    polls = []
    while not job.done():
        polls.append((time.perf_counter() - job.started, job.seconds_left()))
        time.sleep(0.001)
    wall = time.perf_counter() - job.started
    job.sections()
    tasks = job.tasks
    assert len(tasks) >= 10 and all(0 < t.seconds < math.inf for t in tasks)
    assert all(p is None for at, p in polls if at < job.plan_seconds)
    first = min(tasks, key=lambda t: t.start + t.seconds)
    at, projected = next((at, p) for at, p in polls if p is not None)
    assert at >= first.start - job.started + first.seconds - 1e-3  # after the first chunk finished
    # every component counted: the exact task seconds, each task its own "compressor", laid out on the job's thread
    exact = A.projected_seconds([(i, t.nbytes, None) for i, t in enumerate(tasks)],
                                {i: t.nbytes / t.seconds for i, t in enumerate(tasks)}, job.threads)
    assert exact + job.plan_seconds <= wall + 0.01  # the tasks ran one after the other on one thread ...
    assert wall <= 1.05 * (exact + job.plan_seconds) + 0.05  # ... and the gaps between them are small
    # the first projection against the remaining chunks' own rates (at the rate the job had measured by then)
    t0 = job.started
    done = [t for t in tasks if t.start + t.seconds - t0 <= at]
    rate = sum(t.nbytes for t in done) / sum(t.seconds for t in done)
    rest_ = [t for t in tasks if t.start + t.seconds - t0 > at]
    rho = [t.seconds * rate / t.nbytes for t in rest_]
    ran = sum(max(0.0, at - (t.start - t0)) for t in rest_ if t.start - t0 < at)  # the running task's elapsed time
    unprojected = sum(t.nbytes for t in rest_) / rate  # the projection before the running task's elapsed is taken off
    assert projected == pytest.approx(unprojected - min(ran, unprojected), abs=0.02)
    took = wall - at
    assert min(rho) * unprojected - 0.05 <= took + ran <= max(rho) * unprojected * 1.05 + 0.05


# ------------------------------------------------------------------------------------------- the knob

def test_compressor_knob_accepts_group_and_names_the_choices():
    assert make_config("tiny", compressor="group").compressor == "group"
    with pytest.raises(ConfigError, match=r"COMPRESSOR=.lrzip.: choose one of brotli lzma auto group"):
        make_config("tiny", compressor="lrzip")
    assert G.section_compressor("group") == "brotli" and G.section_compressor("auto") == "auto"


# ------------------------------------------------------------------------------------------- the pipeline

def test_pipeline_ships_group_sections_and_counts_their_bytes(tmp_path, demo_data, monkeypatch):
    """A tiny run end to end with COMPRESSOR=group (lrzip hidden, so the bytes are brotli's on every machine): the
    model's role sections start on the job's threads after GPTQ, the log names each section's back-end and layout, the
    gate's model bytes are exactly the model sections in the file, and the artifact loads to the GPTQ weights."""
    from pathlib import Path

    from lcq.dist import DistInfo
    from lcq.pipeline import build, lcq, open_run, quantize, run_training, ship
    from lcq.shipping import load_shipped

    monkeypatch.setenv("PATH", str(tmp_path))
    data_path, tok = demo_data
    cfg = make_config("tiny", data_path=str(data_path), tokenizer_path=str(tok), log_dir=str(tmp_path / "logs"),
                      run_id="group", submission_json="", iterations=4, lcq_max_steps=2, compressor="group")
    cpu = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    torch.set_num_threads(1)
    run = open_run(cfg, cpu)
    build(run)
    run_training(run)
    quantize(run)
    lcq(run)
    assert ship(run)
    run.log.close()
    log = Path(run.log.path).read_text()
    assert "compressor group: no lrzip binary on PATH, brotli fallback" in log
    assert "compressors:model:brotli,model_embed:brotli/" in log and ",lora:brotli" in log
    # which back-end and why: brotli alone (no lrzip to drop), with the job's projection against its deadline
    assert re.search(r"^compressor_choice: at [0-9.]+s brotli kept: projected done at [0-9.]+s, due -?[0-9.]+s$",
                     log, re.M)
    path = cfg.artifact_file
    sections = A.sections_of(Path(path).read_bytes(), path)
    assert list(sections)[0] == "model" and list(sections)[-1] == "lora" and "model_mlp_up" in sections
    model_sections = sum(s.nbytes for n, s in sections.items() if n != "lora")
    assert run.size.model_bytes == A.HEADER_BYTES + model_sections
    assert run.size.lora_bytes == sections["lora"].nbytes
    model, _, _ = load_shipped(path, cfg, cpu.device, with_lora=False)
    state = model.state_dict()
    for name, value in run.gptq_state.items():
        assert torch.equal(state[name], value.to(state[name].dtype)), name


# ------------------------------------------------------------------------------------ many-core box (issue 25)

def test_group_planning_plans_buckets_at_once_and_the_same_as_one_thread(monkeypatch):
    """With 2 threads two buckets are planned at the same time (each waits until another is in flight: one at a time,
    none would see a second); the units are those one thread plans, byte for byte."""
    tensors, qmeta = model_codes()
    groups, rest = G.split(tensors)
    serial = G.build_units(groups, rest, {"qmeta": qmeta}, ("brotli",), threads=1)
    real, lock, active, peak, both = G.plan_group, threading.Lock(), [0], [0], threading.Event()

    def plan(codes, hot):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            if active[0] >= 2:
                both.set()
        both.wait(30)
        try:
            return real(codes, hot)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(G, "plan_group", plan)
    parallel = G.build_units(groups, rest, {"qmeta": qmeta}, ("brotli",), threads=2)
    assert len(groups) >= 2 and peak[0] == 2
    assert [(u.name, u.variants) for u in parallel] == [(u.name, u.variants) for u in serial]


def lrzip_children(monkeypatch) -> list:
    """Every lrzip process lcq.artifact starts from now on (the real binary, recorded to see how it ended)."""
    started, popen = [], subprocess.Popen

    class Recorded(popen):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            started.append(self)

    monkeypatch.setattr(A.subprocess, "Popen", Recorded)
    return started


@pytest.mark.skipif(not HAVE_LRZIP, reason="lrzip binary not on PATH (apt-get install lrzip)")
@pytest.mark.parametrize("how", ["dropped", "cancelled"])
def test_a_running_lrzip_child_is_killed_when_lrzip_is_dropped(monkeypatch, how):
    """lrzip (ZPAQ) takes seconds on 1 MiB of int6 codes; once its child runs, the job drops lrzip (the state a
    late projection sets) or is cancelled: the child dies by SIGKILL instead of running to its end, and a dropped
    job ships brotli's section, which decodes."""
    started = lrzip_children(monkeypatch)
    codes = {"q": torch.randint(-31, 32, (1024, 1024), generator=torch.Generator().manual_seed(0)).to(torch.int8)}
    job = A.CompressJob([A.Unit("model", (("", A._payload(codes, {})),), ("lrzip", "brotli"))], 2)
    deadline = time.perf_counter() + 60
    while not started and time.perf_counter() < deadline:
        time.sleep(0.01)
    assert started and started[0].poll() is None  # running
    if how == "dropped":
        with job._lock:
            job.dropped.add("lrzip")
        sections = job.sections()
        assert sections[0].compressor == "brotli" and torch.equal(A.decode(A.assemble(sections))[0]["q"], codes["q"])
    else:
        job.cancel()
        with pytest.raises(A.ArtifactError, match="cancelled"):
            job.sections()
    started[0].wait(10)
    assert started[0].returncode == -signal.SIGKILL


def test_lcq_takes_back_the_serialize_reserve_when_a_late_projection_arrives(monkeypatch):
    """A plan made before any chunk was timed keeps SERIALIZE_RESERVE_SECONDS (30 s here) for serialization; once the
    job's first chunk is timed, distillation's budget rises to what the window leaves after the LoRA section at the
    measured rate, and the serialize budget falls by as much."""
    import lcq.shipping as S
    from lcq.distill import distill_budget
    from lcq.dist import DistInfo
    from types import SimpleNamespace

    monkeypatch.setattr(S, "RATE_WAIT_SECONDS", 0.0)
    tensors, qmeta = model_codes()
    job = A.SectionJob("model", tensors, {"qmeta": qmeta}, "brotli", 1, chunk_bytes=64 << 10)
    lines = []
    run = SimpleNamespace(cfg=make_config("tiny", serialize_reserve_seconds=30.0), base_job=job, serialize_budget=None,
                          dinfo=DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")),
                          log=lines.append)
    window = 60.0
    serialize_s, lora_s = S.plan_serialize(run, window, 4096)
    assert serialize_s == 30.0 and lora_s == 0.0 and job.rates() is None
    budget = distill_budget(run, window - serialize_s, window, lora_s, 4096)
    job.rates(wait_s=60)  # the first chunk is timed
    value = budget(0.5)
    assert window - serialize_s < value <= window - S.WRITE_SECONDS
    assert run.serialize_budget == pytest.approx(window - value) and run.serialize_budget < 30.0
    assert any("takes back" in line for line in lines)
