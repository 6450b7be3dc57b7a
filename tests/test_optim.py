"""AdamW, gradient clipping and the LR schedule against references."""

import copy
import math

import pytest
import torch

from diyllm.training.optim import AdamW, clip_grad_norm_
from diyllm.training.schedule import cosine_lr


def _make_params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in [(5, 3), (7,), (2, 2, 2)]]


@pytest.mark.parametrize("foreach", [True, False])
def test_adamw_trajectory_matches_torch_over_100_steps(foreach):
    ours, ref = _make_params(0), _make_params(0)
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt = AdamW(ours, foreach=foreach, **kw)
    ref_opt = torch.optim.AdamW(ref, **kw)
    g = torch.Generator().manual_seed(1)
    for step in range(100):
        for group in (ours, ref):
            for p in group:
                p.grad = None
        for a, b in zip(ours, ref):
            grad = torch.randn(a.shape, generator=g)
            a.grad, b.grad = grad.clone(), grad.clone()
        if step % 10 == 5:  # vary the LR like a schedule does
            for o in (opt, ref_opt):
                o.param_groups[0]["lr"] = 1e-2 * (1 - step / 100)
        opt.step()
        ref_opt.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_adamw_state_dict_round_trip_continues_identically():
    params = _make_params(3)
    opt = AdamW(params, lr=1e-3)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    clone = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = AdamW(clone, lr=1e-3)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as if saved to disk and read back
    for a, b in zip(params, clone):
        a.grad = torch.full_like(a, 0.5)
        b.grad = torch.full_like(b, 0.5)
    opt.step()
    opt2.step()
    for a, b in zip(params, clone):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_adamw_skips_params_without_grad_and_rejects_bad_hyperparameters():
    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    AdamW([p, q], lr=0.1).step()
    assert torch.equal(q, torch.ones(3)) and not torch.equal(p, torch.ones(3))
    with pytest.raises(ValueError, match="learning rate"):
        AdamW([p], lr=-1)
    with pytest.raises(ValueError, match="betas"):
        AdamW([p], betas=(1.0, 0.9))


@pytest.mark.parametrize("max_norm", [0.01, 1.0, 1e6])
def test_clip_grad_norm_matches_torch(max_norm):
    ours, ref = _make_params(4), _make_params(4)
    for a, b in zip(ours, ref):
        a.grad = torch.randn_like(a) * 3
        b.grad = a.grad.clone()
    norm = clip_grad_norm_(ours, max_norm)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm)
    torch.testing.assert_close(norm, ref_norm)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad)
    clipped = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in ours))
    assert clipped <= max_norm * (1 + 1e-5) or clipped == pytest.approx(norm.item(), rel=1e-5)


def test_cosine_schedule_shape():
    kw = dict(max_lr=1.0, min_lr=0.1, warmup_iters=10, cosine_cycle_iters=110)
    assert cosine_lr(0, **kw) == 0.0
    assert cosine_lr(5, **kw) == pytest.approx(0.5)  # linear warmup: it/Tw * max
    assert cosine_lr(10, **kw) == pytest.approx(1.0)
    assert cosine_lr(60, **kw) == pytest.approx(0.55)  # halfway: (max+min)/2
    assert cosine_lr(110, **kw) == pytest.approx(0.1)
    assert cosine_lr(500, **kw) == 0.1
    lrs = [cosine_lr(i, **kw) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone decay after warmup
