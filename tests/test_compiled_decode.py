"""Compiled decoding (generation/compiled.py) gives the eager cached path's tokens: greedy, batched and
left-padded rows, top-k/top-p sampling with a seed, through a sliding window; falls back with one warning.

One model and one batch size nearly throughout, so the module pays for two compiles (the expensive
part on a 2-core CPU; the second for batch 1 on a second model); every other check reuses the
compiled step. Spans are multiples of 8 here (64 by default), so that on this 32-column cache every
check also runs through the narrowed spans 16..32.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from diyllm.generation import compiled, step_guards
from diyllm.generation.generate import generate, iter_steps
from diyllm.model import DIYConfig, DIYForCausalLM
from diyllm.model.kv_cache import StaticKVCache

PROMPTS = [[5, 17, 3, 9, 44], [1, 2, 3, 4, 5, 6, 7, 8, 9]]  # different lengths: left padding


@pytest.fixture(autouse=True)
def narrow_spans(monkeypatch):
    monkeypatch.setattr(compiled, "SPAN_MULTIPLE", 8)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = DIYConfig(vocab_size=61, context_length=32, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    d_ff=128)
    m = DIYForCausalLM(cfg).eval()
    with torch.no_grad():  # sharper logits than at init, so greedy choices are far from ties
        m.lm_head.weight.mul_(8)
    return m


@pytest.mark.skipif(compiled.compile_unavailable_reason(torch.device("cpu")) is not None,
                    reason="no C++ compiler for inductor")
def test_compiled_decoding_gives_the_eager_tokens(model):
    torch._dynamo.utils.counters.clear()  # graphs compiled by earlier tests (training with compile=true) do not count
    with warnings.catch_warnings():
        warnings.simplefilter("error", compiled.CompiledDecodeWarning)  # a silent fallback would pass otherwise
        steps_c = list(iter_steps(model, PROMPTS, 12, temperature=0, compile=True))
    steps_e = list(iter_steps(model, PROMPTS, 12, temperature=0))
    dec = compiled.decoder_for(model, len(PROMPTS))
    assert dec.step_fn is not compiled._step and dec.compile_seconds > 0  # it really was compiled
    for c, e in zip(steps_c, steps_e, strict=True):
        torch.testing.assert_close(c.logits, e.logits, rtol=1e-4, atol=1e-4)
        assert torch.equal(c.tokens, e.tokens)
    # 60 new tokens overflow context_length=32: both paths re-prefill the last 24 tokens and go on.
    assert generate(model, PROMPTS, 60, temperature=0, compile=True) == generate(model, PROMPTS, 60, temperature=0)
    for kw in (dict(top_k=10), dict(top_p=0.9), dict(top_k=20, top_p=0.8, repetition_penalty=1.3)):
        ours = generate(model, PROMPTS, 20, temperature=0.9, seed=7, compile=True, **kw)
        assert ours == generate(model, PROMPTS, 20, temperature=0.9, seed=7, **kw), kw
    stopped = generate(model, PROMPTS, 20, temperature=0, stop_ids=[steps_e[3].tokens[0].item()], compile=True)
    assert len(stopped[0]) <= 3
    # compiled once, reused by every call and every span width (the span is a dynamic size)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.skipif(compiled.compile_unavailable_reason(torch.device("cpu")) is not None,
                    reason="no C++ compiler for inductor")
def test_one_graph_for_every_span_at_batch_size_one():
    """Batch 1 is the common case and a layout of its own: a (1, span) view of the visible mask counts as
    contiguous whatever its row stride, which must not become a size to guard on (with one query per
    k/v head it did: a second graph when the span reached max_len). 40 new tokens fill the 32-column
    cache and slide. A second model (no grouped heads), so this is the module's second compile."""
    torch.manual_seed(1)
    cfg = DIYConfig(vocab_size=61, context_length=32, d_model=64, num_layers=2, num_heads=4, d_ff=128)
    mha = DIYForCausalLM(cfg).eval()
    torch._dynamo.utils.counters.clear()
    prompt = PROMPTS[1]
    assert generate(mha, prompt, 40, temperature=0, compile=True) == generate(mha, prompt, 40, temperature=0)
    assert compiled.decoder_for(mha, 1).last_span == 32
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.skipif(compiled.compile_unavailable_reason(torch.device("cpu")) is not None,
                    reason="no C++ compiler for inductor")
