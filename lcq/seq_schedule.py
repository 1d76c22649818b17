"""Progressive training context (openai/parameter-golf PR #2014): short segments early in training, longer ones later.

TRAIN_SEQ_SCHEDULE="1024@0,2048@0.1,3072@0.7" trains on segments of at most 1024 tokens from the start, 2048 from 10%
of training progress and 3072 from 70%. Progress is the measure the LR warmdown and the depth-recurrence switch use
(lcq.optim.training_progress: the larger of step/ITERATIONS and elapsed/train budget). Each stage names the progress
where it starts, as RECUR_FROM_PROGRESS does; #2014 writes the progress where a stage ends (its
`1024@0.100,2048@0.700,3072@1.000` is `1024@0,2048@0.1,3072@0.7` here).

Tokens per optimizer step stay TRAIN_BATCH_TOKENS at every stage, as in #2014: a rank's batch is one packed row of the
same length at every stage and only the cuts move. A segment starts at every BOS and every L tokens
(lcq.data.segment_bounds), so at L = 1024 a row holds three times the segments it holds at 3072, and no document sees
another at any length. That is also why the lengths need be multiples of nothing: the row never changes shape.

The last stage's length is TRAIN_SEQ_LEN, the length the model finishes at and the one everything after training uses
(GPTQ calibration, LCQ, the eval window when EVAL_SEQ_LEN=0). Rotary angles are computed from positions on the fly
(lcq.model.Rotary), so no table bounds a length.
"""
from __future__ import annotations

# torch.compile (CUDA) keeps at most torch._dynamo.config.recompile_limit (8) graphs per function before it falls back
# to eager, silently slower. In the worst case a backend specialises on max_seqlen and needs one graph per (length,
# layer order) pair: 4 stages x 2 orders (depth recurrence off and on) fit.
MAX_STAGES = 4


def parse_seq_schedule(text: str, final_len: int) -> tuple[tuple[int, float], ...]:
    """'1024@0,2048@0.3' -> ((1024, 0.0), (2048, 0.3)); '' -> () (off). ValueError saying what is wrong and the fix."""
    if not text.strip():
        return ()
    plan, example = [], f"e.g. {max(2, final_len // 2)}@0,{final_len}@0.3"
    for raw in text.split(","):
        length, at, start = raw.strip().partition("@")
        if not at:
            raise ValueError(f"stage {raw.strip()!r} has no @PROGRESS ({example})")
        try:
            plan.append((int(length), float(start)))
        except ValueError:
            raise ValueError(f"stage {raw.strip()!r} is not LENGTH@PROGRESS ({example})") from None
    lengths, starts = [n for n, _ in plan], [p for _, p in plan]
    if starts[0] != 0:
        raise ValueError(f"the first stage must start at progress 0 (got {starts[0]:g}): write {lengths[0]}@0")
    if any(not b > a for a, b in zip(starts, starts[1:])) or starts[-1] >= 1:
        raise ValueError("stage starts must increase strictly and stay below 1 (a stage from progress 1 never runs)")
    if lengths[0] < 2 or any(not b > a for a, b in zip(lengths, lengths[1:])):
        raise ValueError("lengths must be >= 2 and increase strictly from stage to stage (the context grows)")
    if lengths[-1] != final_len:
        raise ValueError(f"the last stage's length {lengths[-1]} must equal TRAIN_SEQ_LEN={final_len}")
    if len(plan) > MAX_STAGES:
        raise ValueError(f"{len(plan)} stages; at most {MAX_STAGES} (torch.compile's recompile limit)")
    return tuple(plan)


def stage_at(plan: tuple[tuple[int, float], ...], progress: float) -> int:
    """Index of the stage that runs at this progress: the last one whose start is <= progress."""
    return max(i for i, (_, start) in enumerate(plan) if start <= progress)


class SeqSchedule:
    """The segment length of each training step. Off (TRAIN_SEQ_SCHEDULE empty) it is one stage at TRAIN_SEQ_LEN.

    Each rank computes the stage its own progress asks for (due); the train loop agrees on it across ranks with a MAX
    in the all-reduce every step already makes, so every rank changes length on the same step (lcq/train.py)."""

    def __init__(self, text: str, final_len: int):
        self.plan = parse_seq_schedule(text, final_len) or ((final_len, 0.0),)
        self.stage = 0

    @property
    def staged(self) -> bool:
        return len(self.plan) > 1

    @property
    def length(self) -> int:
        return self.plan[self.stage][0]

    @property
    def lengths(self) -> list[int]:
        return [n for n, _ in self.plan]

    def due(self, progress: float) -> int:
        return stage_at(self.plan, progress)

    def advance(self, agreed: int) -> bool:
        """Move to the agreed stage (never back); True when the length changed."""
        if agreed <= self.stage:
            return False
        self.stage = min(agreed, len(self.plan) - 1)
        return True

    def describe(self) -> str:
        return ",".join(f"{n}@{start:g}" for n, start in self.plan)
