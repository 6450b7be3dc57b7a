"""The learning-rate schedule: linear warmup, cosine decay, then a floor.

Warmup avoids huge early updates while Adam's second-moment estimate is still noisy; the cosine lets
the run settle into a minimum; min_lr keeps it learning a little afterwards.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from diyllm.training.config import TrainConfig


def cosine_lr(it: int, max_lr: float, min_lr: float, warmup_iters: int, cosine_cycle_iters: int) -> float:
    """lr at iteration `it`: it/Tw·max for it < Tw; cosine from max to min between Tw and Tc; min after Tc."""
    if it < warmup_iters:
        return max_lr * it / warmup_iters
    if it > cosine_cycle_iters:
        return min_lr
    if cosine_cycle_iters == warmup_iters:
        return max_lr
    progress = (it - warmup_iters) / (cosine_cycle_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate for optimizer step number `step + 1` (so the first step's lr is not 0 and the last
    step of the decay reaches min_lr). Warmup applies with or without decay."""
    it = step + 1
    if not cfg.decay_lr:
        return cfg.learning_rate * min(1.0, it / cfg.warmup_iters) if cfg.warmup_iters else cfg.learning_rate
    return cosine_lr(it, cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, cfg.effective_lr_decay_iters)
