"""A trained run for a bench: the pipeline's start-up checks and training under a bench's own run id, shared by the
benches that then measure what comes after (lcq/tools/bench.py, lcq/tools/bench_ttt.py)."""
from __future__ import annotations

import time

from .. import dist as D
from ..config import Config, replace
from ..pipeline import Run, build, open_run, run_training


def trained_run(cfg: Config, dinfo: D.DistInfo, tag: str) -> Run:
    cfg = replace(cfg, run_id=f"bench_{tag}_{time.strftime('%Y%m%d_%H%M%S')}", submission_json="")
    run = open_run(cfg, dinfo)
    build(run)
    run_training(run)
    return run
