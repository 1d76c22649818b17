"""Depth recurrence (openai/parameter-golf PR #1344, kept by #1855): a span of layers runs several times in a row.

The looped layers' weights are stored once, so the artifact does not grow; every pass reuses the same modules, which is
why GPTQ Hessians (forward hooks on the stored modules) and LoRA adapters (wrappers around them) are per stored layer
and see the inputs of every pass. Looping starts partway through training (#1344: at 35% of progress), when the
weights have settled enough for a repeated span to help rather than destabilise; from then on, and in every model
rebuilt from an artifact, the loop is on.
"""
from __future__ import annotations


def layer_sequence(num_layers: int, start: int, end: int, passes: int) -> list[int]:
    """Stored-layer index of each layer the forward pass runs: layers start..end (inclusive) `passes` times in a row.

    layer_sequence(11, 3, 5, 3) == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]."""
    if passes < 1 or not 0 <= start <= end < num_layers:
        raise ValueError(f"layer_sequence: need passes >= 1 and 0 <= start <= end < num_layers, got "
                         f"passes={passes} start={start} end={end} num_layers={num_layers}")
    span = list(range(start, end + 1))
    return list(range(start)) + span * passes + list(range(end + 1, num_layers))


def recurrence_due(progress: float, from_progress: float) -> bool:
    """Whether the loop runs at this point of training (progress in [0, 1], as the LR schedule measures it)."""
    return progress >= from_progress
