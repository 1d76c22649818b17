"""lcq entry point: config -> dist -> data -> train -> GPTQ -> LCQ -> artifact + gate -> eval of what ships -> report.

    torchrun --standalone --nproc_per_node=8 train_gpt.py          # record preset (8xH100)
    python train_gpt.py --preset demo                              # CPU demo on the embedded corpus
    python train_gpt.py --eval_only --artifact logs/RUN.lcq        # score an artifact from the files alone
Every config field is a knob: FIELD_NAME=value in the environment or --field_name=value.
"""
import sys
import time

from lcq import dist as D
from lcq.config import ConfigError, help_text, resolve
from lcq.shipping import recorded_run
from lcq.pipeline import (CONFIG_EXIT_CODE, GATE_EXIT_CODE, build, eval_only, evaluate_shipped, fail, finish,
                          install_signal_handlers, lcq, open_run, quantize, run_training, ship)


def main(argv: list[str]) -> int:
    t_launch = time.perf_counter()
    if {"-h", "--help"} & set(argv):
        print(help_text(__doc__))
        return 0
    try:
        cfg, _ = resolve(argv, recorded=recorded_run)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return CONFIG_EXIT_CODE
    if cfg.print_config:
        print(cfg.to_json())
        return 0
    install_signal_handlers()  # SIGTERM/SIGINT unwind: temp files removed, an `interrupted:` line in the log
    dinfo = D.init_dist()
    run, failed = None, False
    try:
        run = open_run(cfg, dinfo)  # every start-up check runs here, before anything trains
        if cfg.eval_only:
            return eval_only(run, t_launch)
        build(run)
        run_training(run)
        quantize(run)
        lcq(run)
        if not ship(run):
            return finish(run, t_launch, status=GATE_EXIT_CODE)
        evaluate_shipped(run)
        return finish(run, t_launch)
    except BaseException as e:  # logged (an `error:` line, the JSON summary with status and error), then the status
        failed = True
        return fail(run, e, t_launch)
    finally:
        D.shutdown(aligned=not failed)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
