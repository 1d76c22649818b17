"""The benchmarks run end to end (tiny preset) and end with their JSON line; their figures are checked in BENCHMARKS.md
runs, not here (no timed tests)."""
import json
import os
import subprocess
import sys

from lcq import grouping


def bench(tmp_path, demo_data, *args):
    data_path, tok = demo_data
    env = dict(os.environ, DATA_PATH=str(data_path), TOKENIZER_PATH=str(tok), LOG_DIR=str(tmp_path / "logs"),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "lcq.tools.bench", *args, "--preset", "tiny"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_quant_bench(tmp_path, demo_data):
    out = bench(tmp_path, demo_data, "quant", "--bits", "4,8")
    assert [r["bits"] for r in out["rows"]] == [4, 8]
    int4, int8 = out["rows"]
    assert int4["bytes_per_param_brotli"] < int8["bytes_per_param_brotli"] < out["int8_zlib_bytes_per_param"]
    assert 0 < out["gptq_time_fraction"] and out["embed_only_gap"] is not None


def test_lcq_bench(tmp_path, demo_data):
    out = bench(tmp_path, demo_data, "lcq", "--bits", "4", "--ranks", "2", "--inits", "zero,grail")
    rows = out["rows"]
    # zero and grail, each without and with training, then grail baked
    assert [(r["init"], r["trained"], r["merge"]) for r in rows] == [
        ("zero", False, "side"), ("zero", True, "side"), ("grail", False, "side"), ("grail", True, "side"),
        ("grail", True, "baked")]
    assert rows[0]["lcq_bpb"] == rows[0]["quant_bpb"]  # B = 0: the untrained zero init is the quantized model
    assert all(r["lora_bytes"] > 0 for r in rows[:4]) and rows[4]["lora_bytes"] == 0


def test_attribution_bench(tmp_path, demo_data):
    """One budget keeps it short; BENCHMARKS.md runs three on the demo model."""
    out = bench(tmp_path, demo_data, "attribution", "--budgets", "20", "--plot", str(tmp_path / "attr.png"))
    rows = out["rows"]
    assert [r["arm"] for r in rows] == ["a_full_budget_no_lcq", "b_reserve_cut_lcq_side", "c_reserve_cut_lcq_baked"]
    a, side, baked = rows
    assert a["train_reserve_s"] < side["train_reserve_s"] == baked["train_reserve_s"]
    assert side["lora_bytes"] > 0 and a["lora_bytes"] == baked["lora_bytes"] == 0  # bytes counted in every arm
    assert "ttt_artifact_bpb" in side and "ttt_artifact_bpb" not in a and "ttt_artifact_bpb" not in baked
    assert all(0 < r["ttt_zero_bpb"] < 10 and 0 < r["sliding_bpb"] < 10 for r in rows)
    assert [v["budget_s"] for v in out["verdicts"]] == [20.0]


def test_serialize_bench(tmp_path, demo_data):
    out = bench(tmp_path, demo_data, "serialize", "--lcq-window", "0.2")
    strategies = {"serial", "parallel", "overlapped"}
    assert set(out["bytes"]) == set(out["charged_seconds"]) == set(out["strategies"]) == strategies
    assert out["payload_params"] > 0 and all(s >= 0 for s in out["charged_seconds"].values())
    # the same two sections, compressed deterministically: the strategies differ in time, never in bytes
    assert out["bytes"]["parallel"] == out["bytes"]["overlapped"]


def test_serialize_bench_times_group_mode_as_the_pipeline_runs_it(tmp_path, demo_data):
    """COMPRESSOR=group (the record preset's) is timed, not refused: the overlapped strategy, its LCQ window beside."""
    out = bench(tmp_path, demo_data, "serialize", "--lcq-window", "0.2", "--compressor=group")
    assert out["compressor"] == "group" and set(out["bytes"]) == set(out["charged_seconds"]) == {"overlapped"}
    row = out["strategies"]["overlapped"]
    assert out["payload_params"] > 0 and row["charged_seconds"] >= 0 and row["lcq_window_s"] == 0.2
    assert row["base_section_seconds"] > 0 and out["bytes"]["overlapped"] > 0
    # the job's own timings: planning, per back-end chunks, the many-core figure (planning + the longest chunk)
    # brotli is every section's fallback, never dropped; lrzip takes part only where its binary is on PATH, and a
    # 0.2 s window either drops it or (its chunks done first) keeps both
    backends = grouping.backends()
    assert 0 < row["plan_seconds"] < row["many_core_seconds"] and "brotli" in row["per_chunk"]
    assert set(row["per_chunk"]) <= set(backends) and row["per_chunk"]["brotli"]["tasks"] >= len(row["sections"])
    assert ("brotli kept" in row["choice"]) if backends == ("brotli",) else \
        ("lrzip dropped" in row["choice"] or "brotli lrzip kept" in row["choice"])


def test_compressors_bench(tmp_path, demo_data):
    """brotli, auto and group on the same payload (each decoded back bit for bit inside the bench)."""
    out = bench(tmp_path, demo_data, "compressors")
    assert set(out["bytes"]) == set(out["seconds"]) == {"brotli", "auto", "group"}
    assert out["rows"]["auto"]["bytes"] <= out["rows"]["brotli"]["bytes"]  # auto keeps the smaller of lzma, brotli
    group = out["rows"]["group"]["sections"]
    assert list(group)[0] == "model" and "model_mlp_up" in group and all(v["bytes"] > 0 for v in group.values())
    assert sum(v["bytes"] for v in group.values()) + 48 == out["bytes"]["group"]  # the sections and the header


def test_ttt_bench_rows_and_record_projection(tmp_path, demo_data):
    """Batch 1 and 4 score the same targets (the bench checks the positions); the projection is a positive ratio."""
    out = bench(tmp_path, demo_data, "ttt", "--batch-docs", "1,4")
    rows = {r["batch_docs"]: r for r in out["rows"]}
    assert set(rows) == {1, 4} and rows[1]["targets"] == rows[4]["targets"]
    for r in rows.values():
        assert {"targets_per_s", "forward_tokens_per_target", "steps_per_1k_targets", "max_abs_nll_diff"} <= set(r)
        assert r["forward_tokens_per_target"] >= 1  # every target is read at least once
    assert rows[4]["steps_per_1k_targets"] <= rows[1]["steps_per_1k_targets"]  # four documents share each step
    proj = out["record_projection"]
    assert proj["samples"] == 82 and proj["documents"] == 782 * 64 and proj["work_ratio_vs_1855"] > 0


def test_ttt_context_bench_fields(tmp_path, demo_data):
    """recompute vs reuse on record-length documents: the issue's JSON fields, one entry per seed; reuse runs a fraction
    of recompute's forward tokens (a work count, not a time); the cache bytes at the record's shapes are its arithmetic."""
    out = bench(tmp_path, demo_data, "ttt", "--context", "--seeds", "1", "--batch-docs", "4", "--chunk", "4",
                "--max-steps", "2", "--val_max_tokens=1500")
    assert all(len(out[k]) == 1 and 0 < out[k][0] < 10 for k in ("recompute_bpb", "reuse_bpb", "reuse_spent_bpb"))
    assert set(out["seconds"]) == {"recompute", "reuse", "reuse_2_steps", "reuse_spent"} and 0 < out["work_ratio"][0] < 1
    mem = out["cache_bytes_record"]
    assert mem["window_2048_bytes"] == 2 * mem["attention_calls"] * 64 * 2049 * 4 * 64 * 2


def test_lcq_equal_bytes_bench_ships_within_each_budget(tmp_path, demo_data):
    budget = 3000
    out = bench(tmp_path, demo_data, "lcq", "--equal-bytes", "--byte-budgets", str(budget), "--lcq-steps", "2",
                "--cache", str(tmp_path / "cache"))
    rows = out["equal_bytes"]
    assert [(r["method"], r["bits"]) for r in rows][:5] == [
        ("lqer_today", "2+4"), ("lcq_uniform_int8", "8"), ("alloc_closed", "8"), ("alloc_closed", "4"),
        ("alloc_closed", "2+4")]
    assert rows[5]["method"] == "alloc_distilled" and rows[5]["bits"] in ("8", "4", "2+4")
    for r in rows:
        assert set(r) >= {"budget_bytes", "method", "bits", "shipped_bytes", "recovered"}
        assert r["budget_bytes"] == budget and 0 <= r["shipped_bytes"] <= budget
        if r["shipped_bytes"] == 0:  # nothing fitted: the quantized model itself
            assert r["bpb"] == out["quant_bpb"]
    # the distilled row ran exactly the pinned steps, the closed forms none
    assert [r["steps"] for r in rows if r["method"] == "alloc_closed"] == [0, 0, 0]
    assert rows[5]["steps"] in (0, 2) and (rows[5]["steps"] == 2) == (rows[5]["shipped_bytes"] > 0)
    # the trained model is cached: a second run reuses it and scores the same float and quantized model
    again = bench(tmp_path, demo_data, "lcq", "--equal-bytes", "--byte-budgets", str(budget), "--lcq-steps", "0",
                  "--cache", str(tmp_path / "cache"))
    assert again["cached_model"] and not out["cached_model"]
    assert (again["float_bpb"], again["quant_bpb"]) == (out["float_bpb"], out["quant_bpb"])
    assert [r["shipped_bytes"] for r in again["equal_bytes"][2:5]] == [r["shipped_bytes"] for r in rows[2:5]]
