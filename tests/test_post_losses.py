"""Post-training losses against independent computations (closed forms, torch.nn.functional, float64)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from diyllm.training.post_losses import distill_kl, dpo_loss, grpo_loss, sequence_logps, token_logps
from diyllm.training.rewards import group_advantages

pytestmark = pytest.mark.usefixtures("one_thread")


def test_sequence_logps_sum_the_masked_token_log_probabilities():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7, dtype=torch.float64)
    targets = torch.randint(0, 7, (3, 5))
    targets[0, -1] = -100
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1]], dtype=torch.float64)
    per_token = -F.cross_entropy(logits.reshape(-1, 7), targets.reshape(-1), reduction="none", ignore_index=-100)
    want = (per_token.view(3, 5) * mask).sum(-1)
    torch.testing.assert_close(sequence_logps(logits, targets, mask), want.float())
    assert token_logps(logits, targets)[0, -1] == 0


def test_dpo_loss_is_the_closed_form_and_log2_when_policy_equals_reference():
    pc, pr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    rc, rr = torch.tensor([-3.5, -4.0]), torch.tensor([-3.0, -3.0])
    beta = 0.5
    loss, metrics = dpo_loss(pc, pr, rc, rr, beta=beta)
    margins = [beta * ((-3.0 + 3.5) - (-4.0 + 3.0)), beta * ((-5.0 + 4.0) - (-2.0 + 3.0))]  # 0.75, -1.0
    want = sum(math.log(1 + math.exp(-h)) for h in margins) / 2
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert metrics["margin"].item() == pytest.approx(sum(margins) / 2)
    assert metrics["pref_acc"].item() == 0.5
    same, m0 = dpo_loss(pc, pr, pc, pr, beta=0.1)
    assert same.item() == pytest.approx(math.log(2), rel=1e-6) and m0["margin"] == 0
    eps = 0.2
    smooth, _ = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    want_s = sum((1 - eps) * math.log(1 + math.exp(-h)) + eps * math.log(1 + math.exp(h)) for h in margins) / 2
    assert smooth.item() == pytest.approx(want_s, rel=1e-6)


def test_distill_kl_equals_an_independent_kl_times_t_squared():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 11, dtype=torch.float64), torch.randn(2, 3, 11, dtype=torch.float64) * 2
    T = 2.0
    p = torch.softmax(t / T, -1)
    q = torch.softmax(s / T, -1)
    want = (p * (p.log() - q.log())).sum(-1) * T * T
    torch.testing.assert_close(distill_kl(s, t, T), want.float())
    torch.testing.assert_close(  # and torch's own KL (input = student log-probs, target = teacher probs)
        distill_kl(s, t, T).sum(), (F.kl_div(torch.log_softmax(s / T, -1), p, reduction="sum") * T * T).float())
    assert distill_kl(t, t, 3.0).abs().max() < 1e-6


def test_group_advantages_are_normalised_within_each_group():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 3.0]])
    a = group_advantages(r, eps=0.0 + 1e-12)
    torch.testing.assert_close(a[0], torch.tensor([1.0, -1.0, -1.0, 1.0]))
    assert a[1].abs().max() < 1e-6  # equal rewards teach nothing
    std = math.sqrt((3 * 0.75**2 + 2.25**2) / 4)
    torch.testing.assert_close(a[2], torch.tensor([-0.75, -0.75, -0.75, 2.25]) / std)


def test_grpo_loss_matches_the_written_out_clipped_objective_with_k3_kl():
    torch.manual_seed(0)
    logps = torch.randn(3, 4, dtype=torch.float64) * 0.3 - 1
    old = logps + torch.randn(3, 4, dtype=torch.float64) * 0.3
    ref = logps + torch.randn(3, 4, dtype=torch.float64) * 0.3
    adv = torch.tensor([1.0, -0.5, 2.0])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 1, 0]], dtype=torch.float64)
    eps, beta = 0.2, 0.05
    total, n = 0.0, 0
    for i in range(3):
        for j in range(4):
            if not mask[i, j]:
                continue
            rho = math.exp(logps[i, j] - old[i, j])
            pg = -min(rho * adv[i].item(), min(max(rho, 1 - eps), 1 + eps) * adv[i].item())
            d = ref[i, j].item() - logps[i, j].item()
            total += pg + beta * (math.exp(d) - d - 1)
            n += 1
    loss, metrics = grpo_loss(logps, old, adv, mask, clip_eps=eps, ref_logps=ref, kl_coef=beta)
    assert loss.item() == pytest.approx(total / n, rel=1e-9)
    assert metrics["kl"].item() > 0
    # on-policy (old = current): the gradient is the plain policy gradient −A·∇logp averaged over tokens
    lp = logps.clone().requires_grad_()
    grpo_loss(lp, lp.detach(), adv, mask)[0].backward()
    torch.testing.assert_close(lp.grad, -(adv[:, None].double() * mask) / mask.sum())


def _tiny_policy():
    from diyllm.model import DIYConfig, DIYForCausalLM

    torch.manual_seed(0)
    return DIYForCausalLM(DIYConfig(vocab_size=31, context_length=12, d_model=32, num_layers=1, num_heads=2))


@pytest.mark.parametrize("lora", [False, True])
def test_dpo_objective_starts_at_log2_and_sends_gradients_only_into_the_policy(lora):
    import copy

    from diyllm.data.preference import PairBatch
    from diyllm.model.lora import apply_lora
    from diyllm.training.finetune import Reference
    from diyllm.training.post_objectives import DPOObjective

    policy = _tiny_policy()
    if lora:
        apply_lora(policy, rank=2)
        ref = Reference(policy, None)  # adapters disabled = the base
    else:
        ref = Reference(policy, copy.deepcopy(policy))
    x = torch.randint(0, 31, (4, 12))
    y = torch.roll(x, -1, 1)
    mask = torch.zeros(4, 12)
    mask[:, 6:] = 1
    out = DPOObjective(ref, beta=0.5)(policy, PairBatch(x, y, mask))
    loss = out.loss
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    loss.backward()
    grads = {n for n, p in policy.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and (not lora or all(".lora_" in n for n in grads))
    if not lora:
        assert all(p.grad is None for p in ref.copy.parameters())
        assert not any(p.requires_grad for p in ref.copy.parameters())


def test_distill_objective_mixes_kl_and_hard_loss():
    from diyllm.training.loss import cross_entropy
    from diyllm.training.post_objectives import DistillObjective

    student, teacher = _tiny_policy(), _tiny_policy()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randint(0, 31, (3, 12))
    y = torch.roll(x, -1, 1)
    y[:, -1] = -100
    out = DistillObjective(teacher, alpha=0.3, temperature=2.0)(student, (x, y, None))
    loss, metrics = out.loss, out.metrics
    s, t = student(x).logits[:, :-1], teacher(x).logits[:, :-1]
    p = torch.softmax(t / 2, -1)
    kl = (p * (p.log() - torch.log_softmax(s / 2, -1))).sum(-1).mean() * 4
    ce = cross_entropy(student(x).logits, y)
    assert loss.item() == pytest.approx((0.3 * kl + 0.7 * ce).item(), rel=1e-5)
    assert metrics["kl"].item() == pytest.approx(kl.item(), rel=1e-5)
