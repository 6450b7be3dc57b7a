"""The speedrun's model options (qk_norm, mlp="relu2", zero_init_proj, logit_softcap) against torch
references; the defaults keep today's model and state_dict names."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diyllm.errors import UserError
from diyllm.generation.generate import generate
from diyllm.model import DIYConfig, DIYForCausalLM
from diyllm.model.layers import ReluSquaredMLP, rms_normalize

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: extra threads only contend on a shared CPU

BASE = dict(vocab_size=50, context_length=32, d_model=32, num_layers=2, num_heads=4)
ALL_ON = dict(qk_norm=True, mlp="relu2", zero_init_proj=True, logit_softcap=15.0)


def test_defaults_keep_the_llama_block_and_its_state_dict_names():
    plain = DIYForCausalLM(DIYConfig(**BASE))
    explicit = DIYForCausalLM(DIYConfig(**BASE, qk_norm=False, mlp="swiglu", zero_init_proj=False, logit_softcap=0.0))
    assert list(plain.state_dict()) == list(explicit.state_dict())
    assert "layers.0.ffn.w3.weight" in plain.state_dict() and plain.config.d_ff == 128  # 8/3·32 rounded up to 64
    relu2 = DIYForCausalLM(DIYConfig(**BASE, mlp="relu2"))
    assert relu2.config.d_ff == 4 * 32
    assert set(relu2.state_dict()) == set(plain.state_dict()) - {f"layers.{i}.ffn.w3.weight" for i in range(2)}
    with pytest.raises(ValueError, match="mlp="):
        DIYConfig(**BASE, mlp="gelu")


def test_rms_normalize_and_relu_squared_match_torch():
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    torch.testing.assert_close(rms_normalize(x), F.rms_norm(x, (16,), eps=1e-6))
    mlp = ReluSquaredMLP(16, 40).double()
    ref = F.linear(F.relu(F.linear(x, mlp.w1.weight)).square(), mlp.w2.weight)
    torch.testing.assert_close(mlp(x), ref)


def test_qk_norm_normalises_q_and_k_per_head_in_both_projection_layouts():
    torch.manual_seed(0)
    model = DIYForCausalLM(DIYConfig(**BASE, qk_norm=True)).double()
    attn = model.layers[0].attn
    seen = {}
    attn.register_forward_hook(lambda m, a, out: seen.setdefault("y", out))
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    y = attn(x)
    # reference: q, k RMS-normalised per head with torch's rms_norm, then RoPE, then causal attention
    B, T, H, D = 2, 7, 4, 8
    q = F.rms_norm(F.linear(x, attn.q_proj.weight).view(B, T, H, D), (D,), eps=1e-6)
    k = F.rms_norm(F.linear(x, attn.k_proj.weight).view(B, T, H, D), (D,), eps=1e-6)
    v = F.linear(x, attn.v_proj.weight).view(B, T, H, D)
    cos, sin = model.rope.cos_sin(None, T)
    from diyllm.model.rope import apply_rotary

    q, k = apply_rotary(q, cos[:, None], sin[:, None]), apply_rotary(k, cos[:, None], sin[:, None])
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    ref = F.linear(ref.transpose(1, 2).reshape(B, T, H * D), attn.output_proj.weight)
    torch.testing.assert_close(y, ref)
    attn.fused = True  # stacked q|k|v matmul: same result
    torch.testing.assert_close(attn(x), ref)


def test_zero_init_makes_every_block_the_identity_and_softcap_bounds_the_logits():
    torch.manual_seed(0)
    model = DIYForCausalLM(DIYConfig(**BASE, zero_init_proj=True, logit_softcap=2.0))
    for layer in model.layers:
        assert layer.attn.output_proj.weight.abs().sum() == 0 and layer.ffn.w2.weight.abs().sum() == 0
    ids = torch.randint(0, 50, (2, 9))
    logits = model(ids).logits
    raw = model.lm_head(model.ln_final(model.token_embeddings(ids)))  # blocks add nothing at init
    torch.testing.assert_close(logits, 2.0 * torch.tanh(raw / 2.0))
    assert logits.abs().max() < 2.0 < raw.abs().max()


def test_all_options_train_and_decode_with_the_kv_cache_like_without():
    torch.manual_seed(0)
    model = DIYForCausalLM(DIYConfig(**BASE, **ALL_ON))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 50, (4, 17))
    losses = []
    for _ in range(15):
        loss = model(ids[:, :-1], targets=ids[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    model.eval()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    assert generate(model, prompts, 10, temperature=0) == generate(model, prompts, 10, temperature=0, use_cache=False)


def test_hf_export_refuses_options_a_llama_cannot_express():
    from diyllm.interop.hf_model import diy_to_hf_config

    diy_to_hf_config(DIYConfig(**BASE, zero_init_proj=True))  # only an init: exportable
    with pytest.raises(UserError, match="qk_norm=True"):
        diy_to_hf_config(DIYConfig(**BASE, qk_norm=True))
    with pytest.raises(UserError, match="relu2"):
        diy_to_hf_config(DIYConfig(**BASE, mlp="relu2"))
