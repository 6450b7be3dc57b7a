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


@pytest.mark.parametrize("path", ["fused", "foreach", "loop"])
def test_adamw_trajectory_matches_torch_over_100_steps(path):
    ours, ref = _make_params(0), _make_params(0)
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt = AdamW(ours, foreach=path == "foreach", fused=path == "fused", **kw)
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


def test_fused_kernel_stays_within_rounding_of_the_written_out_step_at_model_shapes(monkeypatch):
    """The fused kernel vs the `_foreach_*` arithmetic on bench_train.py's small model (decay and no-decay
    groups), 50 steps: float32 rounding, not drift. Without the kernel the foreach path runs, bit for bit."""
    from diyllm.model import DIYConfig, DIYForCausalLM
    from diyllm.training.trainer import optimizer_groups

    torch.manual_seed(0)
    cfg = DIYConfig(vocab_size=65, context_length=64, d_model=128, num_layers=4, num_heads=4, d_ff=344)
    models = [DIYForCausalLM(cfg) for _ in range(3)]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    opts = [AdamW(optimizer_groups(m, 0.1), lr=3e-3, betas=(0.9, 0.99), fused=f)
            for m, f in zip(models, (True, False, True))]
    x = torch.randint(0, 65, (4, 64))
    kernel, calls = torch._fused_adamw_, [0, 0, 0]
    for _ in range(50):
        for i, (m, o) in enumerate(zip(models, opts)):
            def counted(*args, i=i, **kwargs):
                calls[i] += 1
                return kernel(*args, **kwargs)

            monkeypatch.setattr(torch, "_fused_adamw_", counted)
            if i == 2:  # the third: a torch without the kernel
                monkeypatch.delattr(torch, "_fused_adamw_")
            m(x, targets=torch.roll(x, -1, 1)).loss.backward()
            o.step()
            o.zero_grad(set_to_none=True)
            monkeypatch.undo()
    fused, foreach, fallback = (dict(m.named_parameters()) for m in models)
    for name, p in fused.items():
        torch.testing.assert_close(p, foreach[name], rtol=1e-4, atol=1e-5, msg=name)
        assert torch.equal(fallback[name], foreach[name]), name
    assert set(opts[0].state_dict()["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}  # the same state
    assert opts[0].state_dict()["state"][0]["step"] == 50
    assert calls[0] == 50 * 2 and calls[1] == calls[2] == 0  # one kernel call per group per step, model 0 only


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


def test_per_tensor_norms_fallback_gives_the_same_norms(monkeypatch):
    from diyllm.training import optim

    tensors = [torch.randn(300, 40), torch.randn(17).bfloat16(), torch.randn(5, 5, dtype=torch.float64)]
    fused = optim.per_tensor_norms(tensors)
    monkeypatch.delattr(torch, "_foreach_norm")  # a torch without it
    plain = optim.per_tensor_norms(tensors)
    for f, p, t in zip(fused, plain, tensors):
        assert f.dtype == p.dtype == torch.float32
        torch.testing.assert_close(f, p)
        torch.testing.assert_close(f, torch.linalg.vector_norm(t.double()).float(), rtol=1e-2, atol=0)


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
