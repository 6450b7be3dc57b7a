"""DIYForCausalLM: the public state_dict contract, causality, errors, sizes."""

import io

import pytest
import torch
import torch.nn.functional as F

from diyllm.model import DIYConfig, DIYForCausalLM, KVCache
from diyllm.training.loss import cross_entropy


def expected_keys(num_layers: int) -> set[str]:
    keys = {"token_embeddings.weight", "ln_final.weight", "lm_head.weight"}
    for i in range(num_layers):
        keys |= {f"layers.{i}.{n}" for n in (
            "attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight", "attn.output_proj.weight",
            "ln1.weight", "ffn.w1.weight", "ffn.w2.weight", "ffn.w3.weight", "ln2.weight")}
    return keys


def test_state_dict_keys_are_the_public_contract(tiny_config):
    model = DIYForCausalLM(tiny_config)
    sd = model.state_dict()
    assert set(sd) == expected_keys(tiny_config.num_layers)
    assert sd["layers.0.attn.q_proj.weight"].shape == (64, 64)
    assert sd["layers.1.ffn.w1.weight"].shape == (128, 64)
    assert sd["lm_head.weight"].shape == (97, 64)


def test_state_dict_round_trip_gives_identical_outputs(tiny_config):
    a, b = DIYForCausalLM(tiny_config), DIYForCausalLM(tiny_config)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=True))
    ids = torch.randint(0, 97, (2, 20))
    torch.testing.assert_close(a(ids).logits, b(ids).logits)


def test_changing_a_token_never_changes_earlier_logits(tiny_config):
    for impl in ("sdpa", "diy"):
        model = DIYForCausalLM(DIYConfig(**{**tiny_config.to_dict(), "attn_impl": impl})).eval()
        ids = torch.randint(0, 97, (1, 24))
        t = 13
        changed = ids.clone()
        changed[0, t] = (ids[0, t] + 1) % 97
        a, b = model(ids).logits, model(changed).logits
        torch.testing.assert_close(a[:, :t], b[:, :t])
        assert not torch.allclose(a[:, t:], b[:, t:])


def test_loss_matches_f_cross_entropy_and_initial_loss_is_sane(tiny_config):
    model = DIYForCausalLM(tiny_config)
    ids = torch.randint(0, 97, (4, 32))
    out = model(ids[:, :-1], targets=ids[:, 1:])
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits.reshape(-1, 97), ids[:, 1:].reshape(-1)))
    assert out.loss.item() < 2 * torch.log(torch.tensor(97.0)).item()


def test_sdpa_and_diy_models_agree(tiny_config):
    diy = DIYForCausalLM(DIYConfig(**{**tiny_config.to_dict(), "attn_impl": "diy", "num_kv_heads": 2}))
    fast = DIYForCausalLM(DIYConfig(**{**tiny_config.to_dict(), "attn_impl": "sdpa", "num_kv_heads": 2}))
    fast.load_state_dict(diy.state_dict())
    ids = torch.randint(0, 97, (2, 32))
    torch.testing.assert_close(fast(ids).logits, diy(ids).logits, rtol=1e-5, atol=1e-5)


def test_kv_cache_prefill_then_decode_matches_full_forward(tiny_config):
    model = DIYForCausalLM(DIYConfig(**{**tiny_config.to_dict(), "num_kv_heads": 2})).eval()
    ids = torch.randint(0, 97, (2, 12))
    full = model(ids).logits
    cache = KVCache.for_model(model, batch_size=2)
    with torch.no_grad():
        first = model(ids[:, :8], kv_cache=cache).logits
        steps = [model(ids[:, t : t + 1], kv_cache=cache).logits for t in range(8, 12)]
    torch.testing.assert_close(torch.cat([first, *steps], dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 12


def test_tied_embeddings_share_one_matrix(tiny_config):
    model = DIYForCausalLM(DIYConfig(**{**tiny_config.to_dict(), "tie_embeddings": True}))
    assert model.lm_head.weight is model.token_embeddings.weight
    untied = DIYForCausalLM(tiny_config)
    assert untied.num_parameters() - model.num_parameters() == 97 * 64
    assert model.num_parameters(include_embeddings=False) == untied.num_parameters(include_embeddings=False)


def test_parameter_count_and_flops(tiny_config):
    model = DIYForCausalLM(tiny_config)
    d, ff, V, L = 64, 128, 97, 2
    per_layer = 4 * d * d + 3 * d * ff + 2 * d
    assert model.num_parameters() == V * d + L * per_layer + d + V * d
    assert model.num_parameters(include_embeddings=False) == L * per_layer + d + V * d
    assert model.flops_per_token(32) == 6 * model.num_parameters(False) + 12 * L * d * 32


def test_clear_errors_for_bad_inputs(tiny_config):
    model = DIYForCausalLM(tiny_config)
    with pytest.raises(ValueError, match="exceeds context_length=32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="token id 97 is out of range for vocab_size=97"):
        model(torch.tensor([[1, 2, 97]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[-1, 2]]))


def test_config_validation_names_the_problem():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        DIYConfig(d_model=30, num_heads=4)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        DIYConfig(d_model=64, num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="attn_impl"):
        DIYConfig(attn_impl="flash")
    assert DIYConfig.from_dict({**DIYConfig().to_dict(), "future_field": 1}) == DIYConfig()


def test_cross_entropy_stable_with_ignore_index_and_mask():
    logits = torch.randn(3, 5, 11) * 1e4
    targets = torch.randint(0, 11, (3, 5))
    targets[0, 2] = -100
    ours = cross_entropy(logits, targets)
    ref = F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1), ignore_index=-100)
    assert torch.isfinite(ours)
    torch.testing.assert_close(ours, ref)
    mask = torch.ones(3, 5)
    mask[1] = 0
    masked_targets = targets.clone()
    masked_targets[1] = -100
    torch.testing.assert_close(cross_entropy(logits, targets, loss_mask=mask),
                               F.cross_entropy(logits.reshape(-1, 11), masked_targets.reshape(-1)))
    # all tokens masked out: 0, not NaN, and a zero gradient
    x = logits.clone().requires_grad_()
    loss = cross_entropy(x, targets, loss_mask=torch.zeros(3, 5))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(x.grad) == 0
    small = torch.randn(4, 7, dtype=torch.float64)
    t = torch.randint(0, 7, (4,))
    torch.testing.assert_close(cross_entropy(small, t).double(), F.cross_entropy(small, t))