def test_the_cpu_step_reads_only_the_filled_span(model):
    """Early in a generation the step's attention covers fewer than max_len cache columns, and it never
    reads past them: NaN in those columns changes no logit, where a masked NaN that was read would
    (masked scores get probability 0, but 0·NaN is NaN in probs @ v)."""
    want = list(iter_steps(model, PROMPTS, 4, temperature=0))
    generate(model, PROMPTS, 2, temperature=0, compile=True)  # the compiled step exists (compiled by now)
    dec = compiled.decoder_for(model, len(PROMPTS))
    try:
        with torch.inference_mode():  # the cache was made in inference mode
            # prompt 9 columns + 3 decode steps at columns 9..11: spans of 16 (a multiple of 8) of 32
            dec.cache.k[..., 16:, :] = float("nan")
            dec.cache.v[..., 16:, :] = float("nan")
        got = list(iter_steps(model, PROMPTS, 4, temperature=0, compile=True))
        assert dec.last_span == 16 < dec.max_len == 32
    finally:
        with torch.inference_mode():
            dec.cache.k.zero_()
            dec.cache.v.zero_()
    for c, e in zip(got, want, strict=True):
        torch.testing.assert_close(c.logits, e.logits, rtol=1e-4, atol=1e-4)
        assert torch.equal(c.tokens, e.tokens)


def test_eager_fallback_warns_once_and_gives_the_same_tokens(model, monkeypatch):
    monkeypatch.setattr(compiled, "compile_unavailable_reason", lambda device: "no compiler (test)")
    monkeypatch.setattr(compiled, "_DECODERS", compiled.weakref.WeakKeyDictionary())
    monkeypatch.setattr(compiled, "_WARNED", set())
    with pytest.warns(compiled.CompiledDecodeWarning, match="no compiler") as caught:
        a = generate(model, PROMPTS[:1], 15, temperature=0, compile=True)
        b = generate(model, PROMPTS[1:], 15, temperature=0, compile=True)
    assert len([w for w in caught if issubclass(w.category, compiled.CompiledDecodeWarning)]) == 1
    assert a == generate(model, PROMPTS[:1], 15, temperature=0)
    assert b == generate(model, PROMPTS[1:], 15, temperature=0)
    with pytest.raises(ValueError, match="use_cache=False"):
        generate(model, PROMPTS, 3, compile=True, use_cache=False)


@pytest.mark.skipif(not step_guards.CAN_SKIP_MODEL_GUARDS, reason="this torch compiles without shared steps")
def test_a_failing_cpp_wrapper_compile_retries_without_it(model, monkeypatch):
    """The CPU step asks inductor for its C++ wrapper; where that compile fails (an older torch), the step
    is compiled again without the option before giving up on compiling (one warning), same tokens."""
    asked = []

    def shared_step(step, key, options):
        asked.append(dict(options))
        if options:
            def broken(*args):
                raise RuntimeError("C++ wrapper unsupported (test)")
            return broken
        return step  # stands in for the plain compile (no compile cost in this test)

    monkeypatch.setattr(step_guards, "shared_step", shared_step)
    monkeypatch.setattr(compiled, "_DECODERS", compiled.weakref.WeakKeyDictionary())
    monkeypatch.setattr(compiled, "_WARNED", set())
    with pytest.warns(compiled.CompiledDecodeWarning, match="without those options") as caught:
        got = generate(model, PROMPTS, 10, temperature=0, compile=True)
    assert asked == [compiled.CPU_OPTIONS, {}] and compiled.CPU_OPTIONS == {"cpp_wrapper": True}
    assert len([w for w in caught if issubclass(w.category, compiled.CompiledDecodeWarning)]) == 1
    assert not any("decoding eagerly" in str(w.message) for w in caught)
    assert compiled.decoder_for(model, len(PROMPTS)).options == {}
    assert got == generate(model, PROMPTS, 10, temperature=0)


def test_static_cache_writes_the_given_columns_and_keeps_its_tensors():
    cache = StaticKVCache(num_layers=2, batch_size=1, num_kv_heads=2, head_dim=4, max_len=8)
    before = [t.data_ptr() for t in cache.tensors()]
    k = torch.randn(1, 2, 1, 4)
    cache.index.fill_(5)
    k_all, v_all = cache.update(1, k, -k)
    assert k_all.shape == (1, 2, 8, 4) and torch.equal(k_all[:, :, 5:6], k) and torch.equal(v_all[:, :, 5:6], -k)
    assert cache.k[0].abs().sum() == 0 and cache.k[1, :, :, :5].abs().sum() == 0
    assert [t.data_ptr() for t in cache.tensors()] == before and cache.length == 0
    assert cache.k.shape[3] == 9  # one spare column, never returned: no span's view is the whole buffer


