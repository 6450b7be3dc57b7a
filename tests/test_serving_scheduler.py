"""The server's decode loop without HTTP: continuous batching gives every row what it would get alone."""

from __future__ import annotations

import threading

import pytest
import torch

from diyllm.generation.generate import generate
from diyllm.model import DIYConfig, DIYForCausalLM
from diyllm.serving.scheduler import BatchScheduler, GenerationRequest, QueueFull
from diyllm.serving.slots import SlotKVCache
from diyllm.tokenizers import BPETokenizer


def _model(seed: int = 0) -> DIYForCausalLM:
    torch.manual_seed(seed)
    model = DIYForCausalLM(DIYConfig(vocab_size=257, context_length=96, d_model=64, num_layers=2, num_heads=4,
                                     num_kv_heads=2)).eval()
    with torch.no_grad():  # a random init is nearly uniform: sharpen it so greedy never meets a near-tie
        model.lm_head.weight.mul_(20)
    return model


def _tokenizer() -> BPETokenizer:
    return BPETokenizer({i: bytes([i]) for i in range(256)}, [], special_tokens=["<|endoftext|>"])


class Collector:
    """Gathers one request's events (called from the decode thread)."""

    def __init__(self, n: int = 1):
        self.texts, self.reasons, self.tokens = [""] * n, [None] * n, [0] * n
        self.done = threading.Event()
        self.left = n

    def __call__(self, kind, index, *rest):
        if kind == "delta":
            self.texts[index] += rest[0]
        elif kind == "finish":
            self.reasons[index], self.tokens[index] = rest
            self.left -= 1
            if not self.left:
                self.done.set()


def test_slot_cache_decode_matches_full_forward_logits_for_rows_of_different_lengths():
    model = _model()
    cache = SlotKVCache(model, 3)
    prompts = [[5, 9, 200, 3], [17], [40, 41, 42, 43, 44, 45, 46]]
    with torch.inference_mode():
        for s, p in enumerate(prompts):
            model(torch.tensor([p]), kv_cache=cache.prefill(s), last_logits_only=True)
        new = torch.tensor([[7], [8], [9]])
        view, positions, mask = cache.decode(3)
        got = model(new, positions=positions, attn_mask=mask, kv_cache=view, last_logits_only=True).logits[:, -1]
        for b, p in enumerate(prompts):  # reference: the whole sequence, no cache, float64
            ref = model.double()(torch.tensor([p + [int(new[b])]])).logits[0, -1]
            model.float()
            torch.testing.assert_close(got[b].double(), ref, atol=1e-4, rtol=1e-4)
    assert cache.lengths == [5, 2, 8]


JOINING = ([[10, 20, 30], [99], [1, 2, 3, 4, 5, 6, 7, 8], [250, 251], [64] * 12],
           [25, 7, 40, 3, 18])  # rows finish at different steps; late rows join a running batch


def _served_alone_and_batched(scheduler: BatchScheduler, prompts, budgets, timeout: float = 60) -> None:
    """Submit every prompt at once to a started `scheduler`; each must get generate()'s greedy tokens."""
    model, tok = scheduler.model, scheduler.tokenizer
    expected = [generate(model, p, n, temperature=0)[0] for p, n in zip(prompts, budgets)]
    collectors = [Collector() for _ in prompts]
    scheduler.start()
    try:
        for p, n, c in zip(prompts, budgets, collectors):
            scheduler.submit(GenerationRequest(prompt_ids=p, max_tokens=n, emit=c, temperature=0))
        for c in collectors:
            assert c.done.wait(timeout)
    finally:
        scheduler.stop()
    for c, ids, n in zip(collectors, expected, budgets):
        assert c.texts[0] == tok.decode(ids) and c.reasons[0] == "length" and c.tokens[0] == n


def test_rows_joining_and_leaving_get_the_same_greedy_tokens_as_generating_alone():
    scheduler = BatchScheduler(_model(), _tokenizer(), max_batch=3, max_queue=8)  # 5 requests, 3 slots: some wait
    _served_alone_and_batched(scheduler, *JOINING)
    assert scheduler.peak_batch == 3


@pytest.mark.skipif(__import__("diyllm.generation.compiled", fromlist=["x"]).compile_unavailable_reason(
    torch.device("cpu")) is not None, reason="no C++ compiler for inductor")
def test_compiled_serving_gives_the_tokens_of_generating_alone():
    """`diyllm serve --compile`: one compiled step for all slots, each row writing its key at its own
    column; rows joining, waiting and leaving must still get exactly generate()'s greedy tokens."""
    from diyllm.generation import compiled

    scheduler = BatchScheduler(_model(), _tokenizer(), max_batch=3, max_queue=8, compile=True)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    _served_alone_and_batched(scheduler, *JOINING, timeout=300)
    dec = scheduler._decoder
    assert dec.per_row and dec.step_fn is not compiled._step and dec.compile_seconds > 0  # it was compiled
    assert scheduler.peak_batch == 3
    # one graph for 2 and 3 active rows and every span: the batch and the span are dynamic sizes
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 1


