"""Cross-entropy from logits, written out: the training objective of a language model.

loss_t = logsumexp(logits_t) - logits_t[target_t], averaged over the tokens that count. A token does
not count when its target equals `ignore_index` or when `loss_mask` is 0 there (SFT trains only on the
assistant's replies; padding never counts).
"""

from __future__ import annotations

import torch


def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    loss_mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """logits (..., V), targets (...). Stable for logits of ±1e4: the max is subtracted before exp.

    reduction="mean" averages over counted tokens; a batch with none returns 0 (with zero gradient),
    never NaN. reduction="sum" returns the summed loss (for averaging across micro-batches yourself);
    reduction="none" returns the per-token losses with uncounted tokens set to 0.
    """
    # At least float32: the log-sum-exp of bf16 logits is too coarse for a loss (float64 stays float64).
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    valid = targets != ignore_index
    if loss_mask is not None:
        valid = valid & (loss_mask != 0)
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    m = logits.amax(dim=-1, keepdim=True)
    log_z = m.squeeze(-1) + torch.log(torch.exp(logits - m).sum(dim=-1))
    target_logit = logits.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    per_token = (log_z - target_logit) * valid
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    return per_token.sum() / valid.sum().clamp(min=1)
