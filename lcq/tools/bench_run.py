"""A trained run for a bench: the pipeline's start-up checks and training under a bench's own run id, shared by the
benches that then measure what comes after (lcq/tools/bench.py, lcq/tools/bench_ttt.py)."""
from __future__ import annotations

import time

from .. import dist as D
from ..config import RECORD_FEATURES, Config, replace
from ..pipeline import Run, build, open_run, run_training


def trained_run(cfg: Config, dinfo: D.DistInfo, tag: str) -> Run:
    cfg = replace(cfg, run_id=f"bench_{tag}_{time.strftime('%Y%m%d_%H%M%S')}", submission_json="")
    run = open_run(cfg, dinfo)
    build(run)
    run_training(run)
    return run


def scaled_features(cfg: Config) -> dict[str, dict]:
    """RECORD_FEATURES (written for 11 layers) mapped onto cfg's depth and width: XSA on every layer, the looped span
    and the lane start at the same relative depth (3-5 and 8 of 11), the gate window capped at MODEL_DIM. A feature
    whose layer constraints cannot hold at this depth (lanes need a decoder layer after the loop) is left out."""
    n = cfg.num_layers
    out = {k: dict(v) for k, v in RECORD_FEATURES.items()}
    out["xsa"]["xsa_last_n"] = n
    start = min(n - 1, round(3 * n / 11))
    end = min(n - 1, max(start, round(5 * n / 11)))
    out["recurrence"].update(recur_start_layer=start, recur_end_layer=end)
    lane = max(round(8 * n / 11), n // 2 if cfg.unet_skips else 1, end + 1)
    if lane < n:
        out["parallel_lanes"]["parallel_start_layer"] = lane
    else:
        del out["parallel_lanes"]
    out["sparse_attn_gate"]["attn_gate_window"] = min(12, cfg.model_dim)
    return out
