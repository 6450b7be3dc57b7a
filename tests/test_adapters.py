"""diyllm.adapters: the CS336-style names and argument orders, each a working wrapper."""

import inspect
import io

import numpy as np
import torch
import torch.nn.functional as F

from diyllm import adapters
from diyllm.model import DIYConfig, DIYForCausalLM
from diyllm.model.attention import causal_mask

EXPECTED = {
    "run_linear": ["d_in", "d_out", "weights", "in_features"],
    "run_embedding": ["vocab_size", "d_model", "weights", "token_ids"],
    "run_swiglu": ["d_model", "d_ff", "w1_weight", "w2_weight", "w3_weight", "in_features"],
    "run_scaled_dot_product_attention": ["Q", "K", "V", "mask"],
    "run_multihead_self_attention": ["d_model", "num_heads", "q_proj_weight", "k_proj_weight", "v_proj_weight",
                                     "o_proj_weight", "in_features"],
    "run_multihead_self_attention_with_rope": ["d_model", "num_heads", "max_seq_len", "theta", "q_proj_weight",
                                               "k_proj_weight", "v_proj_weight", "o_proj_weight", "in_features",
                                               "token_positions"],
    "run_rope": ["d_k", "theta", "max_seq_len", "in_query_or_key", "token_positions"],
    "run_transformer_block": ["d_model", "num_heads", "d_ff", "max_seq_len", "theta", "weights", "in_features"],
    "run_transformer_lm": ["vocab_size", "context_length", "d_model", "num_layers", "num_heads", "d_ff",
                           "rope_theta", "weights", "in_indices"],
    "run_rmsnorm": ["d_model", "eps", "weights", "in_features"],
    "run_silu": ["in_features"],
    "run_get_batch": ["dataset", "batch_size", "context_length", "device"],
    "run_softmax": ["in_features", "dim"],
    "run_cross_entropy": ["inputs", "targets"],
    "run_gradient_clipping": ["parameters", "max_l2_norm"],
    "get_adamw_cls": [],
    "run_get_lr_cosine_schedule": ["it", "max_learning_rate", "min_learning_rate", "warmup_iters",
                                   "cosine_cycle_iters"],
    "run_save_checkpoint": ["model", "optimizer", "iteration", "out"],
    "run_load_checkpoint": ["src", "model", "optimizer"],
    "get_tokenizer": ["vocab", "merges", "special_tokens"],
    "run_train_bpe": ["input_path", "vocab_size", "special_tokens", "kwargs"],
}


def test_every_adapter_exists_with_the_assignment_signature():
    for name, params in EXPECTED.items():
        fn = getattr(adapters, name, None)
        assert callable(fn), f"adapters.{name} missing"
        assert list(inspect.signature(fn).parameters) == params, name


def test_simple_adapters_match_torch():
    w = torch.randn(6, 4)
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(adapters.run_linear(4, 6, w, x), F.linear(x, w))
    emb = torch.randn(10, 4)
    ids = torch.tensor([[1, 9, 0]])
    torch.testing.assert_close(adapters.run_embedding(10, 4, emb, ids), emb[ids])
    torch.testing.assert_close(adapters.run_silu(x), F.silu(x))
    torch.testing.assert_close(adapters.run_softmax(x, dim=1), F.softmax(x, dim=1))
    g = torch.randn(4)
    torch.testing.assert_close(adapters.run_rmsnorm(4, 1e-5, g, x), F.rms_norm(x, (4,), g, eps=1e-5))
    logits, targets = torch.randn(8, 5), torch.randint(0, 5, (8,))
    torch.testing.assert_close(adapters.run_cross_entropy(logits, targets), F.cross_entropy(logits, targets))
    assert adapters.get_adamw_cls()([torch.nn.Parameter(torch.ones(1))], lr=1e-3) is not None
    assert adapters.run_get_lr_cosine_schedule(5, 1.0, 0.1, 10, 20) == 0.5


def test_sdpa_adapter_accepts_extra_batch_dims_and_mask():
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 4)
    mask = torch.rand(5, 7) > 0.3
    mask[:, 0] = True
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(adapters.run_scaled_dot_product_attention(q, k, v, mask), ref)


def _mha_reference(x, wq, wk, wv, wo, num_heads, rope=None):
    B, T, d = x.shape
    dk = d // num_heads

    def heads(w):
        return (x @ w.T).view(B, T, num_heads, dk).transpose(1, 2)

    q, k, v = heads(wq), heads(wk), heads(wv)
    if rope is not None:
        q, k = rope(q), rope(k)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(T, T))
    return y.transpose(1, 2).reshape(B, T, d) @ wo.T


def test_multihead_attention_adapters():
    d, h, T = 16, 4, 6
    x = torch.randn(2, T, d)
    ws = [torch.randn(d, d) * 0.3 for _ in range(4)]
    torch.testing.assert_close(adapters.run_multihead_self_attention(d, h, *ws, x), _mha_reference(x, *ws, h))
    positions = torch.arange(T)[None]

    def rope(t):
        return adapters.run_rope(d // h, 10000.0, 32, t, torch.arange(T))

    out = adapters.run_multihead_self_attention_with_rope(d, h, 32, 10000.0, *ws, x, positions)
    torch.testing.assert_close(out, _mha_reference(x, *ws, h, rope=rope))


def test_transformer_lm_and_block_adapters_match_the_model():
    config = DIYConfig(vocab_size=50, context_length=16, d_model=32, num_layers=2, num_heads=4, d_ff=64)
    model = DIYForCausalLM(config).eval()
    ids = torch.randint(0, 50, (2, 10))
    weights = model.state_dict()
    logits = adapters.run_transformer_lm(50, 16, 32, 2, 4, 64, 10000.0, weights, ids)
    torch.testing.assert_close(logits, model(ids).logits)
    block_weights = {k.removeprefix("layers.0."): v for k, v in weights.items() if k.startswith("layers.0.")}
    x = torch.randn(2, 10, 32)
    torch.testing.assert_close(adapters.run_transformer_block(32, 4, 64, 16, 10000.0, block_weights, x),
                               model.layers[0](x), rtol=1e-5, atol=1e-5)


def test_get_batch_and_checkpoint_adapters():
    data = np.arange(100)
    x, y = adapters.run_get_batch(data, 8, 5, "cpu")
    assert x.shape == y.shape == (8, 5) and x.dtype == torch.int64
    assert torch.equal(y, x + 1) and int(x.min()) >= 0 and int(y.max()) <= 99
    model = torch.nn.Linear(3, 2)
    opt = adapters.get_adamw_cls()(model.parameters(), lr=1e-3)
    buf = io.BytesIO()
    adapters.run_save_checkpoint(model, opt, 17, buf)
    buf.seek(0)
    other = torch.nn.Linear(3, 2)
    assert adapters.run_load_checkpoint(buf, other, adapters.get_adamw_cls()(other.parameters(), lr=1e-3)) == 17
    torch.testing.assert_close(other.weight, model.weight)


def test_gradient_clipping_adapter_clips_in_place():
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.full((4,), 10.0)
    adapters.run_gradient_clipping([p], 1.0)
    assert abs(p.grad.norm().item() - 1.0) < 1e-4
