"""The minimal loop must memorise a toy batch, deterministically, in each of its three batch modes."""

import subprocess
import sys

import pytest
import torch

from diyllm.training.overfit import IGNORE_INDEX, make_batch, overfit


def test_overfit_reaches_targets_within_300_steps_and_is_deterministic():
    a = overfit(steps=300, verbose=False)
    assert a.losses[-1] < 0.05
    assert a.accuracy == 1.0
    assert a.losses[0] > 3.0  # it really started from scratch
    b = overfit(steps=300, verbose=False)
    assert a.losses == b.losses
    assert a.shapes == {"input_ids": (4, 19), "labels": (4, 19), "logits": (4, 19, 64)}


@pytest.mark.parametrize("mode", ["different", "padded"])
def test_method_b_and_padded_batches_are_memorised(mode):
    result = overfit(steps=300, mode=mode, verbose=False)
    assert result.accuracy == 1.0
    assert result.losses[-1] < 0.05


def test_batches_follow_their_definition():
    ids, labels = make_batch("different", 4, 20, 64, seed=3)
    assert torch.equal(ids[:, 1:], labels[:, :-1])  # labels are the inputs shifted left by one
    assert len(set(ids[:, 0].tolist())) == 4  # rows are told apart by their first token
    ids, labels = make_batch("padded", 4, 20, 64, seed=3)
    ignored = labels == IGNORE_INDEX
    assert ignored.sum(dim=1).tolist() == [0, 3, 6, 9]  # row i loses 3*i tokens to padding
    assert (ids[ignored] == 0).all() and (ids[~ignored] != 0).all()  # id 0 is padding only


def test_overfit_cli_prints_shapes_progress_accuracy_reproducibility_and_writes_png(tmp_path):
    png = tmp_path / "loss.png"
    out = subprocess.run([sys.executable, "-m", "diyllm", "overfit", "--steps", "200", "--log_every", "50",
                          "--plot", str(png)], capture_output=True, text=True, check=True).stdout
    assert "shapes: input_ids (4, 19)  labels (4, 19)  logits (4, 19, 64)" in out
    assert "step   50  loss" in out
    assert "next-token accuracy 100%" in out
    assert "same seed -> identical losses: yes" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
