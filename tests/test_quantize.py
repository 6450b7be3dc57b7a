"""Int8 decoding (model/quantize.py): the rounding bound, the kernel equals the dequantized matmul, logits
close to float32, compiled = eager tokens, and the copy never goes stale or touches the original model;
the same for w8a8 (int8 activations too), whose int8 products must equal the integer formula exactly."""

from __future__ import annotations

import warnings

import pytest
import torch

from diyllm.generation import compiled
from diyllm.generation.generate import generate, iter_steps, quantized_copy
from diyllm.model import DIYConfig, DIYForCausalLM
from diyllm.model.layers import Linear
from diyllm.model.quantize import (
    HAS_INT8_MM,
    HAS_INT_MM,
    Int8Linear,
    W8A8Linear,
    is_quantized,
    quantize_int8,
    quantize_rows,
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = DIYConfig(vocab_size=97, context_length=48, d_model=128, num_layers=2, num_heads=4, num_kv_heads=2,
                    d_ff=344)  # w2's inner width 344 is not a multiple of the int8 kernel's block of 16
    m = DIYForCausalLM(cfg).eval()
    with torch.no_grad():  # sharper logits than at init, so greedy choices are far from ties
        m.lm_head.weight.mul_(8)
    return m


def test_rounding_error_is_at_most_half_a_step_per_row():
    torch.manual_seed(0)
    w = torch.randn(64, 96) * torch.logspace(-2, 1, 64)[:, None]  # rows of very different scales
    lin = Int8Linear(w, act_dtype=torch.float32)
    step = lin.scale.float()[:, None]
    err = (lin.dequantized(torch.float32) - w).abs()
    assert (err <= step / 2 + 1e-6 * step).all()
    assert lin.weight_int8.abs().max() == 127  # each row's largest weight uses the full range


@pytest.mark.skipif(not HAS_INT8_MM, reason="this torch has no aten._weight_int8pack_mm")
@pytest.mark.parametrize("in_features", [96, 344, 40])  # 344 = the CPU configs' d_ff: not a multiple of 16
def test_the_int8_kernel_equals_the_dequantized_matmul(in_features):
    torch.manual_seed(0)
    lin = Int8Linear(torch.randn(160, in_features))
    x = torch.randn(3, 5, in_features).bfloat16()
    fast = lin(x)  # bf16 on CPU: torch's int8 kernel
    plain = (x.float() @ lin.dequantized(torch.float32).t())
    torch.testing.assert_close(fast.float(), plain, rtol=2e-2, atol=2e-2 * plain.abs().max().item())


def test_quantized_copy_is_close_and_the_original_is_untouched(model):
    q = quantize_int8(model)
    assert is_quantized(q) and not is_quantized(model)
    assert all(isinstance(m, Int8Linear) for m in (q.lm_head, q.layers[0].attn.stacked_proj, q.layers[1].ffn.w2))
    assert isinstance(model.lm_head, Linear) and model.lm_head.weight.dtype == torch.float32
    assert q.token_embeddings.weight.dtype == torch.bfloat16 and q.rope.cos.dtype == torch.float32
    ids = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        want, got = model(ids).logits, q(ids).logits.float()
    assert ((got - want).abs().max() / want.abs().max()) < 0.03
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


def test_lora_adapters_are_merged_into_the_quantized_weights(model):
    """A LoRA-wrapped model quantizes as its merged model would: the adapters are not dropped."""
    import copy

    from diyllm.model.lora import apply_lora, has_lora, merge_lora

    tuned = copy.deepcopy(model)
    apply_lora(tuned, rank=4, alpha=8)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.3)  # adapters that move the logits well beyond int8's rounding
    merged = merge_lora(copy.deepcopy(tuned))
    ids = torch.randint(0, 97, (2, 40))
    q = quantize_int8(tuned)
    assert has_lora(tuned) and not has_lora(q)  # the wrapped original stays as it was
    with torch.no_grad():
        got, want, base = q(ids).logits.float(), merged(ids).logits, model(ids).logits
    assert (want - base).abs().max() > 10 * (got - want).abs().max()  # close to merged, far from the base
    assert ((got - want).abs().max() / want.abs().max()) < 0.03


