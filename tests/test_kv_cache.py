"""KV-cache decoding must be the no-cache reference, only faster: same logits, same greedy tokens."""

from __future__ import annotations

import warnings

import pytest
import torch

from diyllm.generation.generate import ContextFullWarning, generate, iter_steps
from diyllm.model import DIYConfig, DIYForCausalLM, KVCache
from diyllm.model.attention import _SDPA_HAS_GQA
from diyllm.model.layers import frozen_fused_weights

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(num_kv_heads=None, attn_impl="sdpa", context_length=48, seed=0, **kw) -> DIYForCausalLM:
    torch.manual_seed(seed)
    cfg = DIYConfig(vocab_size=61, context_length=context_length, d_model=48, num_layers=2, num_heads=4,
                    num_kv_heads=num_kv_heads, d_ff=96, attn_impl=attn_impl, **kw)
    return DIYForCausalLM(cfg).eval()


def _steps(model, prompts, n, use_cache, **kw):
    steps = list(iter_steps(model, prompts, n, temperature=0, use_cache=use_cache, **kw))
    logits = torch.stack([s.logits for s in steps], dim=1)  # (B, n, V)
    tokens = torch.stack([s.tokens for s in steps], dim=1)
    return logits, tokens


@pytest.mark.parametrize("num_kv_heads,attn_impl", [(None, "sdpa"), (2, "sdpa"), (1, "diy"), (2, "diy")])
def test_cache_matches_no_cache_single_prompt(num_kv_heads, attn_impl):
    model = _model(num_kv_heads, attn_impl)
    prompt = [3, 14, 15, 9, 26, 5]
    ref_logits, ref_tokens = _steps(model, prompt, 20, use_cache=False)
    logits, tokens = _steps(model, prompt, 20, use_cache=True)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert tokens.tolist() == ref_tokens.tolist()
    # and the reference itself is the plain full forward over prompt + generated tokens
    full = torch.tensor([prompt + ref_tokens[0].tolist()])
    with torch.no_grad():
        direct = model(full).logits[0, len(prompt) - 1 : -1]
    torch.testing.assert_close(ref_logits[0], direct, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not _SDPA_HAS_GQA, reason="SDPA's enable_gqa needs torch >= 2.5")
def test_gqa_decoding_reads_the_cache_without_copying_it(monkeypatch):
    # With a cache, SDPA shares each k/v head among its query heads; repeating the heads would copy the
    # whole cache at every step. Prefill and decode must both go without repeat_interleave.
    model = _model(num_kv_heads=2)
    prompt = [3, 14, 15, 9, 26, 5]
    expected = generate(model, prompt, 8, temperature=0, use_cache=False)

    def refuse(*args, **kwargs):
        raise AssertionError("repeat_interleave called while decoding with a cache")

    monkeypatch.setattr(torch.Tensor, "repeat_interleave", refuse)
    assert generate(model, prompt, 8, temperature=0, use_cache=True) == expected


@pytest.mark.parametrize("num_kv_heads", [None, 2])
def test_batched_prompts_of_different_lengths_match_each_prompt_alone(num_kv_heads):
    model = _model(num_kv_heads)
    prompts = [[7, 8, 9, 10, 11, 12, 13], [42], [5, 6, 1]]
    batch_logits, batch_tokens = _steps(model, prompts, 12, use_cache=True)
    nocache_logits, nocache_tokens = _steps(model, prompts, 12, use_cache=False)
    assert torch.isfinite(batch_logits).all()
    torch.testing.assert_close(batch_logits, nocache_logits, rtol=1e-4, atol=1e-4)
    assert batch_tokens.tolist() == nocache_tokens.tolist()
    for i, p in enumerate(prompts):
        alone_logits, alone_tokens = _steps(model, p, 12, use_cache=False)
        torch.testing.assert_close(batch_logits[i], alone_logits[0], rtol=1e-4, atol=1e-4)
        assert batch_tokens[i].tolist() == alone_tokens[0].tolist()


def test_forward_with_cache_equals_full_forward_position_by_position():
    """Prefill a few tokens, then feed the rest one at a time: each step's logits equal the full forward's."""
    model = _model(2)
    ids = torch.randint(0, 61, (2, 20))
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache.for_model(model, batch_size=2)
        parts = [model(ids[:, :5], kv_cache=cache).logits]
        for t in range(5, 20):
            parts.append(model(ids[:, t : t + 1], kv_cache=cache).logits)
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-4)


def test_sampling_with_cache_and_seed_matches_no_cache():
    model = _model(2)
    kw = dict(temperature=0.9, top_k=20, top_p=0.95, seed=123)
    assert generate(model, [[1, 2, 3], [4]], 15, **kw) == generate(model, [[1, 2, 3], [4]], 15, use_cache=False, **kw)


def test_sliding_window_beyond_context_is_exact_until_the_first_overflow():
    ctx = 16
    model = _model(2, context_length=ctx)
    prompt = list(range(1, 11))  # 10 tokens: room for ctx - 10 + 1 = 7 tokens before anything is dropped
    ref_logits, ref_tokens = _steps(model, prompt, 30, use_cache=False)
    logits, tokens = _steps(model, prompt, 30, use_cache=True)
    exact = ctx - len(prompt) + 1
    torch.testing.assert_close(logits[:, :exact], ref_logits[:, :exact], rtol=1e-4, atol=1e-4)
    assert tokens.shape == (1, 30) and torch.isfinite(logits).all()
    # a prompt longer than the context keeps only its last ctx tokens
    long_prompt = list(range(1, 40))
    a = generate(model, long_prompt, 3, temperature=0)
    b = generate(model, long_prompt[-ctx:], 3, temperature=0)
    assert a == b


def test_stop_mode_ends_at_the_context_window_with_a_warning():
    ctx = 16
    model = _model(context_length=ctx)
    with pytest.warns(ContextFullWarning, match="context window"):
        out = generate(model, [1, 2, 3, 4, 5, 6], 50, temperature=0, context="stop")
    # the model reads at most ctx tokens: the last generated token is the first one it never reads
    assert len(out[0]) == ctx - 6 + 1
    with pytest.raises(ValueError, match="exceeds the model's context_length"):
        generate(model, list(range(1, 30)), 5, context="stop")


def test_generation_restores_train_mode_and_leaves_no_grad_state():
    model = _model()
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate(model, [1, 2], 3)
    assert model.training
    assert torch.is_grad_enabled()


def test_frozen_fused_weights_give_the_same_logits_and_never_go_stale():
    model = _model(num_kv_heads=2)
    separate = _model(num_kv_heads=2, fused_projections=False)
    separate.load_state_dict(model.state_dict())
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.inference_mode():
        reference = separate(ids).logits
        with frozen_fused_weights(model):
            assert model.layers[0].attn.frozen_fused is not None
            torch.testing.assert_close(model(ids).logits, reference, rtol=1e-5, atol=1e-5)
    # dropped on exit: a later change of the weights is seen (no stale copy), with or without grad
    assert all(m.frozen_fused is None for m in model.modules() if hasattr(m, "frozen_fused"))
    with torch.no_grad():
        model.layers[0].ffn.w1.weight.mul_(2)
        separate.layers[0].ffn.w1.weight.mul_(2)
        torch.testing.assert_close(model(ids).logits, separate(ids).logits, rtol=1e-5, atol=1e-5)
    # with gradients on, the live weights are used even inside the block, so they get gradients
    with frozen_fused_weights(model):
        model(ids).logits.sum().backward()
    assert model.layers[0].attn.q_proj.weight.grad is not None
