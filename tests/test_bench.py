"""The benchmarks run end to end (tiny preset) and end with their JSON line; their figures are checked in BENCHMARKS.md
runs, not here (no timed tests)."""
import json
import os
import subprocess
import sys


def bench(tmp_path, demo_data, *args):
    data_path, tok = demo_data
    env = dict(os.environ, DATA_PATH=str(data_path), TOKENIZER_PATH=str(tok), LOG_DIR=str(tmp_path / "logs"),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "lcq.bench", *args, "--preset", "tiny"], env=env, cwd=tmp_path,
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


def test_ablate_bench(tmp_path, demo_data):
    out = bench(tmp_path, demo_data, "ablate")
    arms = out["arms"]
    assert list(arms) == ["a_full_budget_no_lcq", "b_reserve_cut_no_lcq", "c_reserve_cut_with_lcq"]
    assert arms["a_full_budget_no_lcq"]["train_reserve_s"] < arms["b_reserve_cut_no_lcq"]["train_reserve_s"]
    assert [a["final_stage"] for a in arms.values()] == ["quantized", "quantized", "quantized_lcq"]
