"""Fast paths equal their plain formulas: RMSNorm's hand-written backward, SwiGLU's F.silu gate, the
fused cross-entropy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diyllm.model.fast_paths import RMSNormFunction, rms_norm_fast, use_fast_path
from diyllm.model.layers import RMSNorm, rms_normalize, silu
from diyllm.model.loss import fused_cross_entropy, plain_cross_entropy


def plain_rms_norm(x, weight, eps):
    return x * torch.rsqrt((x * x).mean(dim=-1, keepdim=True) + eps) * weight


def test_backward_matches_finite_differences_in_float64():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: RMSNormFunction.apply(a, b, 1e-5), (x, weight))
    assert torch.autograd.gradcheck(lambda a: RMSNormFunction.apply(a, None, 1e-6), (x,))  # qk_norm's form


@pytest.mark.parametrize("shape", [(16, 256, 384), (12, 64, 128)])  # bench_train.py's two shapes
def test_fast_equals_plain_at_training_shapes(shape):
    torch.manual_seed(0)
    x64 = torch.randn(*shape, dtype=torch.float64) * 3
    w64 = 1 + 0.1 * torch.randn(shape[-1], dtype=torch.float64)
    dy = torch.randn(*shape, dtype=torch.float64)

    def run(fn, dtype):
        x, w = (t.detach().to(dtype, copy=True).requires_grad_() for t in (x64, w64))
        y = fn(x, w, 1e-5)
        y.backward(dy.to(dtype))
        return [t.double() for t in (y.detach(), x.grad, w.grad)]

    exact = run(plain_rms_norm, torch.float64)
    plain, fast = run(plain_rms_norm, torch.float32), run(rms_norm_fast, torch.float32)
    for name, e, p, f in zip(("y", "dx", "dweight"), exact, plain, fast):
        scale = e.abs().max()
        plain_err, fast_err = ((p - e).abs().max() / scale).item(), ((f - e).abs().max() / scale).item()
        assert fast_err < max(4 * plain_err, 1e-6), (name, fast_err, plain_err)  # as exact as the plain path


def test_frozen_weight_and_frozen_input():
    torch.manual_seed(0)
    x, w = torch.randn(3, 7, 16, requires_grad=True), torch.randn(16)  # a frozen gain (LoRA freezes it)
    rms_norm_fast(x, w, 1e-5).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    plain_rms_norm(x_ref, w, 1e-5).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    x2, w2 = torch.randn(3, 7, 16), torch.randn(16, requires_grad=True)  # the first block's input needs no grad
    rms_norm_fast(x2, w2, 1e-5).sum().backward()
    w_ref = w2.detach().clone().requires_grad_()
    plain_rms_norm(x2, w_ref, 1e-5).sum().backward()
    torch.testing.assert_close(w2.grad, w_ref.grad)


def test_module_takes_the_fast_path_only_where_it_pays():
    norm = RMSNorm(16)
    x = torch.randn(2, 3, 16)
    assert use_fast_path(x, norm.weight)
    with torch.no_grad():
        assert not use_fast_path(x, norm.weight)
    assert not use_fast_path(x.bfloat16(), norm.weight)
    fast = norm(x)
    with torch.no_grad():
        plain = norm(x)
    assert fast.grad_fn is not None and type(fast.grad_fn).__name__ == "RMSNormFunctionBackward"
    torch.testing.assert_close(fast, plain, rtol=0, atol=0)  # the same ops forward: the same bits


def test_weight_free_form_is_rms_normalize():
    torch.manual_seed(0)
    q = torch.randn(4, 32, 4, 16) * 2
    a, b = q.clone().requires_grad_(), q.clone().requires_grad_()
    dy = torch.randn_like(q)
    fast = rms_normalize(a)
    assert type(fast.grad_fn).__name__ == "RMSNormFunctionBackward"
    fast.backward(dy)
    plain = b * torch.rsqrt((b * b).mean(dim=-1, keepdim=True) + 1e-6)
    plain.backward(dy)
    torch.testing.assert_close(fast, plain, rtol=0, atol=0)
    torch.testing.assert_close(a.grad, b.grad)


def test_f_silu_is_the_plain_silu():
    torch.manual_seed(0)
    x = torch.randn(16, 256, 64, dtype=torch.float64) * 4
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    dy = torch.randn_like(x)
    F.silu(a).backward(dy)
    silu(b).backward(dy)
    torch.testing.assert_close(F.silu(x), silu(x))
    torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("heads,kv_heads", [(6, 6), (8, 2)])
def test_grouped_decode_attention_equals_sdpa(heads, kv_heads):
    from diyllm.model.attention import grouped_decode_attention

    torch.manual_seed(0)
    B, L, D = 3, 40, 16
    q, k, v = torch.randn(B, heads, 1, D), torch.randn(B, kv_heads, L, D), torch.randn(B, kv_heads, L, D)
    mask = torch.rand(B, 1, 1, L) > 0.3  # the static cache's visible columns, per row
    mask[..., 0] = True
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(heads // kv_heads, 1),
                                          v.repeat_interleave(heads // kv_heads, 1), mask)
    torch.testing.assert_close(grouped_decode_attention(q, k, v, mask), want)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("masking", ["none", "ignore_index", "loss_mask", "nothing_counts"])
def test_fused_cross_entropy_equals_the_written_out_formula(reduction, masking):
    torch.manual_seed(0)
    logits64 = torch.randn(16, 256, 65, dtype=torch.float64) * 4  # bench_train.py's medium shape, vocab 65
    targets = torch.randint(0, 65, (16, 256))
    loss_mask = None
    if masking == "ignore_index":
        targets[:, :100] = -100
    elif masking == "loss_mask":
        loss_mask = (torch.rand(16, 256) > 0.3).long()
    elif masking == "nothing_counts":
        targets[:] = -100

    def run(fn, dtype):
        logits = logits64.detach().to(dtype, copy=True).requires_grad_()
        loss = fn(logits, targets, -100, loss_mask, reduction)
        (loss * torch.linspace(0.5, 1.5, loss.numel()).view(loss.shape).to(dtype)).sum().backward()
        return loss.detach().double(), logits.grad.double()

    exact = run(plain_cross_entropy, torch.float64)
    for name, e, p, f in zip(("loss", "dlogits"), exact, run(plain_cross_entropy, torch.float32),
                             run(fused_cross_entropy, torch.float32)):
        assert torch.isfinite(f).all(), name
        scale = e.abs().max().clamp(min=1e-30)
        plain_err, fast_err = ((p - e).abs().max() / scale).item(), ((f - e).abs().max() / scale).item()
        assert fast_err < max(4 * plain_err, 1e-6), (name, fast_err, plain_err)
    if masking == "nothing_counts":
        assert exact[0].abs().max() == 0 and exact[1].abs().max() == 0  # 0, never NaN


def test_cross_entropy_takes_the_fused_path_in_eager_and_the_formula_under_compile(monkeypatch):
    import diyllm.model.loss as loss_module

    calls = []
    monkeypatch.setattr(loss_module, "fused_cross_entropy", lambda *a: calls.append("fused") or plain_cross_entropy(*a))
    logits, targets = torch.randn(2, 3, 5), torch.randint(0, 5, (2, 3))
    loss_module.cross_entropy(logits, targets)
    assert calls == ["fused"]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    loss_module.cross_entropy(logits, targets)
    assert calls == ["fused"]  # the written-out formula ran, as inductor gets it
    with pytest.raises(ValueError, match="reduction"):
        loss_module.cross_entropy(logits, targets, reduction="avg")
