"""The learning-rate schedule: linear warmup, then a cosine down to ``min_lr_ratio`` of the peak (OLMo2 / OLMoE:
OLMo's ``cosine_with_warmup``, whose warmup starts at ``warmup_min_lr``)."""

from __future__ import annotations

import math


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float,
                  warmup_start_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate at ``step`` (0 = the first optimizer step): linear warmup from
    ``warmup_start_ratio`` reaching 1 at step ``warmup_steps - 1``, then cosine down to ``min_lr_ratio``."""
    if step < warmup_steps:
        return warmup_start_ratio + (1.0 - warmup_start_ratio) * ((step + 1) / warmup_steps)
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
