"""Each building block against its PyTorch reference."""

import math

import pytest
import torch
import torch.nn.functional as F

from diyllm.model.config import default_d_ff
from diyllm.model.layers import Embedding, Linear, RMSNorm, SwiGLU, fused_weight, silu


def test_linear_matches_f_linear_and_has_spec_init():
    layer = Linear(300, 200)
    x = torch.randn(4, 7, 300)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight))
    assert layer.weight.shape == (200, 300)
    std = math.sqrt(2 / 500)
    assert layer.weight.abs().max() <= 3 * std + 1e-6  # truncated at 3 std
    assert abs(layer.weight.std().item() - std * 0.986) < 0.05 * std  # truncation shrinks std by ~1.4%


def test_embedding_matches_f_embedding():
    emb = Embedding(50, 16)
    ids = torch.randint(0, 50, (3, 9))
    torch.testing.assert_close(emb(ids), F.embedding(ids, emb.weight))
    assert emb.weight.abs().max() <= 3.0


def test_embedding_backward_matches_f_embedding_and_is_deterministic():
    """At the shipped recipe's size (a (12, 64) batch into a (65, 128) table) and torch's default thread
    count: plain indexing's backward varies run to run there, ours must not, and equals F.embedding's."""
    emb = Embedding(65, 128)
    ids = torch.randint(0, 65, (12, 64))
    grad_out = torch.randn(12, 64, 128)

    def grad(fn):
        emb.weight.grad = None
        fn().backward(grad_out)
        return emb.weight.grad.clone()

    first = grad(lambda: emb(ids))
    assert all(torch.equal(grad(lambda: emb(ids)), first) for _ in range(10))
    torch.testing.assert_close(first, grad(lambda: F.embedding(ids, emb.weight)), rtol=1e-6, atol=1e-6)


def test_rmsnorm_matches_reference_and_keeps_dtype():
    norm = RMSNorm(32, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(32))
    x = torch.randn(5, 32)
    torch.testing.assert_close(norm(x), F.rms_norm(x, (32,), norm.weight, eps=1e-5))
    assert norm(x.bfloat16()).dtype == torch.bfloat16
    # float32 inside: bf16 values whose squares overflow bf16-precision sums still normalise well
    big = torch.full((1, 32), 3e4, dtype=torch.bfloat16)
    assert torch.isfinite(norm(big)).all()


def test_silu_matches_f_silu():
    x = torch.randn(1000) * 10
    torch.testing.assert_close(silu(x), F.silu(x))


@pytest.mark.parametrize("fused", [True, False, None])
def test_swiglu_matches_formula(fused):
    ffn = SwiGLU(24, 64, fused=fused)
    x = torch.randn(2, 5, 24)
    w1, w2, w3 = ffn.w1.weight, ffn.w2.weight, ffn.w3.weight
    expected = F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)
    torch.testing.assert_close(ffn(x), expected)
    assert w1.shape == (64, 24) and w2.shape == (24, 64) and w3.shape == (64, 24)


def test_fused_weight_is_stacked_only_where_it_pays():
    ffn = SwiGLU(8, 16)  # fused=None: stack on accelerators, separate matmuls on CPU
    assert fused_weight(ffn) is None
    ffn.fused = True
    torch.testing.assert_close(fused_weight(ffn), torch.cat([ffn.w1.weight, ffn.w3.weight]))
    with torch.no_grad():  # inference: no copy per call (only frozen_fused_weights stacks, once)
        assert fused_weight(ffn) is None
    ffn.fused = False
    assert fused_weight(ffn) is None


def test_default_d_ff_is_8_thirds_rounded_to_64():
    assert default_d_ff(384) == 1024  # 8/3*384 = 1024 exactly
    assert default_d_ff(128) == 384  # 341.3 -> 384
    assert default_d_ff(768) % 64 == 0 and default_d_ff(768) >= 8 * 768 / 3


def test_rmsnorm_gradient_against_finite_differences():
    norm = RMSNorm(6).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(6, dtype=torch.float64))
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(norm, (x,))
    assert torch.autograd.gradcheck(lambda w: F.rms_norm(x.detach(), (6,), w, eps=1e-5), (norm.weight,))
