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


# ---- adapter checkpoints, merge, export ------------------------------------------------------------------


def _base_checkpoint(tmp_path, seed=0):
    from diyllm.data.chat_template import add_chat_tokens
    from diyllm.tokenizers import BPETokenizer
    from diyllm.training.checkpoint import save_checkpoint

    tok = BPETokenizer({i: bytes([i]) for i in range(256)}, [], special_tokens=["<|endoftext|>"])
    add_chat_tokens(tok)
    tok.save(tmp_path / "tok.json")
    torch.manual_seed(seed)
    model = DIYForCausalLM(DIYConfig(vocab_size=tok.vocab_size, context_length=16, d_model=32, num_layers=2,
                                     num_heads=4, d_ff=64))
    path = tmp_path / "base.pt"
    save_checkpoint(model, None, 0, path, model_config=model.config.to_dict(),
                    tokenizer=(tmp_path / "tok.json").read_text())
    return path


def _adapter_checkpoint(tmp_path, base_path, rank):
    from diyllm.training.checkpoint import load_model, save_checkpoint
    from diyllm.training.lora_checkpoint import adapter_entries, base_reference

    model, _, saved = load_model(base_path)
    ref = base_reference(str(base_path), model)
    apply_lora(model, rank=rank, alpha=2 * rank)
    _randomise_b(model)
    entries = adapter_entries(model, ref)
    out = tmp_path / f"lora{rank}.pt"
    save_checkpoint(model, None, 5, out, model_state=entries["model"],  # adapters only, as a LoRA run writes
                    model_config=model.config.to_dict(), tokenizer=saved["tokenizer"], lora=entries["lora"])
    return out, model.eval()


def test_adapter_checkpoints_reload_merge_and_refuse_a_changed_base(tmp_path, capsys):
    from diyllm.cli import main
    from diyllm.training.checkpoint import load_model

    base = _base_checkpoint(tmp_path)
    ids = torch.randint(0, 250, (2, 10))
    sizes = {}
    for rank in (4, 8, 16):
        path, trained = _adapter_checkpoint(tmp_path, base, rank)
        sizes[rank] = path.stat().st_size
    want = trained(ids).logits
    loaded, tok, saved = load_model(path)  # base + adapters, unmerged
    assert "lora" in saved and tok is not None and any(isinstance(m, LoRALinear) for m in loaded.modules())
    torch.testing.assert_close(loaded(ids).logits, want)
    # file size = fixed part (tokenizer text, config) + 4 bytes x rank x sum(d_in + d_out) over adapters
    c = loaded.config
    per_rank = 4 * c.num_layers * (4 * c.d_model + 2 * (c.d_model + c.num_kv_heads * c.head_dim)
                                   + 3 * (c.d_model + c.d_ff))
    assert sizes[8] - sizes[4] == pytest.approx(4 * per_rank, rel=0.05)
    assert sizes[16] - sizes[8] == pytest.approx(8 * per_rank, rel=0.05)
    assert "layers.0.attn.q_proj.weight" not in saved["model"]  # no base weights inside

    merged = tmp_path / "merged.pt"
    assert main(["lora", "merge", "--ckpt", str(path), "--out", str(merged)]) == 0
    plain, _, msaved = load_model(merged)
    assert "lora" not in msaved and not any(isinstance(m, LoRALinear) for m in plain.modules())
    torch.testing.assert_close(plain(ids).logits, want, rtol=1e-5, atol=1e-5)
    assert main(["lora", "merge", "--ckpt", str(path), "--out", str(merged)]) == 2  # refuses to overwrite
    assert main(["lora", "merge", "--ckpt", str(base), "--out", str(tmp_path / "x.pt")]) == 2
    assert "not a LoRA checkpoint" in capsys.readouterr().err

    _base_checkpoint(tmp_path, seed=1)  # the base file changes under the adapters
    with pytest.raises(UserError, match="has changed"):
        load_model(path)


def test_merged_lora_export_loads_in_transformers_with_equal_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    from diyllm.interop.hf import export_checkpoint

    base = _base_checkpoint(tmp_path)
    path, trained = _adapter_checkpoint(tmp_path, base, 4)
    from diyllm.training.lora_cli import merge_checkpoint

    merge_checkpoint(str(path), str(tmp_path / "merged.pt"))
    ids = torch.randint(0, 250, (2, 10))
    # the merged file, and the adapter checkpoint itself (export folds base + adapters), give the same model
    for src, dst in ((tmp_path / "merged.pt", "hf"), (path, "hf_from_adapters")):
        out = export_checkpoint(src, tmp_path / dst)
        hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        with torch.no_grad():
            torch.testing.assert_close(hf(ids).logits, trained(ids).logits, rtol=1e-4, atol=1e-4)
