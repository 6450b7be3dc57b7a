"""Training health checks: gradient spikes and non-finite steps.

A NaN or inf loss/gradient must never reach the weights: such a step is skipped (and counted), and a
run that produces nothing else for `max_nonfinite_steps` steps in a row stops with advice instead of
burning compute. A gradient norm far above its recent median is the usual early sign of a too-high
learning rate or bad data, so it is reported (not acted on).
"""

from __future__ import annotations

import math
import statistics
from collections import deque

from diyllm.errors import UserError


class NonFiniteError(UserError):
    """Too many consecutive steps with a NaN/inf loss or gradient."""


class HealthMonitor:
    def __init__(self, max_nonfinite_steps: int = 10, spike_factor: float = 10.0, window: int = 50,
                 fp16: bool = False):
        self.max_nonfinite_steps = max_nonfinite_steps
        self.spike_factor = spike_factor
        self.fp16 = fp16
        self.recent: deque[float] = deque(maxlen=window)
        self.consecutive_nonfinite = 0
        self.total_nonfinite = 0
        self.total_spikes = 0

    def check(self, step: int, loss: float, grad_norm: float) -> tuple[bool, str | None]:
        """(take_the_step, warning_or_None) for a step whose loss and gradient norm are known.

        In float16 a non-finite *gradient* with a finite loss is the GradScaler's normal overflow probe
        (it skips the step and lowers the scale itself), so only a non-finite loss counts there.
        """
        loss_bad = not math.isfinite(loss)
        grad_bad = not math.isfinite(grad_norm)
        if loss_bad or (grad_bad and not self.fp16):
            self.consecutive_nonfinite += 1
            self.total_nonfinite += 1
            if self.max_nonfinite_steps and self.consecutive_nonfinite >= self.max_nonfinite_steps:
                raise NonFiniteError(
                    f"stopping at iteration {step}: {self.consecutive_nonfinite} consecutive steps had a "
                    f"non-finite {'loss' if loss_bad else 'gradient'} ({self.total_nonfinite} skipped in total). "
                    "Likely causes: learning_rate too high (try 3-10x lower or a longer warmup_iters), "
                    "float16 overflow (use dtype=bfloat16 or float32), or bad data. The last good checkpoint "
                    "is untouched."
                )
            what = "loss" if loss_bad else "gradient norm"
            return False, f"iteration {step}: non-finite {what}; step skipped ({self.total_nonfinite} so far)"
        self.consecutive_nonfinite = 0
        if grad_bad:  # fp16 overflow probe: the scaler skips it
            return True, None
        warning = None
        if len(self.recent) >= 10:
            median = statistics.median(self.recent)
            if median > 0 and grad_norm > self.spike_factor * median:
                self.total_spikes += 1
                warning = (f"iteration {step}: gradient norm {grad_norm:.3g} is {grad_norm / median:.0f}x its "
                           f"recent median {median:.3g} (learning rate too high? a bad batch?)")
        self.recent.append(grad_norm)
        return True, warning

    def state_dict(self) -> dict:
        return {"recent": list(self.recent), "consecutive_nonfinite": self.consecutive_nonfinite,
                "total_nonfinite": self.total_nonfinite, "total_spikes": self.total_spikes}

    def load_state_dict(self, state: dict) -> None:
        self.recent.clear()
        self.recent.extend(float(v) for v in state.get("recent", []))
        self.consecutive_nonfinite = int(state.get("consecutive_nonfinite", 0))
        self.total_nonfinite = int(state.get("total_nonfinite", 0))
        self.total_spikes = int(state.get("total_spikes", 0))
