"""The losses of post-training, as plain functions of logits and masks (the objectives call them).

* `sequence_logps`: log π(y|x) of each row = Σ over response tokens of log p(token) (the DPO quantity).
* `dpo_loss`: −log σ(β[(log πθ(y_w|x) − log πref(y_w|x)) − (log πθ(y_l|x) − log πref(y_l|x))]), with
  optional label smoothing ε (the preference label is wrong with probability ε:
  (1−ε)·(−log σ(βh)) + ε·(−log σ(−βh))).
* `distill_kl`: KL(teacher ‖ student) of the temperature-softened distributions, per token, times T²
  (so its gradient keeps the hard loss's scale when T changes, as in Hinton et al. 2015).
* `grpo_loss`: the token-level clipped policy-gradient loss with an optional KL penalty to a reference.

Written out with logsumexp/log_softmax so each formula reads as the paper writes it; the tests compare
them with independent computations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_logps(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """(B, T) log p(target_t) under `logits` (B, T, V), in float32; 0 where the target is ignored."""
    logits = logits.float()
    safe = torch.where(targets == ignore_index, torch.zeros_like(targets), targets)
    picked = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    out = picked - torch.logsumexp(logits, dim=-1)
    return out * (targets != ignore_index)


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) Σ_t mask_t · log p(target_t): the log-probability of each row's response tokens."""
    return (token_logps(logits, targets) * mask.float()).sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(mean loss, metrics) from (B,) sequence log-probabilities of the chosen/rejected responses.

    Implicit rewards r = β (log πθ − log πref); metrics: reward margin r_w − r_l, preference accuracy
    (fraction with r_w > r_l), chosen/rejected rewards and policy log-probabilities (all detached means).
    """
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    h = chosen_reward - rejected_reward
    losses = -(1.0 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    metrics = {
        "margin": h.detach().mean(),
        "pref_acc": (h.detach() > 0).float().mean(),
        "chosen_reward": chosen_reward.detach().mean(),
        "rejected_reward": rejected_reward.detach().mean(),
        "chosen_logp": policy_chosen.detach().mean(),
        "rejected_logp": policy_rejected.detach().mean(),
    }
    return losses.mean(), metrics


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
               ) -> torch.Tensor:
    """(B, T) T² · KL(p_teacher^T ‖ p_student^T) per position, p^T = softmax(logits / T)."""
    t = float(temperature)
    log_p_teacher = torch.log_softmax(teacher_logits.float() / t, dim=-1)
    log_p_student = torch.log_softmax(student_logits.float() / t, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
    return kl * (t * t)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where mask != 0; 0 (not NaN) when nothing counts."""
    mask = mask.float()
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              clip_eps: float = 0.2, ref_logps: torch.Tensor | None = None, kl_coef: float = 0.0
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-level clipped policy-gradient loss (GRPO / PPO-clip), averaged over all completion tokens.

    logps, old_logps, ref_logps, mask: (B, T) per-token log-probabilities of the sampled completion
    under the policy being trained, the policy that sampled it, and the reference; advantages: (B,).
    Per token: −min(ρ·A, clip(ρ, 1−ε, 1+ε)·A) with ρ = exp(logp − old_logp), plus kl_coef · k3, the
    unbiased non-negative KL estimator exp(ref − logp) − (ref − logp) − 1 (Schulman 2020).
    """
    ratio = torch.exp(logps - old_logps)
    adv = advantages.float()[:, None]
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv
    per_token = -torch.minimum(unclipped, clipped)
    metrics = {"clip_fraction": masked_mean(((ratio - 1.0).abs() > clip_eps).float(), mask).detach()}
    if ref_logps is not None:
        log_ratio_ref = ref_logps - logps
        kl = torch.exp(log_ratio_ref) - log_ratio_ref - 1.0
        metrics["kl"] = masked_mean(kl, mask).detach()
        if kl_coef:
            per_token = per_token + kl_coef * kl
    return masked_mean(per_token, mask), metrics
