"""The fit (issue 25): a model over the cap ships with its cheapest +-1 codes zeroed, the fewest that fit, checked by
compressing; at the normal cap nothing changes. In process on the tiny preset, and on 2 gloo ranks."""
import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from lcq import artifact, grouping
from lcq.config import make_config
from lcq.dist import DistInfo
from lcq.pipeline import build, open_run, quantize, run_training, score, ship, start_base_section
from lcq.shipping import (FitError, artifact_meta, fit_to_cap, least_count, load_shipped, model_from_state, prune,
                          prune_order, quant_errors)

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def tiny(tmp_path, demo_data, run_id, **kw):
    data_path, tok = demo_data
    return make_config("tiny", data_path=str(data_path), tokenizer_path=str(tok), log_dir=str(tmp_path),
                       run_id=run_id, submission_json="", **kw)


def model_bytes(run, tensors) -> int:
    job = grouping.model_job(tensors, artifact_meta(run.cfg, run.bos_id, run.qmeta, None), run.cfg.compressor)
    return artifact.HEADER_BYTES + sum(s.nbytes for s in job.sections())


def test_least_count_is_the_least_that_fits_of_a_monotone_size():
    for slope, excess in ((0.37, 1000), (2.0, 7), (0.05, 300)):
        over = 100_000
        target = over - excess
        size = lambda n: over - int(slope * n)  # noqa: E731 (monotone, in steps of uneven width)
        calls = []
        n, sizes = least_count(lambda k: calls.append(k) or size(k), over, target, 10**6, 10)
        assert size(n) <= target < size(n - 1) and sizes[n] == size(n) and n - 1 in sizes
        assert n == next(k for k in range(1, 10**6) if size(k) <= target)  # monotone: the least overall
        assert len(calls) == len(set(calls)) <= 40  # every probe is new; bisection bounds them by ~2 log2(10**6)
    n, sizes = least_count(lambda k: over - k, over, over - 50, 10**6, 10, deadline=0.0)  # past the clock at once
    assert sizes[n] <= over - 50 and n - 1 not in sizes  # what fits ships, its minimality unchecked
    with pytest.raises(FitError, match="FIT_MAX_FRACTION"):
        least_count(lambda k: over - k, over, over - 50, 49, 10)
    with pytest.raises(FitError, match="FIT_MAX_FRACTION"):
        least_count(lambda k: over - k, over, over - 50, 0, 10)