def test_sample_cli_compile_flag(tiny_char_checkpoint, capsys, monkeypatch):
    """`diyllm sample --compile` streams the eager tokens and reports how it decoded (here the fallback,
    so the test pays no compile)."""
    from diyllm.cli import main

    monkeypatch.setattr(compiled, "compile_unavailable_reason", lambda device: "no compiler (test)")
    monkeypatch.setattr(compiled, "_WARNED", set())
    m, tok, path = tiny_char_checkpoint
    assert main(["sample", "--ckpt", str(path), "--prompt", "abc", "--max_new_tokens", "40", "--temperature", "0",
                 "--device", "cpu", "--compile"]) == 0
    out, err = capsys.readouterr()
    assert out == "abc" + tok.decode(generate(m, tok.encode("abc"), 40, temperature=0)[0]) + "\n"
    assert "compile unavailable, eager" in err and "no compiler (test)" in err
    assert main(["sample", "--ckpt", str(path), "--compile", "--no_cache"]) == 2
    assert "--no_cache" in capsys.readouterr().err


@pytest.mark.skipif(compiled.compile_unavailable_reason(torch.device("cpu")) is not None,
                    reason="no C++ compiler for inductor")
@pytest.mark.skipif(not step_guards.CAN_SKIP_MODEL_GUARDS, reason="this torch keeps Dynamo's guards on the model")
def test_models_share_a_graph_only_while_their_structure_matches(model):
    """The CPU step drops Dynamo's per-call guards on the model and the cache and compares a structural
    signature once per generation instead (generation/step_guards.py). A second model of the same shape
    runs the same graph with its own weights and gets its own tokens, weights changed in place are used
    as they are, and a model changed in place gets a graph of its own."""
    generate(model, PROMPTS, 2, temperature=0, compile=True)  # the fixture model's graph exists
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(3)
    other = DIYForCausalLM(model.config).eval()  # same shape, other weights
    with torch.no_grad():
        other.lm_head.weight.mul_(8)
    ours = generate(other, PROMPTS, 12, temperature=0, compile=True)
    assert ours == generate(other, PROMPTS, 12, temperature=0) != generate(model, PROMPTS, 12, temperature=0)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0  # no new graph: the shape's one
    with torch.no_grad():
        other.lm_head.weight.neg_()  # an in-place update, as an optimizer step makes
    assert generate(other, PROMPTS, 12, temperature=0, compile=True) == generate(other, PROMPTS, 12, temperature=0)
    other.layers[1].attn.qk_norm = True  # same tensors, another computation
    changed = generate(other, PROMPTS, 12, temperature=0, compile=True)
    assert changed == generate(other, PROMPTS, 12, temperature=0)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # compiled for the new structure


@pytest.mark.skipif(compiled.compile_unavailable_reason(torch.device("cpu")) is not None,
                    reason="no C++ compiler for inductor")
@pytest.mark.skipif(not step_guards.CAN_SKIP_MODEL_GUARDS, reason="this torch compiles without shared steps")
def test_shared_steps_are_bounded_and_a_dropped_one_is_freed(monkeypatch):
    """Past MAX_SHARED_STEPS the least recently used compiled step is dropped, and with it the graphs
    Dynamo kept for it (on its own copy of the code object); the original function's code holds none."""
    import gc
    import weakref
    from collections import OrderedDict

    from torch._dynamo.eval_frame import _get_total_cache_entry_count

    monkeypatch.setattr(step_guards, "MAX_SHARED_STEPS", 2)
    monkeypatch.setattr(step_guards, "_SHARED_STEPS", OrderedDict())

    def add_one(x):
        return x + 1

    x = torch.ones(3)
    steps = {k: step_guards.shared_step(add_one, ("test", k)) for k in range(2)}
    assert all(torch.equal(step(x), x + 1) for step in steps.values())  # two tiny graphs compiled
    copies = {k: step._torchdynamo_orig_callable for k, step in steps.items()}
    assert copies[0] is not add_one and copies[0].__code__ is not copies[1].__code__
    assert [_get_total_cache_entry_count(c) for c in copies.values()] == [1, 1]
    assert _get_total_cache_entry_count(add_one) == 0
    assert step_guards.shared_step(add_one, ("test", 0)) is steps[0]  # a hit, now the most recent
    step_guards.shared_step(add_one, ("test", 2))  # the third key drops key 1, the least recently used
    assert list(step_guards._SHARED_STEPS) == [("test", 0), ("test", 2)]
    dropped = weakref.ref(copies.pop(1))
    del steps[1]
    gc.collect()
    assert dropped() is None  # nothing keeps the dropped step's code (or its graphs) alive
    assert torch.equal(steps[0](x), x + 1) and _get_total_cache_entry_count(copies[0]) == 1
