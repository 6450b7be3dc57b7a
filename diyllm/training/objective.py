"""Objectives: what the training loop minimises. The seam where pretraining, SFT, DPO, RL and distillation
differ, so that there is only one loop.

An objective turns (model, batch) into a loss and a few metrics to log:

    out = objective(model, batch)      # ObjectiveOutput(loss=<scalar tensor>, metrics={"name": <tensor>})
    out.loss.backward()

`batch` is whatever the batch source returned: the loop never looks inside it, so a DPO source may hand
out (chosen, rejected) pairs and an RL source rollouts with advantages, as long as its objective reads
them. Next-token cross-entropy (with the source's loss mask: SFT trains on the assistant's replies only)
is today's objective, `NextTokenLoss`.

An objective may hold models of its own, e.g. a frozen reference (DPO) or teacher (distillation):
`prepare(model, device)` is called once, after the trained model is on its device and before the loop,
and is where such a model moves to the device. `state_dict()` / `load_state_dict()` carry anything that
must survive a resume (an adaptive KL coefficient, a running baseline); an empty state (the default) is
not written into the checkpoint at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class ObjectiveOutput:
    """loss: the scalar to minimise (the mean over this micro-batch; the loop divides by the number of
    micro-steps). metrics: extra scalars to log with each train record, as tensors (the loop averages
    them over micro-steps and reads them in its one host sync per step), e.g. {"reward": r.mean()}."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class Objective:
    """Base class of the objectives; subclasses implement `__call__` (and optionally the hooks)."""

    def prepare(self, model: nn.Module, device: torch.device) -> None:
        """Called once before training starts: move reference/teacher models to `device` here."""

    def __call__(self, model: nn.Module, batch: Any) -> ObjectiveOutput:
        raise NotImplementedError

    def eval_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The loss `evaluate()` averages for train/val loss (called under no_grad, model in eval mode)."""
        return self(model, batch).loss

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class NextTokenLoss(Objective):
    """Mean cross-entropy of each next token, over the targets the batch's loss mask keeps.

    batch = (x, y, loss_mask) as every `BatchSource` of diyllm.training.data_source returns it: x, y (B, T)
    token ids (y = x shifted by one, -100 where there is no target), loss_mask (B, T) or None.
    """

    def __call__(self, model: nn.Module, batch: Any) -> ObjectiveOutput:
        x, y, mask = batch
        return ObjectiveOutput(model(x, targets=y, loss_mask=mask).loss)
