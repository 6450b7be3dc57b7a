"""The minimal loop must memorise a toy batch, deterministically."""

import subprocess
import sys

from diyllm.training.overfit import overfit


def test_overfit_reaches_targets_within_300_steps_and_is_deterministic():
    a = overfit(steps=300, verbose=False)
    assert a.losses[-1] < 0.05
    assert a.accuracy == 1.0
    assert a.losses[0] > 3.0  # it really started from scratch
    b = overfit(steps=300, verbose=False)
    assert a.losses == b.losses


def test_overfit_cli_prints_progress_and_accuracy():
    out = subprocess.run([sys.executable, "-m", "diyllm", "overfit", "--steps", "200", "--log_every", "50"],
                         capture_output=True, text=True, check=True).stdout
    assert "step   50  loss" in out
    assert "next-token accuracy 100%" in out