def test_stacked_projections_give_the_separate_int8_matmuls_logits_exactly(model):
    """q|k|v and w1|w3 as one Int8Linear each: per-row quantization gives each row the same int8 values
    and scale either way, and the kernel's sum for one output row does not depend on the other rows, so
    the logits are bit for bit the unstacked copy's. Each int8 byte is held once, and the float model's
    state_dict keys are untouched."""
    keys = list(model.state_dict())
    stacked, separate = quantize_int8(model), quantize_int8(model, stack=False)
    attn, ffn = stacked.layers[0].attn, stacked.layers[0].ffn
    assert attn.q_proj is None and attn.stacked_proj.out_features == 128 + 2 * 64  # 4 query heads, 2 kv heads
    assert ffn.w1 is None and ffn.w3 is None and ffn.stacked_proj.out_features == 2 * 344
    assert separate.layers[0].attn.stacked_proj is None and isinstance(separate.layers[0].attn.q_proj, Int8Linear)
    int8_calls = [m for m in stacked.modules() if isinstance(m, Int8Linear)]
    assert len(int8_calls) == 2 * 4 + 1  # per layer: qkv, output, w13, w2; plus the head (unstacked: 2 * 7 + 1)

    def nbytes(m):
        return sum(t.numel() * t.element_size() for t in m.buffers())

    assert nbytes(stacked) == nbytes(separate)
    ids = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        assert torch.equal(stacked(ids).logits, separate(ids).logits)
    assert list(model.state_dict()) == keys and model.layers[0].attn.stacked_proj is None


def test_the_copy_is_remade_when_the_weights_change(model):
    first = quantized_copy(model)
    assert quantized_copy(model) is first  # cached: quantized once
    with torch.no_grad():
        model.layers[0].ffn.w1.weight.mul_(1.0)  # an in-place update, like an optimizer step
    again = quantized_copy(model)
    assert again is not first


@pytest.mark.skipif(compiled.compile_unavailable_reason(torch.device("cpu")) is not None,
                    reason="no C++ compiler for inductor")
def test_compiled_int8_decoding_agrees_with_eager_int8(model):
    """bfloat16 activations: inductor keeps fused elementwise chains in float32 where eager rounds after
    every op, so the two agree to bf16 rounding, not bit for bit (the float32 paths agree exactly:
    tests/test_compiled_decode.py). The first steps' logits must match to that rounding."""
    prompts = [[5, 17, 3, 9, 44], [1, 2, 3, 4, 5, 6, 7, 8, 9]]
    with warnings.catch_warnings():
        warnings.simplefilter("error", compiled.CompiledDecodeWarning)  # a silent fallback would pass otherwise
        fast = list(iter_steps(model, prompts, 3, temperature=0, quantize="int8", compile=True))
    plain = list(iter_steps(model, prompts, 3, temperature=0, quantize="int8"))
    first_c, first_e = fast[0].logits.float(), plain[0].logits.float()
    torch.testing.assert_close(first_c, first_e, rtol=0, atol=0.03 * first_e.abs().max().item())
    assert torch.equal(fast[0].tokens, plain[0].tokens)
    assert len(generate(model, prompts, 60, temperature=0, quantize="int8", compile=True)[1]) == 60  # slides on


def test_unknown_quantization_is_refused(model):
    with pytest.raises(ValueError, match="quantize='int4' must be one of"):
        generate(model, [1, 2], 3, quantize="int4")


