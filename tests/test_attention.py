"""Softmax, attention, RoPE and the attention module against references."""

import pytest
import torch
import torch.nn.functional as F

from diyllm.model import DIYConfig
from diyllm.model.attention import CausalSelfAttention, causal_mask, scaled_dot_product_attention, softmax
from diyllm.model.rope import RotaryEmbedding, apply_rotary


def test_softmax_matches_and_is_stable():
    x = torch.randn(4, 10) * 5
    torch.testing.assert_close(softmax(x, dim=-1), F.softmax(x, dim=-1))
    torch.testing.assert_close(softmax(x, dim=0), F.softmax(x, dim=0))
    huge = torch.tensor([[1e4, 1e4 - 1.0, -1e4]])
    out = softmax(huge)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, F.softmax(huge, dim=-1))


def test_sdpa_matches_torch_with_causal_mask():
    q, k, v = (torch.randn(2, 3, 8, 16) for _ in range(3))
    mask = causal_mask(8, 8)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v, mask=mask), expected)
    # no mask = full attention
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_causal_mask_with_offset_for_cached_keys():
    m = causal_mask(2, 5)  # the last 2 of 5 positions
    assert m.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]


def test_attention_gradient_against_finite_differences():
    q, k, v = (torch.randn(1, 2, 4, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = causal_mask(4, 4)
    assert torch.autograd.gradcheck(lambda a, b, c: scaled_dot_product_attention(a, b, c, mask), (q, k, v))


def rope_complex_reference(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE as complex multiplication: pair k is the complex number x[2k] + i·x[2k+1], times e^{i·pos·θ^(-2k/d)}."""
    d = x.shape[-1]
    freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = positions.double()[..., None] * freqs
    z = torch.view_as_complex(x.double().reshape(*x.shape[:-1], d // 2, 2).contiguous())
    return torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)).flatten(-2).to(x.dtype)


def test_rope_matches_complex_formulation():
    rope = RotaryEmbedding(theta=10000.0, d_k=16, max_seq_len=64)
    x = torch.randn(2, 9, 16)
    positions = torch.tensor([0, 1, 2, 5, 8, 13, 21, 34, 63])
    torch.testing.assert_close(rope(x, positions), rope_complex_reference(x, positions, 10000.0))
    # default positions are 0..T-1
    torch.testing.assert_close(rope(x), rope_complex_reference(x, torch.arange(9), 10000.0))


def test_apply_rotary_handles_any_memory_layout_and_a_shared_rotation():
    # The eager path multiplies complex views, which need whole (re, im) pairs in memory; any other
    # layout must give the same numbers (it is copied first), with or without a precomputed rotation.
    rope = RotaryEmbedding(theta=10000.0, d_k=16, max_seq_len=64)
    positions = torch.arange(5)
    cos, sin = rope.cos_sin(positions, 5)
    base = torch.randn(3, 5, 17)
    layouts = {
        "contiguous": base[..., :16].contiguous(),
        "odd storage offset": base[..., 1:],
        "last dim strided": torch.randn(3, 16, 5).transpose(1, 2),
    }
    for name, x in layouts.items():
        expected = rope_complex_reference(x, positions, 10000.0)
        torch.testing.assert_close(apply_rotary(x, cos, sin), expected, msg=name)
        shared = torch.complex(cos, sin)
        torch.testing.assert_close(apply_rotary(x, cos, sin, shared), expected, msg=name)
        # a rotation of another precision is not used as is: the result keeps x's dtype
        out = apply_rotary(x, cos, sin, shared.to(torch.complex128))
        assert out.dtype == x.dtype
        torch.testing.assert_close(out, expected, msg=name)
    # bf16 takes the real-arithmetic path
    x = layouts["contiguous"]
    torch.testing.assert_close(apply_rotary(x.bfloat16(), cos, sin).float(),
                               rope_complex_reference(x, positions, 10000.0), atol=0.05, rtol=0.02)


def real_form_rotary(x, cos, sin):
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1).flatten(-2)


def test_pair_rotation_backward_equals_the_real_forms_and_finite_differences():
    from diyllm.model.rope import PairRotation

    rope = RotaryEmbedding(theta=10000.0, d_k=64, max_seq_len=256)
    cos, sin = (t.unsqueeze(-2) for t in rope.cos_sin(None, 256))  # (T, 1, D/2), as the model shares them
    x64 = torch.randn(2, 6, 3, 8, dtype=torch.float64, requires_grad=True)
    rot64 = torch.complex(cos[:6].double(), sin[:6].double())[:, :, :4]
    assert torch.autograd.gradcheck(lambda a: PairRotation.apply(a, rot64), (x64,))
    # bench_train.py's medium layout (B, T, heads, D), with the strided gradient attention hands back
    x = torch.randn(16, 256, 6, 64, requires_grad=True)
    grad = torch.randn(16, 6, 256, 64).transpose(1, 2)
    apply_rotary(x, cos, sin, torch.complex(cos, sin)).backward(grad)
    x_ref = x.detach().clone().requires_grad_()
    real_form_rotary(x_ref, cos, sin).backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    with torch.no_grad():  # no backward to record: the plain complex multiply, same numbers
        torch.testing.assert_close(apply_rotary(x, cos, sin), real_form_rotary(x, cos, sin))


def test_rope_preserves_norm_and_makes_scores_relative():
    rope = RotaryEmbedding(500.0, 8, 100)
    q, k = torch.randn(8), torch.randn(8)
    qa, ka = rope(q[None], torch.tensor([3])), rope(k[None], torch.tensor([10]))
    qb, kb = rope(q[None], torch.tensor([50])), rope(k[None], torch.tensor([57]))
    torch.testing.assert_close(qa.norm(), q.norm())
    torch.testing.assert_close((qa * ka).sum(), (qb * kb).sum(), rtol=1e-4, atol=1e-5)


def _config(**kw):
    base = dict(vocab_size=10, context_length=16, d_model=32, num_layers=1, num_heads=4, attn_impl="diy")
    return DIYConfig(**{**base, **kw})


def test_attention_module_matches_manual_multihead():
    config = _config(fused_projections=False)
    attn = CausalSelfAttention(config)
    x = torch.randn(2, 6, 32)
    q = (x @ attn.q_proj.weight.T).view(2, 6, 4, 8).transpose(1, 2)
    k = (x @ attn.k_proj.weight.T).view(2, 6, 4, 8).transpose(1, 2)
    v = (x @ attn.v_proj.weight.T).view(2, 6, 4, 8).transpose(1, 2)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 6, 32)
    torch.testing.assert_close(attn(x), y @ attn.output_proj.weight.T)


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_sdpa_path_equals_from_scratch_path(num_kv_heads):
    rope = RotaryEmbedding(10000.0, 8, 16)
    diy = CausalSelfAttention(_config(num_kv_heads=num_kv_heads, attn_impl="diy"), rope)
    fast = CausalSelfAttention(_config(num_kv_heads=num_kv_heads, attn_impl="sdpa"), rope)
    fast.load_state_dict(diy.state_dict())
    x = torch.randn(3, 11, 32, requires_grad=True)
    torch.testing.assert_close(fast(x), diy(x), rtol=1e-5, atol=1e-5)
    g_fast = torch.autograd.grad(fast(x).sum(), x)[0]
    g_diy = torch.autograd.grad(diy(x).sum(), x)[0]
    torch.testing.assert_close(g_fast, g_diy, rtol=1e-4, atol=1e-5)


def test_fused_and_separate_projections_agree():
    separate = CausalSelfAttention(_config(fused_projections=False))
    fused = CausalSelfAttention(_config(fused_projections=True))
    fused.load_state_dict(separate.state_dict())
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(fused(x), separate(x))
    fused(x).square().sum().backward()
    separate(x).square().sum().backward()
    for name, p in fused.named_parameters():  # the gradient reaches each stacked weight unchanged
        torch.testing.assert_close(p.grad, separate.get_parameter(name).grad, rtol=1e-5, atol=1e-6)


def test_gqa_with_all_heads_equals_mha_and_repeats_kv_heads():
    mha = CausalSelfAttention(_config(num_kv_heads=4))
    gqa = CausalSelfAttention(_config(num_kv_heads=2))
    assert gqa.k_proj.weight.shape == (16, 32)  # 2 kv heads x 8 dims
    # GQA with 2 kv heads == MHA whose k/v heads are pairwise copies (heads 0,1 share kv head 0, ...)
    with torch.no_grad():
        state = dict(gqa.state_dict())
        for name in ("k_proj.weight", "v_proj.weight"):
            w = state[name].view(2, 8, 32)
            state[name] = w.repeat_interleave(2, dim=0).reshape(32, 32)
        mha.load_state_dict(state)
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(gqa(x), mha(x))
