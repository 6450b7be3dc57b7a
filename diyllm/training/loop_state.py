"""LoopState: the training loop's counters, in one place, and the one thing about the loop that is saved.

Everything else a checkpoint holds belongs to a component that saves itself (model, optimizer, scaler,
data source, health monitor, objective, RNGs; see diyllm.training.resume). The file layout is the one
checkpoints have always had: `iteration` and `best_val_loss` at the top level, the rest under "trainer".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LoopState:
    iteration: int = 0  # optimizer steps taken (skipped non-finite steps count: the schedule moved on)
    tokens_seen: int = 0  # training tokens consumed, over all processes
    best_val_loss: float = math.inf
    evals_since_best: int = 0  # evaluations in a row without a new best (early stopping's patience)
    last_eval_iter: int = -1  # the iteration last evaluated (so a resumed run does not evaluate it again)
    last_eval: dict[str, Any] = field(default_factory=dict)  # that evaluation's metrics
    elapsed_before: float = 0.0  # training seconds spent before this process started (resumed runs)

    def to_entries(self, elapsed: float) -> dict[str, Any]:
        """The checkpoint entries besides "iteration" (which the checkpointer writes); `elapsed` is the
        run's total training time so far."""
        return {
            "best_val_loss": self.best_val_loss,
            "trainer": {"tokens_seen": self.tokens_seen, "evals_since_best": self.evals_since_best,
                        "last_eval_iter": self.last_eval_iter, "elapsed": elapsed, "last_eval": self.last_eval},
        }

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any]) -> LoopState:
        """Read back `to_entries`; files from older versions lack some entries and get the defaults."""
        t = ckpt.get("trainer") or {}
        return cls(
            iteration=int(ckpt["iteration"]),
            tokens_seen=int(t.get("tokens_seen", 0)),
            best_val_loss=float(ckpt.get("best_val_loss", math.inf)),
            evals_since_best=int(t.get("evals_since_best", 0)),
            last_eval_iter=int(t.get("last_eval_iter", -1)),
            last_eval=dict(t.get("last_eval", {})),
            elapsed_before=float(t.get("elapsed", 0.0)),
        )
