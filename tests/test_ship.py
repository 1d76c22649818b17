"""Quantize -> LCQ -> artifact -> gate -> eval of what ships, in process (tiny preset) and through train_gpt.py."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lcq import artifact
from lcq.config import make_config
from lcq.data import record_reads
from lcq.dist import DistInfo
from lcq.lora import lora_modules
from lcq.pipeline import build, evaluate_shipped, lcq, open_run, quantize, run_training, ship
from lcq.shipping import apply_lora, load_shipped
from artifact_bounds import max_section_bytes

REPO = Path(__file__).resolve().parents[1]
CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def tiny_cfg(tmp_path, demo_data, run_id, **kw):
    data_path, tok = demo_data
    return make_config("tiny", data_path=str(data_path), tokenizer_path=str(tok), log_dir=str(tmp_path / "logs"),
                       run_id=run_id, submission_json="", **kw)


def run_stages(cfg):
    torch.set_num_threads(1)
    run = open_run(cfg, CPU)
    build(run)
    run_training(run)
    with record_reads() as reads:
        quantize(run)
        lcq(run)
    run.post_train_reads = list(reads)
    return run


@pytest.fixture(scope="module")
def shipped(tmp_path_factory, demo_data):
    """A tiny run with a visible quantization gap (int3 matrices), zero-init LoRA distilled for a few steps."""
    tmp = tmp_path_factory.mktemp("ship")
    cfg = tiny_cfg(tmp, demo_data, "ship", iterations=30, matrix_bits=3, lcq_init="zero", lcq_max_steps=15, lcq_lr=3e-3)
    run = run_stages(cfg)
    assert ship(run)
    evaluate_shipped(run)
    run.log.close()
    return run


def test_calibration_and_distillation_read_only_train_shards(shipped):
    assert shipped.post_train_reads, "GPTQ/LCQ must have read train shards"
    names = {os.path.basename(p) for p in shipped.post_train_reads}
    assert all(n.startswith("fineweb_train_") for n in names), names


def test_distillation_lowers_heldout_kl(shipped):
    res = shipped.distill_result
    assert res.steps == 15
    assert res.kl_end < 0.9 * res.kl_start, (res.kl_start, res.kl_end)


def test_scores_of_what_ships(shipped):
    s = shipped.scores
    assert list(s) == ["pre_quant", "quantized", "quantized_lcq"]
    assert s["quantized"].val_bpb > s["pre_quant"].val_bpb  # int3 costs something
    assert s["quantized_lcq"].val_bpb < s["quantized"].val_bpb  # and the distilled LoRA wins some of it back
    assert len({r.tokens for r in s.values()}) == 1


def test_artifact_decodes_bit_exactly_to_the_quantized_model(shipped):
    model, meta, _ = load_shipped(shipped.cfg.artifact_file, shipped.cfg, CPU.device, with_lora=False)
    state = model.state_dict()
    for name, value in shipped.gptq_state.items():
        assert torch.equal(state[name], value.to(state[name].dtype)), name
    assert model.lm_head.weight is model.tok_emb.weight
    assert meta["lora"]["merge"] == "side" and meta["lora"]["format"] == [8, 8, 0]


def test_side_path_and_folded_load_give_the_same_logits(shipped):
    # load_shipped folds the side LoRA into the weights (issue 8); the unfolded side path, built from the same
    # artifact tensors, must give the same logits up to float32 rounding of the two summation orders.
    tensors, meta = artifact.load(shipped.cfg.artifact_file)
    side, _, _ = load_shipped(shipped.cfg.artifact_file, shipped.cfg, CPU.device, with_lora=False)
    apply_lora(side, tensors, meta["lora"])
    folded, meta_loaded, _ = load_shipped(shipped.cfg.artifact_file, shipped.cfg, CPU.device)
    assert lora_modules(side) and not lora_modules(folded)
    assert meta_loaded["lora"]["merge"] == "side"  # the artifact still records how it ships
    ids = torch.tensor(shipped.val_tokens[:200].astype("int64"))
    cu = torch.tensor([0, 200], dtype=torch.int32)
    with torch.no_grad():
        torch.testing.assert_close(side(ids, cu, 64), folded(ids, cu, 64), atol=2e-4, rtol=1e-4)


def test_gate_counts_lora_bytes(shipped):
    size, path = shipped.size, shipped.cfg.artifact_file
    sections = artifact.sections_of(Path(path).read_bytes(), path)
    assert list(sections) == ["model", "lora"]
    lora = sections["lora"]
    assert size.lora_bytes == lora.nbytes > 0  # the LoRA's own section: its bytes, no attribution estimate
    # The guarantee the code gives, on any machine: a section is at most its uncompressed payload plus the compressors'
    # documented worst-case framing for incompressible input (artifact_bounds.max_compressed_bytes), plus its header; the
    # payload is the factors' bytes (int8 codes, fp16 scales; no layout ever grows them) plus the section's manifest.
    raw = sum(t.numel() * t.element_size() for t in shipped.lora_tensors.values())
    assert raw < lora.raw_bytes and lora.nbytes <= max_section_bytes("lora", lora.raw_bytes)
    assert size.model_bytes == artifact.HEADER_BYTES + sections["model"].nbytes
    assert size.model_bytes + size.lora_bytes == os.path.getsize(path)
    assert size.total == size.code_bytes + os.path.getsize(path)


def test_serialize_budget_comes_from_the_measured_rate(shipped):
    # LCQ kept back what serialization was projected to need from the rates the base section's job measured; that
    # projection is the serialize row's budget in the ledger, and the log says how it was made.
    log = Path(shipped.log.path).read_text()
    plan = re.search(r"^serialize_plan: base section (\d+) raw bytes, (\d+) threads, measured (.*) MB/s per thread; "
                     r".*serialize budget ([0-9.]+)s$", log, re.M)
    assert plan, "no serialize_plan line"
    # distillation only ever gives time back to serialization (when the model section is projected later as it goes)
    assert shipped.serialize_budget >= float(plan.group(4)) - 0.005
    assert [b for stage, _, b in shipped.ledger if stage == "serialize"] == [shipped.serialize_budget]
    assert re.search(r"^stage:serialize .*base_wait:[0-9.]+s lora_compress:[0-9.]+s compressors:model:\w+,lora:\w+",
                     log, re.M)


def test_corrupted_artifact_is_a_clear_error(shipped, tmp_path):
    blob = bytearray(Path(shipped.cfg.artifact_file).read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    bad = tmp_path / "bad.lcq"
    bad.write_bytes(bytes(blob))
    with pytest.raises(artifact.ArtifactError, match=str(bad)):
        load_shipped(str(bad), shipped.cfg, CPU.device)
    bad.write_bytes(bytes(blob[:100]))
    with pytest.raises(artifact.ArtifactError, match="truncated|short"):
        load_shipped(str(bad), shipped.cfg, CPU.device)


# ---- through train_gpt.py ----------------------------------------------------------------------------------------

def entry(tmp_path, demo_data, run_id, *args, script=None, extra_env=None, nproc=1):
    data_path, tok = demo_data
    env = dict(os.environ, PRESET="tiny", DATA_PATH=str(data_path), TOKENIZER_PATH=str(tok), LOG_DIR=str(tmp_path / "logs"),
               RUN_ID=run_id, OMP_NUM_THREADS="1", SUBMISSION_JSON="", **(extra_env or {}))
    target = str(script or REPO / "train_gpt.py")
    cmd = [sys.executable, target, *args] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", target, *args]
    return subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)


def total_bytes(log: str) -> int:
    return int(re.search(r"^Total submission size: (\d+) bytes", log, re.M).group(1))


def exact(log: str, stage: str) -> str:
    return re.search(rf"^{stage}_exact (val_loss:\S+ val_bpb:\S+)$", log, re.M).group(1)


def test_gate_passes_at_the_cap_and_fails_one_byte_over(tmp_path, demo_data):
    first = entry(tmp_path, demo_data, "g0")
    assert first.returncode == 0, first.stderr[-2000:]
    total = total_bytes((tmp_path / "logs" / "g0.txt").read_text())
    at_cap = entry(tmp_path, demo_data, "g1", extra_env={"ARTIFACT_CAP_BYTES": str(total)})
    assert at_cap.returncode == 0, at_cap.stderr[-2000:]
    assert total_bytes((tmp_path / "logs" / "g1.txt").read_text()) == total  # same seed, same bytes
    over = entry(tmp_path, demo_data, "g2", extra_env={"ARTIFACT_CAP_BYTES": str(total - 1)})
    assert over.returncode == 3
    log = (tmp_path / "logs" / "g2.txt").read_text()
    assert "GATE FAILED" in log and "1 byte over the cap" in log and "LCQ_RANK" in log
    assert (tmp_path / "logs" / "g2.lcq").exists() and (tmp_path / "logs" / "g2.json").exists()
    assert "quantized_exact" not in log  # nothing is scored past a failed gate


def test_eval_only_process_matches_the_in_process_score(tmp_path, demo_data):
    # low-bit factors (#1855's 2+4 storage, issue 16): trained on their grid, decoded from the artifact bit for bit
    train = entry(tmp_path, demo_data, "src", extra_env=dict(LCQ_FACTOR_BITS="4", LCQ_FACTOR_ASYM="1", LCQ_FACTOR_GROUP="16"))
    assert train.returncode == 0, train.stderr[-2000:]
    log = (tmp_path / "logs" / "src.txt").read_text()
    art = tmp_path / "logs" / "src.lcq"
    alone = entry(tmp_path, demo_data, "evalonly", "--eval_only", "--artifact", str(art))
    assert alone.returncode == 0, alone.stderr[-2000:]
    log2 = (tmp_path / "logs" / "evalonly.txt").read_text()
    assert exact(log2, "quantized_lcq") == exact(log, "quantized_lcq")
    two = entry(tmp_path, demo_data, "evalonly2", "--eval_only", "--artifact", str(art), nproc=2)
    assert two.returncode == 0, two.stderr[-2000:]
    loss1, bpb1 = (float(v.split(":")[1]) for v in exact(log, "quantized_lcq").split())
    loss2, bpb2 = (float(v.split(":")[1]) for v in exact((tmp_path / "logs" / "evalonly2.txt").read_text(), "quantized_lcq").split())
    assert bpb2 == pytest.approx(bpb1, abs=1e-6) and loss2 == pytest.approx(loss1, abs=1e-6)


def test_eval_only_missing_artifact_names_it(tmp_path, demo_data):
    proc = entry(tmp_path, demo_data, "missing", "--eval_only", "--artifact", str(tmp_path / "nope.lcq"))
    assert proc.returncode != 0 and "nope.lcq" in proc.stderr


def test_bundled_script_runs_with_the_repo_not_importable(tmp_path, demo_data):
    bundle = tmp_path / "train_gpt.py"
    made = subprocess.run([sys.executable, "-m", "lcq.tools.bundle", "--out", str(bundle)], cwd=REPO, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    poison = tmp_path / "poison" / "lcq"
    poison.mkdir(parents=True)
    (poison / "__init__.py").write_text("raise ImportError('the bundle must not import lcq from disk')\n")
    run_dir = tmp_path / "empty"
    run_dir.mkdir()
    proc = entry(run_dir, demo_data, "bundled", script=bundle, extra_env={"PYTHONPATH": str(poison.parent)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (run_dir / "logs" / "bundled.txt").read_text()
    # The counted code bytes are the bytes of the script that ran, and it re-emits itself unchanged.
    assert re.search(rf"code {bundle.stat().st_size},", log)
    assert (run_dir / "logs" / "bundled.train_gpt.py").read_bytes() == bundle.read_bytes()


def test_baked_ships_no_lora_bytes_and_still_scores_the_lcq_model(tmp_path, demo_data):
    proc = entry(tmp_path, demo_data, "baked", extra_env={"LCQ_MERGE": "baked"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = (tmp_path / "logs" / "baked.txt").read_text()
    assert re.search(r"lora 0, cap", log) and "quantized_lcq_exact" in log
    tensors, meta = artifact.load(tmp_path / "logs" / "baked.lcq")
    assert meta["lora"] is None and not any(k.startswith("lora.") for k in tensors)