def test_sample_cli_quantize_int8(tiny_char_checkpoint, capsys):
    from diyllm.cli import main

    m, tok, path = tiny_char_checkpoint
    assert main(["sample", "--ckpt", str(path), "--prompt", "abc", "--max_new_tokens", "20", "--temperature", "0",
                 "--device", "cpu", "--quantize", "int8"]) == 0
    out = capsys.readouterr().out
    want = generate(m, tok.encode("abc"), 20, temperature=0, quantize="int8")[0]
    assert out == "abc" + tok.decode(want) + "\n"
    with pytest.raises(SystemExit) as exit_info:  # argparse: one usage error line, exit 2
        main(["sample", "--ckpt", str(path), "--quantize", "int4"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'int4'" in capsys.readouterr().err


# ---- w8a8: int8 activations (per-row dynamic scales) ------------------------------------------------------------
def test_activation_rounding_is_at_most_half_a_step_per_row():
    torch.manual_seed(0)
    x = torch.randn(6, 40) * torch.logspace(-3, 2, 6)[:, None]
    q, s = quantize_rows(x)
    assert q.dtype == torch.int8 and s.shape == (6, 1)
    assert ((q.float() * s - x).abs() <= s / 2 + 1e-6 * s).all()
    assert (q.abs().amax(dim=1) == 127).all()


@pytest.mark.parametrize("in_features", [96, 344, 40])  # 344, 40: padded to the kernel's block of 16
def test_w8a8_matmul_is_the_integer_formula_exactly_and_close_to_float(in_features):
    """The int8·int8 sums are integers, so the kernel (torch._int_mm on CPU) must give exactly what the
    same integers give in float64; and the whole product stays close to the float32 matmul."""
    torch.manual_seed(0)
    w = torch.randn(160, in_features)
    lin = W8A8Linear(w, act_dtype=torch.float32)
    x = torch.randn(3, 5, in_features)
    got = lin(x)
    q, s_x = quantize_rows(x.reshape(-1, in_features))
    dots = q.double() @ lin.weight_int8[:, :in_features].double().t()
    want = (dots.float() * s_x * lin.scale.float()).reshape(3, 5, 160)
    assert torch.equal(got, want)
    ref = x @ w.t()
    assert ((got - ref).abs().max() / ref.abs().max()) < 0.02
    if HAS_INT_MM:  # the fast path is the one taken on CPU
        calls = []
        real = torch._int_mm
        try:
            torch._int_mm = lambda a, b: calls.append(a.shape) or real(a, b)
            lin(x)
        finally:
            torch._int_mm = real
        assert calls == [(15, in_features + (-in_features % 16))]


def test_w8a8_copy_is_close_stacked_equals_separate_and_is_cached_apart(model):
    q8 = quantize_int8(model, activations="int8")
    assert isinstance(q8.lm_head, W8A8Linear) and isinstance(q8.layers[0].attn.stacked_proj, W8A8Linear)
    separate = quantize_int8(model, stack=False, activations="int8")
    ids = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        want, got = model(ids).logits, q8(ids).logits.float()
        assert torch.equal(q8(ids).logits, separate(ids).logits)  # one rounding of x serves q, k and v
    assert ((got - want).abs().max() / want.abs().max()) < 0.04
    assert quantized_copy(model, "w8a8") is quantized_copy(model, "w8a8")
    assert quantized_copy(model, "w8a8") is not quantized_copy(model, "int8")
    with pytest.raises(ValueError, match="activations='fp8'"):
        quantize_int8(model, activations="fp8")


@pytest.mark.skipif(compiled.compile_unavailable_reason(torch.device("cpu")) is not None,
                    reason="no C++ compiler for inductor")
def test_compiled_w8a8_decoding_agrees_with_eager_w8a8(model):
    """As for int8: inductor may round the activations' float chain differently (bf16), so logits agree to
    that rounding and the greedy tokens of the first steps are the same."""
    prompts = [[5, 17, 3, 9, 44], [1, 2, 3, 4, 5, 6, 7, 8, 9]]
    with warnings.catch_warnings():
        warnings.simplefilter("error", compiled.CompiledDecodeWarning)
        fast = list(iter_steps(model, prompts, 3, temperature=0, quantize="w8a8", compile=True))
    plain = list(iter_steps(model, prompts, 3, temperature=0, quantize="w8a8"))
    for f, p in zip(fast, plain):
        torch.testing.assert_close(f.logits.float(), p.logits.float(), rtol=0,
                                   atol=0.03 * p.logits.float().abs().max().item())
        assert torch.equal(f.tokens, p.tokens)


def test_sample_cli_quantize_w8a8(tiny_char_checkpoint, capsys):
    from diyllm.cli import main

    m, tok, path = tiny_char_checkpoint
    assert main(["sample", "--ckpt", str(path), "--prompt", "abc", "--max_new_tokens", "20", "--temperature", "0",
                 "--device", "cpu", "--quantize", "w8a8"]) == 0
    want = generate(m, tok.encode("abc"), 20, temperature=0, quantize="w8a8")[0]
    assert capsys.readouterr().out == "abc" + tok.decode(want) + "\n"