def test_serving_with_compile_but_no_compiler_runs_the_same_static_step_eagerly(monkeypatch):
    from diyllm.generation import compiled

    monkeypatch.setattr(compiled, "compile_unavailable_reason", lambda device: "no compiler (test)")
    scheduler = BatchScheduler(_model(1), _tokenizer(), max_batch=4, compile=True)
    _served_alone_and_batched(scheduler, [[5, 6, 7], [42] * 9], [30, 11])
    assert scheduler._decoder.step_fn is compiled._step and scheduler._decoder.cache.row_columns is not None


def test_an_int8_model_is_served_with_the_tokens_generate_gives_it():
    from diyllm.model.quantize import quantize_int8

    model, tok = quantize_int8(_model()), _tokenizer()  # what `diyllm serve --quantize int8` serves
    prompt = [10, 20, 30, 40]
    expected = generate(model, prompt, 20, temperature=0)[0]
    scheduler = BatchScheduler(model, tok, max_batch=2, max_queue=2)
    c = Collector()
    scheduler.start()
    try:
        scheduler.submit(GenerationRequest(prompt_ids=prompt, max_tokens=20, emit=c, temperature=0))
        assert c.done.wait(60)
    finally:
        scheduler.stop()
    assert c.texts[0] == tok.decode(expected) and c.tokens[0] == 20


def test_sampling_with_a_seed_is_independent_of_the_batch_and_n_gives_distinct_choices():
    model, tok = _model(), _tokenizer()
    scheduler = BatchScheduler(model, tok, max_batch=8)
    scheduler.start()
    try:
        alone = Collector()
        scheduler.submit(GenerationRequest(prompt_ids=[3, 4], max_tokens=20, emit=alone, temperature=1.0, seed=7))
        assert alone.done.wait(60)
        crowd = [Collector() for _ in range(4)]
        together = Collector(n=2)
        for i, c in enumerate(crowd):
            scheduler.submit(GenerationRequest(prompt_ids=[i + 50], max_tokens=30, emit=c, temperature=1.0))
        scheduler.submit(GenerationRequest(prompt_ids=[3, 4], max_tokens=20, emit=together, temperature=1.0, seed=7,
                                           n=2))
        assert together.done.wait(60) and all(c.done.wait(60) for c in crowd)
    finally:
        scheduler.stop()
    assert together.texts[0] == alone.texts[0]  # choice 0 uses the seed itself, whatever else runs
    assert together.texts[1] != together.texts[0]  # choice 1 uses seed + 1


def test_stop_ids_stop_strings_cancel_and_queue_limit():
    model, tok = _model(), _tokenizer()
    greedy = generate(model, [10, 20, 30], 30, temperature=0)[0]
    text = tok.decode(greedy)
    stop_tok, stop_str = greedy[5], text[12:14]
    scheduler = BatchScheduler(model, tok, max_batch=1, max_queue=1)
    by_id, by_str = Collector(), Collector()
    scheduler.submit(GenerationRequest(prompt_ids=[10, 20, 30], max_tokens=30, emit=by_id, temperature=0,
                                       stop_ids=(stop_tok,)))
    with pytest.raises(QueueFull):  # not started yet: the one waiting place is taken
        scheduler.submit(GenerationRequest(prompt_ids=[1], max_tokens=1, emit=Collector()))
    scheduler.start()
    try:
        assert by_id.done.wait(60)
        scheduler.submit(GenerationRequest(prompt_ids=[10, 20, 30], max_tokens=30, emit=by_str, temperature=0,
                                           stop_strings=(stop_str,)))
        assert by_str.done.wait(60)
        long = Collector()
        request = GenerationRequest(prompt_ids=[1], max_tokens=90, emit=long, temperature=0)
        scheduler.submit(request)
        request.cancelled = True
        for _ in range(200):
            if scheduler.stats()["active_rows"] == 0 and not scheduler.stats()["waiting_requests"]:
                break
            threading.Event().wait(0.01)
        assert scheduler.stats()["active_rows"] == 0 and not long.done.is_set()
    finally:
        scheduler.stop()
    assert by_id.texts[0] == tok.decode(greedy[: greedy.index(stop_tok)]) and by_id.reasons[0] == "stop"
    assert by_str.texts[0] == text[: text.index(stop_str)] and by_str.reasons[0] == "stop"
