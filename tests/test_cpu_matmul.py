"""The oneDNN matmul fast path (model/cpu_matmul.py) equals the plain x @ W.t(), forward and backward, at
the training shapes of benchmarks/bench_train.py and on torch's default thread count; and the rule that
picks it is the documented one."""

from __future__ import annotations

import os

import pytest
import torch

from diyllm.model import cpu_matmul
from diyllm.model.cpu_matmul import OneDNNLinearFunction, linear, onednn_available, set_cpu_matmul, use_onednn

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this torch build cannot run oneDNN's matmul")


@pytest.fixture
def backend(monkeypatch):
    """Set the process's backend for one test; the env var and the cached choice are restored after."""
    monkeypatch.delenv(cpu_matmul.ENV_VAR, raising=False)
    cpu_matmul.onednn_enabled.cache_clear()
    yield set_cpu_matmul
    monkeypatch.delenv(cpu_matmul.ENV_VAR, raising=False)
    cpu_matmul.onednn_enabled.cache_clear()


def max_rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest difference relative to the largest entry: float32 sums of hundreds of terms differ in the
    last bits between kernels, which an elementwise rtol misreads where an entry is near zero."""
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def errors_against_float64(fn, x64, w64, dy64):
    """Relative max errors of y, dx and dW computed in float32 by `fn`, against the float64 product."""
    exact_x, exact_w = x64.clone().requires_grad_(), w64.clone().requires_grad_()
    (exact_x @ exact_w.t()).backward(dy64)
    exact = (exact_x @ exact_w.t()).detach(), exact_x.grad, exact_w.grad
    x, w = x64.float().requires_grad_(), w64.float().requires_grad_()
    y = fn(x, w)
    y.backward(dy64.float())
    return [max_rel_err(got, e) for got, e in zip((y, x.grad, w.grad), exact)]


@needs_onednn
@pytest.mark.parametrize("rows, d_in, d_out", [(16 * 256, 384, 1024), (16 * 256, 1024, 384), (12 * 64, 128, 65)])
def test_fast_equals_plain_at_training_shapes(rows, d_in, d_out):
    torch.manual_seed(0)
    x64 = torch.randn(rows // 64, 64, d_in, dtype=torch.float64)
    w64 = torch.randn(d_out, d_in, dtype=torch.float64) / d_in**0.5
    dy64 = torch.randn(rows // 64, 64, d_out, dtype=torch.float64)
    plain = errors_against_float64(lambda x, w: x @ w.t(), x64, w64, dy64)
    fast = errors_against_float64(OneDNNLinearFunction.apply, x64, w64, dy64)
    # As exact as float32 allows: a sum of K products rounds by about sqrt(K) float32 epsilons (y sums
    # over d_in, dx over d_out, dW over the rows). MKL lands at 3e-7-5e-7; oneDNN on an AVX2 CPU sums in
    # another order and lands nearer the bound (up to 1.6e-6, y at d_in 1024); a bf16 kernel would be ~4e-3.
    for name, p, f, terms in zip(("y", "dx", "dW"), plain, fast, (d_in, d_out, rows)):
        assert f < max(4 * p, 4 * terms**0.5 * 2.0**-24), (name, f, p)


@needs_onednn
def test_strided_inputs_and_frozen_sides():
    """A non-contiguous input (a transposed view), a frozen weight (LoRA's base) and an input without grad
    (the first layer's) each give the plain path's gradients."""
    torch.manual_seed(0)
    w = torch.randn(96, 160)
    x = torch.randn(160, 4, 64).permute(1, 2, 0)  # (4, 64, 160), not contiguous
    for x_grad, w_grad in ((True, False), (False, True), (True, True)):
        xs, ws = x.clone().requires_grad_(x_grad), w.clone().requires_grad_(w_grad)
        xr, wr = x.clone().requires_grad_(x_grad), w.clone().requires_grad_(w_grad)
        y = OneDNNLinearFunction.apply(xs, ws)
        y_ref = xr @ wr.t()
        assert max_rel_err(y, y_ref) < 1e-5
        y.square().sum().backward()
        y_ref.square().sum().backward()
        for got, ref in ((xs.grad, xr.grad), (ws.grad, wr.grad)):
            assert (got is None) == (ref is None)
            if got is not None:
                assert max_rel_err(got, ref) < 1e-5


@needs_onednn
def test_a_training_step_of_the_model_agrees_on_both_backends(backend):
    """The medium shape's loss and every gradient: oneDNN against BLAS, the model as the trainer runs it."""
    from diyllm.model import DIYConfig, DIYForCausalLM

    torch.manual_seed(0)
    model = DIYForCausalLM(DIYConfig(vocab_size=65, context_length=256, d_model=384, num_layers=2, num_heads=6,
                                     d_ff=1024))
    ids = torch.randint(0, 65, (8, 257))
    results = {}
    for choice in ("blas", "onednn"):
        backend(choice)
        model.zero_grad(set_to_none=True)
        loss = model(ids[:, :-1], targets=ids[:, 1:]).loss
        loss.backward()
        results[choice] = loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}
    (loss_b, grads_b), (loss_o, grads_o) = results["blas"], results["onednn"]
    assert loss_o == pytest.approx(loss_b, rel=1e-5)
    for name, g in grads_b.items():
        assert max_rel_err(grads_o[name], g) < 1e-4, name


@needs_onednn
def test_the_path_is_taken_only_where_it_pays(backend):
    backend("onednn")
    big, w = torch.randn(16, 64, 384), torch.randn(384, 384, requires_grad=True)
    assert use_onednn(big, w)  # a training step's product
    assert use_onednn(big, w.detach())  # a full evaluation batch (1024 rows), no backward
    assert not use_onednn(big[:8], w.detach())  # a prompt of 512 rows: a new oneDNN kernel per length
    assert not use_onednn(torch.randn(2, 128, requires_grad=True), torch.randn(128, 128))  # too small to pay
    with torch.no_grad():
        assert not use_onednn(big[:8], w)  # recorded nothing: inference
        assert use_onednn(torch.randn(1, 1, 768), torch.randn(2048, 768))  # a decoding step's wide MLP
        assert use_onednn(torch.randn(8, 1, 768), torch.randn(2048, 768))  # ... for a batch of 8
        assert not use_onednn(torch.randn(1, 1, 768), torch.randn(768, 768))  # even on both: BLAS
        assert not use_onednn(torch.randn(1, 9, 768), torch.randn(2048, 768))  # a prompt: a new shape each time
    w = w.detach()
    assert not use_onednn(big.double(), w.double())  # float64 (gradcheck, references) stays exact BLAS
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not use_onednn(big, w)  # autocast would be bypassed
    backend("blas")
    assert not use_onednn(big, w)
    backend("onednn")
    with torch.no_grad():  # no-grad products (evaluation, prefill) take the op without the autograd Function
        assert max_rel_err(linear(big, w), big @ w.t()) < 1e-5
    x = big.clone().requires_grad_()
    assert linear(x, w).grad_fn.name() == "OneDNNLinearFunctionBackward"
    compiled = torch.compile(lambda a, b: linear(a, b), backend="eager")  # traced: the plain matmul
    assert torch.equal(compiled(big, w), big @ w.t())


@needs_onednn
def test_cached_greedy_decoding_gives_the_same_tokens_on_both_backends(backend):
    """Decoding steps' large products take oneDNN, the prompt's BLAS: the same greedy tokens, and the
    head's logits equal to float32 rounding."""
    from diyllm.generation import generate
    from diyllm.model import DIYConfig, DIYForCausalLM

    torch.manual_seed(0)
    model = DIYForCausalLM(DIYConfig(vocab_size=8192, context_length=128, d_model=512, num_layers=2, num_heads=8,
                                     d_ff=1536)).eval()
    prompt = torch.randint(0, 8192, (1, 12))
    calls = []
    original = cpu_matmul._onednn_mm
    tokens = {}
    for choice in ("blas", "onednn"):
        backend(choice)
        cpu_matmul._onednn_mm = lambda a, b: calls.append((a.shape[0], b.shape[0])) or original(a, b)
        try:
            tokens[choice] = generate(model, prompt, 16, temperature=0)
        finally:
            cpu_matmul._onednn_mm = original
    assert tokens["blas"] == tokens["onednn"]
    # One row each: the head for all 16 tokens (the prompt's forward scores its last row only) and the
    # stacked w1|w3 (512 → 3072) of the 15 steps after the prompt, in both layers; nothing else pays.
    assert sorted(set(calls)) == [(1, 3072), (1, 8192)]
    assert calls.count((1, 8192)) == 16 and calls.count((1, 3072)) == 30
    x = torch.randn(1, 1, 512)
    with torch.no_grad():
        assert max_rel_err(linear(x, model.lm_head.weight), x @ model.lm_head.weight.t()) < 1e-5


def test_auto_rule_and_bad_choices(backend, monkeypatch):
    cases = {("AuthenticAMD", 26): True, ("AuthenticAMD", 25): False, ("GenuineIntel", 6): False}
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    for vendor_family, expected in cases.items():
        monkeypatch.setattr(cpu_matmul, "_cpu_vendor_and_family", lambda vf=vendor_family: vf)
        assert cpu_matmul.auto_prefers_onednn() is expected, vendor_family
    monkeypatch.setattr(cpu_matmul, "_cpu_vendor_and_family", lambda: ("AuthenticAMD", 26))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not cpu_matmul.auto_prefers_onednn()  # a torch build or CPU without AVX-512
    with pytest.raises(ValueError, match="one of auto, onednn, blas"):
        set_cpu_matmul("mkl")
    monkeypatch.setenv(cpu_matmul.ENV_VAR, "onedn")
    cpu_matmul.onednn_enabled.cache_clear()
    with pytest.warns(UserWarning, match="DIYLLM_CPU_MATMUL='onedn' is not one of"):
        cpu_matmul.onednn_enabled()


def test_the_run_header_names_the_choice(backend, monkeypatch):
    backend("blas")
    assert cpu_matmul.describe() == "blas (DIYLLM_CPU_MATMUL=blas)"
    monkeypatch.setattr(cpu_matmul, "onednn_available", lambda: True)
    monkeypatch.setattr(cpu_matmul, "auto_prefers_onednn", lambda: True)
    backend("auto")
    assert cpu_matmul.describe() == "onednn (auto: an AMD Zen 5 or later with AVX-512)"
    monkeypatch.setattr(cpu_matmul, "auto_prefers_onednn", lambda: False)
    backend("auto")
    assert cpu_matmul.describe() == "blas"
    backend("onednn")
    assert cpu_matmul.describe() == "onednn (DIYLLM_CPU_MATMUL=onednn)"


def test_the_choice_block_puts_the_env_var_back(backend, monkeypatch):
    with cpu_matmul.cpu_matmul_choice("blas"):
        assert cpu_matmul.requested() == "blas" and not cpu_matmul.onednn_enabled()
    assert cpu_matmul.ENV_VAR not in os.environ  # unset before: unset after
    monkeypatch.setenv(cpu_matmul.ENV_VAR, " Auto ")
    with cpu_matmul.cpu_matmul_choice("blas"):
        assert not cpu_matmul.onednn_enabled()
    assert os.environ[cpu_matmul.ENV_VAR] == " Auto " and cpu_matmul.requested() == "auto"


def test_windows_processor_string_is_read(monkeypatch):
    cpu_matmul._cpu_vendor_and_family.cache_clear()
    def no_proc(*args, **kwargs):
        raise OSError("no /proc/cpuinfo")

    monkeypatch.setattr(cpu_matmul, "open", no_proc, raising=False)  # the module's name lookup finds it first
    monkeypatch.setattr(cpu_matmul.platform, "processor", lambda: "AMD64 Family 26 Model 68 Stepping 0, AuthenticAMD")
    try:
        assert cpu_matmul._cpu_vendor_and_family() == ("AuthenticAMD", 26)
    finally:
        cpu_matmul._cpu_vendor_and_family.cache_clear()
