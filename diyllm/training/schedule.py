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


# --- issue 13: resuming with another max_iters re-stretches the schedule; say so ---
def check_resume_schedule(cfg: TrainConfig, ckpt: dict, where: object, warn) -> None:
    """Refuse a max_iters below the checkpoint's iteration; warn (saying what the schedule now does) when
    max_iters changed since the checkpoint was written."""
    import dataclasses

    from diyllm.errors import UserError

    step = int(ckpt.get("iteration", 0))
    if step > cfg.max_iters:
        raise UserError(f"{where} is at iteration {step}, beyond max_iters={cfg.max_iters}: nothing to train; "
                        f"pass --max_iters above {step} to continue the run")
    saved = ckpt.get("train_config")
    if not isinstance(saved, dict) or saved.get("max_iters") in (None, cfg.max_iters):
        return
    try:
        old = dataclasses.replace(cfg, max_iters=int(saved["max_iters"]),
                                  lr_decay_iters=int(saved.get("lr_decay_iters", cfg.lr_decay_iters)))
    except (TypeError, ValueError):
        return
    if old.effective_lr_decay_iters == cfg.effective_lr_decay_iters or not cfg.decay_lr:
        warn(f"max_iters changed from {old.max_iters} to {cfg.max_iters} on resume; the LR schedule is unchanged "
             f"(it decays until iteration {cfg.effective_lr_decay_iters})")
        return
    warn(f"max_iters changed from {old.max_iters} to {cfg.max_iters} on resume: the cosine LR schedule now decays "
         f"to min_lr at iteration {cfg.effective_lr_decay_iters} (was {old.effective_lr_decay_iters}); lr at "
         f"iteration {step} is now {lr_at(cfg, step):.3g} (was {lr_at(old, step):.3g}). Set lr_decay_iters to "
         "keep the old schedule")
