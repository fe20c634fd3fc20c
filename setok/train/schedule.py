"""The learning-rate schedules of `setok train` and `setok finetune`: pure functions of the step,
so a resumed run continues on exactly the rates it would have had."""

from __future__ import annotations

import math

LR_FLOOR = 0.1  # every cosine ends at this fraction of its peak: the language tasks need the low-rate tail


def lr_scale(step: int, total: int) -> float:
    """Linear warm-up then cosine decay to 10%: a pure function of the step, so resume is exact."""
    warmup = min(50, max(1, total // 10))
    if step < warmup:
        return (step + 1) / warmup
    return cosine_decay((step - warmup) / max(1, total - warmup))


def cosine_decay(progress: float) -> float:
    """1 at progress 0, LR_FLOOR at 1 (and after), half a cosine between."""
    return LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
