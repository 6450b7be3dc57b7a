"""LoRA adapters: exact base at start, only adapters train, merge = unmerged, adapters-only state."""

from __future__ import annotations

import pytest
import torch

from diyllm.errors import UserError
from diyllm.model import DIYConfig, DIYForCausalLM
from diyllm.model.lora import (
    LoRALinear,
    adapters_disabled,
    apply_lora,
    lora_state_dict,
    merge_lora,
    parse_targets,
    trainable_fraction,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(fused=None, seed=0):
    torch.manual_seed(seed)
    return DIYForCausalLM(DIYConfig(vocab_size=61, context_length=16, d_model=32, num_layers=2, num_heads=4,
                                    num_kv_heads=2, d_ff=64, fused_projections=fused))


def _randomise_b(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.05)


def test_first_forward_equals_the_base_model_and_every_target_is_wrapped():
    base = _model()
    ids = torch.randint(0, 61, (2, 12))
    want = base(ids).logits
    names = apply_lora(base, rank=4, alpha=8)
    assert len(names) == 2 * 7 and all(isinstance(base.get_submodule(n), LoRALinear) for n in names)
    torch.testing.assert_close(base(ids).logits, want, rtol=0, atol=0)


def test_only_adapters_get_gradients_and_optimizer_state():
    from diyllm.training.optim import AdamW
    from diyllm.training.trainer import optimizer_groups

    model = _model()
    apply_lora(model, rank=4, alpha=4, targets="attn")
    opt = AdamW(optimizer_groups(model, 0.1), lr=1e-2)
    ids = torch.randint(0, 61, (2, 12))
    model(ids, targets=ids).loss.backward()
    opt.step()
    names = {id(p): n for n, p in model.named_parameters()}
    with_grad = {names[id(p)] for p in model.parameters() if p.grad is not None}
    assert with_grad and all(".lora_" in n for n in with_grad)
    assert {names[id(p)] for p in opt.state} == with_grad
    assert all(".attn." in n for n in with_grad)  # targets="attn": no MLP adapters
    trainable, total = trainable_fraction(model)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n) < total / 5


@pytest.mark.parametrize("fused", [None, True])
def test_merged_and_unmerged_logits_agree_and_disabled_adapters_give_the_base(fused):
    model = _model(fused)
    ids = torch.randint(0, 61, (2, 12))
    base_logits = model(ids).logits
    apply_lora(model, rank=4, alpha=16, dropout=0.1)
    _randomise_b(model)
    model.eval()
    unmerged = model(ids).logits
    assert (unmerged - base_logits).abs().max() > 1e-3  # the adapters do change the model
    with torch.no_grad():  # inference path: frozen fused stacks must not bypass the adapters
        from diyllm.model.layers import frozen_fused_weights

        with frozen_fused_weights(model):
            torch.testing.assert_close(model(ids).logits, unmerged)
    with adapters_disabled(model):
        torch.testing.assert_close(model(ids).logits, base_logits)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(model(ids).logits, unmerged, rtol=1e-5, atol=1e-5)
    plain = _model(fused)
    plain.load_state_dict(model.state_dict())  # merged = ordinary state dict, same keys
    torch.testing.assert_close(plain.eval()(ids).logits, unmerged, rtol=1e-5, atol=1e-5)


def test_adapter_state_is_small_and_proportional_to_the_rank():
    sizes = {}
    for rank in (2, 4, 8):
        model = _model()
        apply_lora(model, rank=rank)
        state = lora_state_dict(model)
        assert all(".lora_" in k for k in state)
        sizes[rank] = sum(t.numel() for t in state.values())
    assert sizes[4] == 2 * sizes[2] and sizes[8] == 4 * sizes[2]
    # one adapter pair per target: rank * (d_in + d_out)
    c = _model().config
    kv = c.num_kv_heads * c.head_dim
    per_layer = 2 * (2 * c.d_model) + 2 * (c.d_model + kv) + 2 * (c.d_model + c.d_ff) + (c.d_ff + c.d_model)
    assert sizes[2] == 2 * c.num_layers * per_layer


def test_unknown_and_missing_targets_are_named():
    with pytest.raises(UserError, match="unknown target 'qq'"):
        parse_targets("q,qq")
    model = _model()
    del model.layers[1].ffn.w3
    with pytest.raises(UserError, match=r"layers\.1\.ffn\.w3"):
        apply_lora(model, rank=2)
    assert parse_targets("attn,lm_head") == (["q", "k", "v", "o"], ["lm_head"])


def test_lora_b_gets_the_gradient_of_the_reference_formula():
    """d/dB of scale·(x Aᵀ) Bᵀ checked against autograd on the written-out float64 expression."""
    torch.manual_seed(1)
    from diyllm.model.layers import Linear

    lin = Linear(6, 5).double()
    layer = LoRALinear(lin, rank=3, alpha=6).double()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 6, dtype=torch.float64)
    W, A, B = lin.weight.detach(), layer.lora_A.detach().clone().requires_grad_(), layer.lora_B.detach().clone()
    B.requires_grad_()
    ref = (x @ W.t() + 2.0 * (x @ A.t()) @ B.t()).pow(2).sum()
    ref.backward()
    layer(x).pow(2).sum().backward()
    torch.testing.assert_close(layer.lora_A.grad, A.grad)
    torch.testing.assert_close(layer.lora_B.grad, B.grad)