def test_prune_order_is_cheapest_first_and_the_same_from_equal_inputs():
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-3, 4, (8, 16), generator=gen).to(torch.int8)
    qt = {"w.q": q, "w.scale": torch.rand(8, generator=gen).half() + 0.1, "b": torch.zeros(3)}
    X = torch.randn(64, 16, generator=gen)
    H = {"w": X.T @ X}
    names, owner, flat, cost = prune_order(qt, H)
    assert names == ["w"] and len(flat) == int((q.abs() == 1).sum()) and np.all(np.diff(cost) >= 0)
    s, h = qt["w.scale"].double(), H["w"].double().diagonal()
    assert np.allclose(cost, (s[flat // 16] ** 2 * h[flat % 16]).numpy())  # s^2 h_jj without the error term
    again = prune_order({k: v.clone() for k, v in qt.items()}, {"w": H["w"].clone()})
    assert all(np.array_equal(a, b) for a, b in zip((owner, flat, cost), again[1:]))
    out = prune(qt, (names, owner, flat, cost), 5)
    changed = (out["w.q"] != q).reshape(-1).nonzero().squeeze(1).numpy()
    assert sorted(changed) == sorted(flat[:5]) and (out["w.q"].reshape(-1)[changed] == 0).all() and qt["w.q"] is q


def test_a_model_over_the_cap_ships_the_fewest_pruned_codes_that_fit(tmp_path, demo_data):
    """Known answers: at the normal cap nothing is pruned (the base job and codes are untouched); a few KB below the
    unpruned size (a few hundred bytes: the tiny model is ~76 KB) the artifact fits, n - 1 pruned codes do not (compressed here), the file decodes to the pruned codes
    bit for bit, and the score of the decoded file equals the in-memory pruned model's."""
    run = open_run(tiny(tmp_path, demo_data, "fit", lcq_rank="auto"), CPU)
    build(run)
    run_training(run)
    quantize(run)
    q0, g0 = dict(run.qtensors), run.gptq_state
    start_base_section(run)
    job0 = run.base_job
    fit_to_cap(run)
    assert run.qtensors == q0 and run.base_job is job0 and run.log.summary["fit"]["pruned"] == 0
    code = len(run.script_job.result())
    unpruned = artifact.HEADER_BYTES + sum(s.nbytes for s in job0.sections())
    target = unpruned - 200  # the tiny model's +-1 codes save ~0.1 byte each; 10% of them ~330 bytes
    run.cfg = dataclasses.replace(run.cfg, artifact_cap_bytes=code + target)
    order = prune_order(q0, run.hessians, quant_errors(run))
    run.ledger.clear()
    fit_to_cap(run)
    fit = run.log.summary["fit"]
    n = fit["pruned"]
    assert n > 0 and fit["model_bytes_before"] == unpruned and fit["model_bytes_after"] <= target
    assert fit["error_cost"] == pytest.approx(float(order[3][:n].sum()))
    assert model_bytes(run, prune(q0, order, n - 1)) > target  # one fewer does not fit
    assert model_bytes(run, prune(q0, order, n)) == fit["model_bytes_after"]  # what the search measured ships
    ones = lambda t: sum(int((v.abs() == 1).sum()) for k, v in t.items() if k.endswith(".q"))  # noqa: E731
    assert ones(q0) - ones(run.qtensors) == n
    run.ledger.clear()
    run.base_job = None
    start_base_section(run)  # the pruned codes' own job, as after a fit that found them
    assert ship(run)
    tensors, _ = artifact.load(run.cfg.artifact_file)
    assert all(torch.equal(tensors[k], v) for k, v in run.qtensors.items())  # bit-exact round trip
    decoded, _, _ = load_shipped(run.cfg.artifact_file, run.cfg, CPU.device, with_lora=False)
    in_memory = model_from_state(run.cfg, run.bos_id, run.gptq_state, CPU.device)
    assert score(run, decoded).val_loss == score(run, in_memory).val_loss  # eval scores exactly what ships
    assert g0 is not run.gptq_state


def _two_ranks(rank, port, demo_data, tmp, cap, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        info = DistInfo(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"))
        run = open_run(tiny(tmp, demo_data, "fit2", lcq_rank="auto", artifact_cap_bytes=cap, fit_max_fraction=1.0), info)
        build(run)
        quantize(run)
        start_base_section(run)
        fit_to_cap(run)
        digest = {k: v.numpy().tobytes().hex() for k, v in run.qtensors.items() if k.endswith(".q")}
        with open(f"{out}.{rank}", "w") as f:
            json.dump(dict(codes=digest, fit=run.log.summary.get("fit")), f)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_prune_the_same_codes(tmp_path, demo_data, free_port):
    """Untrained weights (GPTQ needs no training; their +-1 codes save little each, so any fraction may go): the cap 100
    bytes under the unpruned model bytes."""
    run = open_run(tiny(tmp_path, demo_data, "fit1", lcq_rank="auto"), CPU)
    build(run)
    quantize(run)
    start_base_section(run)
    cap = len(run.script_job.result()) + artifact.HEADER_BYTES + sum(s.nbytes for s in run.base_job.sections()) - 100
    out = str(tmp_path / "codes")
    mp.spawn(_two_ranks, args=(free_port, demo_data, tmp_path / "two", cap, out), nprocs=2, join=True)
    got = [json.load(open(f"{out}.{r}")) for r in (0, 1)]
    assert got[0]["codes"] == got[1]["codes"] and got[0]["fit"]["pruned"] > 0
