"""lcq entry point: config -> dist -> data -> train -> eval -> report.

    torchrun --standalone --nproc_per_node=8 train_gpt.py          # record preset (8xH100)
    python train_gpt.py --preset demo                              # CPU demo on the embedded corpus
Every config field is a knob: FIELD_NAME=value in the environment or --field_name=value.
"""
import sys
import time

from lcq import dist as D
from lcq.config import ConfigError, resolve
from lcq.pipeline import prepare_data, build, run_training, final_eval, finish


def main(argv: list[str]) -> int:
    t_launch = time.perf_counter()
    try:
        cfg, _ = resolve(argv)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    dinfo = D.init_dist()
    try:
        run = prepare_data(cfg, dinfo)
        build(run)
        run_training(run)
        final_eval(run, stage="pre_quant")
        return finish(run, t_launch)
    finally:
        D.shutdown()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
