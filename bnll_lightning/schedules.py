"""Learning-rate schedules as pure functions of the optimizer step (nanoGPT style)."""

from __future__ import annotations

import math


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warm-up from 1/(warmup+1) to 1, then cosine decay to ``min_ratio`` at ``total_steps``.

    Warm-up starts above zero so the very first optimizer step already moves the weights. Kept instead
    of transformers' ``get_cosine_with_min_lr_schedule_with_warmup``, whose warm-up starts at 0: its
    first optimizer step does nothing, which short runs (and the one-step exactness tests) would feel.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_warmup(warmup: float, total_steps: int) -> int:
    """``warmup`` < 1 is a fraction of the total optimizer steps, >= 1 a number of steps."""
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    return int(round(warmup * total_steps)) if warmup < 1 else int(warmup)
