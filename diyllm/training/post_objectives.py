"""The objectives of post-training: each turns (model, batch) into (loss, logged metrics).

The training loop is the same for all of them (diyllm/training/trainer.py); only the batch source and
the objective differ:

    objective             batch (from the source)                      loss
    DPOObjective          PairBatch (diyllm.data.preference)           dpo_loss of sequence log-probs
    DistillObjective      (x, y, mask) text batches                    α·T²·KL(teacher‖student) + (1−α)·CE
    GRPOObjective         RolloutBatch (diyllm.training.rollouts)      clipped policy gradient (+ KL)

Metrics are detached scalar tensors; the loop averages them over micro-steps and logs them.
`prepare` moves the frozen reference / teacher to the training device.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from diyllm.training.finetune import Reference
from diyllm.training.loss import cross_entropy
from diyllm.training.objective import Objective, ObjectiveOutput
from diyllm.training.post_losses import distill_kl, dpo_loss, grpo_loss, masked_mean, sequence_logps, token_logps

Metrics = dict[str, torch.Tensor]


class DPOObjective(Objective):
    """−log σ(β·margin) over preference pairs; the reference is the frozen starting model."""

    name = "dpo"

    def __init__(self, reference: Reference, beta: float = 0.1, label_smoothing: float = 0.0):
        self.reference, self.beta, self.label_smoothing = reference, float(beta), float(label_smoothing)

    def prepare(self, model: nn.Module, device: torch.device) -> None:
        self.reference.to(device)

    def __call__(self, model: nn.Module, batch: Any) -> ObjectiveOutput:
        B = batch.x.shape[0] // 2
        logps = sequence_logps(model(batch.x).logits, batch.y, batch.mask)
        ref = sequence_logps(self.reference.logits(batch.x), batch.y, batch.mask)
        loss, metrics = dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], self.beta, self.label_smoothing)
        return ObjectiveOutput(loss, metrics)


class DistillObjective(Objective):
    """Soft targets from a frozen teacher mixed with the hard next-token loss."""

    name = "distill"

    def __init__(self, teacher: nn.Module, alpha: float = 0.5, temperature: float = 2.0):
        self.teacher = teacher.eval().requires_grad_(False)
        self.alpha, self.temperature = float(alpha), float(temperature)

    def prepare(self, model: nn.Module, device: torch.device) -> None:
        self.teacher.to(device)

    def __call__(self, model: nn.Module, batch: Any) -> ObjectiveOutput:
        x, y, mask = batch
        logits = model(x).logits
        ce = cross_entropy(logits, y, loss_mask=mask)
        with torch.no_grad():
            teacher_logits = self.teacher(x).logits
        counted = (y != -100) if mask is None else (y != -100) & (mask != 0)
        kl = masked_mean(distill_kl(logits, teacher_logits, self.temperature), counted)
        loss = self.alpha * kl + (1.0 - self.alpha) * ce
        return ObjectiveOutput(loss, {"kl": kl.detach(), "ce": ce.detach()})

    def eval_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The student's own next-token loss, so val_loss compares with runs trained without a teacher."""
        x, y, mask = batch
        return cross_entropy(model(x).logits, y, loss_mask=mask)


class GRPOObjective(Objective):
    """Token-level clipped policy gradient on rollouts, with an optional KL penalty to the reference."""

    name = "grpo"

    def __init__(self, reference: Reference | None, clip_eps: float = 0.2, kl_coef: float = 0.0):
        self.reference, self.clip_eps, self.kl_coef = reference, float(clip_eps), float(kl_coef)

    def prepare(self, model: nn.Module, device: torch.device) -> None:
        if self.reference is not None:
            self.reference.to(device)

    def __call__(self, model: nn.Module, batch: Any) -> ObjectiveOutput:
        logps = token_logps(model(batch.x).logits, batch.y)
        ref = token_logps(self.reference.logits(batch.x), batch.y) if self.reference is not None else None
        # One optimizer step per rollout batch: the sampling policy is the current one (ratio = 1).
        loss, metrics = grpo_loss(logps, logps.detach(), batch.advantages, batch.mask, self.clip_eps, ref,
                                  self.kl_coef)
        metrics["reward"] = batch.rewards.float().mean()
        metrics["length"] = batch.lengths.float().mean()
        return ObjectiveOutput(loss, metrics)

    def eval_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """1 − mean reward of the batch's completions (held-out prompts are decoded greedily: val_loss =
        1 − pass@1), so lower is better as for every other run and best.pt keeps the best policy."""
        return 1.0 - batch.rewards.float().mean()
