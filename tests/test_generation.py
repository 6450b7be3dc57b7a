"""Sampling options, stopping, streaming, text helpers and the `sample` command."""

from __future__ import annotations

import math

import pytest
import torch

from diyllm.generation.generate import generate, iter_steps, stream
from diyllm.generation.sampling import (
    apply_repetition_penalty,
    filter_logits,
    sample_next,
    top_k_filter,
    top_p_filter,
)
from diyllm.generation.text import generate_text, stream_text
from diyllm.model import DIYConfig, DIYForCausalLM

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(vocab_size=40, seed=0, context_length=64) -> DIYForCausalLM:
    torch.manual_seed(seed)
    cfg = DIYConfig(vocab_size=vocab_size, context_length=context_length, d_model=32, num_layers=2, num_heads=4,
                    d_ff=64)
    return DIYForCausalLM(cfg).eval()


# ---- filters keep exactly the intended support ----------------------------------------------------------


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5], [5.0, 4.0, 3.0, 2.0, 1.0]])
    out = top_k_filter(logits, 2)
    assert torch.isfinite(out).tolist() == [[False, True, False, True, False], [True, True, False, False, False]]
    assert out[0, 1] == 3.0 and out[0, 3] == 2.0  # kept values unchanged
    assert torch.equal(top_k_filter(logits, 5), logits)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15]])
    logits = probs.log()
    kept = lambda p: torch.isfinite(top_p_filter(logits, p))[0].tolist()  # noqa: E731
    assert kept(0.5) == [True, False, False, False]  # 0.5 alone reaches 0.5
    assert kept(0.6) == [True, False, True, False]  # 0.5 + 0.3
    assert kept(0.85) == [True, False, True, True]  # 0.5 + 0.3 + 0.15 = 0.95 >= 0.85 (0.8 < 0.85)
    assert kept(1.0) == [True, True, True, True]
    assert kept(0.01) == [True, False, False, False]  # the top token always survives


def test_sampled_tokens_stay_in_the_filtered_support():
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 2
    many = logits.repeat(300, 1)  # 300 draws per row, in one call
    g = torch.Generator().manual_seed(0)
    for top_k, top_p in [(5, None), (None, 0.7), (10, 0.5)]:
        allowed = torch.isfinite(filter_logits(logits, 1.0, top_k, top_p))
        tok = sample_next(many, 1.0, top_k, top_p, g)
        seen = torch.zeros_like(allowed)
        seen[torch.arange(4).repeat(300), tok] = True
        assert not (seen & ~allowed).any()
        if top_k == 5:  # with 300 draws every kept token of a 5-way choice shows up
            assert torch.equal(seen, allowed)


def test_temperature_zero_is_argmax_and_temperature_scales():
    logits = torch.tensor([[1.0, 4.0, 2.0]])
    assert sample_next(logits, temperature=0).tolist() == [1]
    torch.testing.assert_close(filter_logits(logits, 2.0), logits / 2)


def test_repetition_penalty_lowers_seen_tokens_whatever_their_sign():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]


def test_repetition_penalty_changes_greedy_generation():
    model = _model()
    plain = generate(model, [1, 2, 3], 30, temperature=0)[0]
    penalised = generate(model, [1, 2, 3], 30, temperature=0, repetition_penalty=5.0)[0]
    assert len(set(penalised)) > len(set(plain)) or penalised != plain


# ---- seeds, stops, streaming -----------------------------------------------------------------------------


def test_fixed_seed_reproduces_samples_and_different_seeds_differ():
    model = _model()
    a = generate(model, [[1, 2], [3]], 25, temperature=1.0, seed=7)
    b = generate(model, [[1, 2], [3]], 25, temperature=1.0, seed=7)
    c = generate(model, [[1, 2], [3]], 25, temperature=1.0, seed=8)
    assert a == b
    assert a != c


def test_stop_token_ends_the_row_and_is_not_returned():
    model = _model()
    free = generate(model, [5, 6, 7], 20, temperature=0)[0]
    stop = free[4]
    first = free.index(stop)
    out = generate(model, [5, 6, 7], 20, temperature=0, stop_ids=[stop])[0]
    assert out == free[:first]
    # generation stops early: fewer steps than max_new_tokens were run
    assert len(list(iter_steps(model, [5, 6, 7], 20, temperature=0, stop_ids=[stop]))) == first + 1


def test_stop_tokens_per_row_in_a_batch():
    model = _model()
    prompts = [[5, 6, 7], [9]]
    free = generate(model, prompts, 15, temperature=0)
    stop = free[0][2]
    out = generate(model, prompts, 15, temperature=0, stop_ids=[stop])
    for row_free, row in zip(free, out):
        cut = row_free.index(stop) if stop in row_free else len(row_free)
        assert row == row_free[:cut]
    streamed = list(stream(model, prompts, 15, temperature=0, stop_ids=[stop]))
    rows = [[s[i] for s in streamed if s[i] is not None] for i in range(2)]
    assert rows == out
    assert streamed[-1][0] is None or len(out[0]) == 15  # row 0 finished: None from then on


def test_stream_yields_the_same_tokens_as_generate():
    model = _model()
    toks = list(stream(model, [1, 2, 3], 12, temperature=0.8, top_k=10, seed=3))
    assert all(isinstance(t, int) for t in toks)
    assert toks == generate(model, [1, 2, 3], 12, temperature=0.8, top_k=10, seed=3)[0]


def test_sampling_params_object_equals_the_keyword_options():
    from diyllm.generation import SamplingParams

    model = _model()
    params = SamplingParams(temperature=0.8, top_k=10, seed=3, stop_ids=[7])
    assert params.stop_ids == (7,)  # stored as a tuple: the object is hashable and immutable
    expected = generate(model, [[1, 2, 3], [4]], 12, temperature=0.8, top_k=10, seed=3, stop_ids=[7])
    assert generate(model, [[1, 2, 3], [4]], 12, params) == expected
    assert list(stream(model, [1, 2, 3], 12, params)) == generate(model, [1, 2, 3], 12, temperature=0.8, top_k=10,
                                                                  seed=3, stop_ids=[7])[0]
    # keywords refine a params object: here greedy instead of sampling
    assert generate(model, [1, 2, 3], 12, params, temperature=0) == generate(model, [1, 2, 3], 12, temperature=0,
                                                                              stop_ids=[7])
    with pytest.raises(TypeError, match="unknown sampling option"):
        generate(model, [1], 5, temprature=0.5)


def test_empty_prompt_and_bad_options_are_clear_errors():
    model = _model()
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, [], 5)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [1], 5, top_p=1.5)
    with pytest.raises(ValueError, match="context"):
        generate(model, [1], 5, context="wrap")
    assert generate(model, [1], 0) == [[]]


# ---- text helpers ----------------------------------------------------------------------------------------


class _LetterTokenizer:
    """a..z plus space (ids 0..26), id 27 decodes to nothing. Enough to test text-level stopping."""

    alphabet = "abcdefghijklmnopqrstuvwxyz "
    eot_id = None
    vocab_size = 28

    def encode(self, text):
        return [self.alphabet.index(c) for c in text]

    def decode(self, ids):
        return "".join(self.alphabet[i] if i < 27 else "" for i in ids)


def test_stop_string_cuts_text_and_streamed_pieces_join_to_the_full_text():
    tok = _LetterTokenizer()
    model = _model(vocab_size=28)
    ids = generate(model, tok.encode("abc"), 40, temperature=0)[0]
    full = tok.decode(ids)
    assert len(full) >= 6, "greedy text too short for this test"
    stop = full[3:5]
    expected = full[: full.index(stop)]
    assert generate_text(model, tok, "abc", 40, stop_strings=[stop], temperature=0) == expected
    pieces = list(stream_text(model, tok, "abc", 40, stop_strings=[stop], temperature=0))
    assert "".join(pieces) == expected
    assert generate_text(model, tok, "abc", 40, temperature=0) == full
    tok.eot_id = ids[2]  # an end-of-text id stops generation by default
    assert generate_text(model, tok, "abc", 40, temperature=0) == tok.decode(ids[: ids.index(ids[2])])
    assert generate_text(model, tok, "abc", 40, temperature=0, stop_at_eot=False) == full


def test_stream_text_holds_back_incomplete_utf8():
    from diyllm.tokenizers import BPETokenizer

    bpe = BPETokenizer({i: bytes([i]) for i in range(256)}, [])  # bytes only: "é" is two tokens
    model = _model(vocab_size=256)
    text = generate_text(model, bpe, [65], 30, temperature=1.0, seed=0)
    pieces = list(stream_text(model, bpe, [65], 30, temperature=1.0, seed=0))
    assert "".join(pieces) == text
    # every streamed piece was settled text: no piece ends with a replacement char unless the text does
    assert all(not p.endswith("\ufffd") for p in pieces[:-1])


# ---- the `sample` command ---------------------------------------------------------------------------------


def _write_checkpoint(tmp_path, vocab="abcdefgh \n", model=None):
    from diyllm.tokenizers import CharTokenizer
    from diyllm.training.checkpoint import save_checkpoint

    tok = CharTokenizer(vocab)
    tok_path = tmp_path / "tokenizer.json"
    tok.save(tok_path)
    model = model if model is not None else _model(vocab_size=tok.vocab_size, context_length=32)
    path = tmp_path / "best.pt"
    save_checkpoint(model, None, 0, path, model_config=model.config.to_dict(), tokenizer=tok_path.read_text())
    return path, model, tok


def test_sample_cli_streams_one_sample_and_batches_several(tmp_path, capsys):
    from diyllm.cli import main

    path, model, tok = _write_checkpoint(tmp_path)
    assert main(["sample", "--ckpt", str(path), "--prompt", "abc", "--max_new_tokens", "50", "--temperature", "0",
                 "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    expected = tok.decode(generate(model, tok.encode("abc"), 50, temperature=0)[0])
    assert out == "abc" + expected + "\n"  # sliding past the 32-token context is fine
    assert "tokens/s" in err
    assert main(["sample", "--ckpt", str(tmp_path), "--prompt", "ab", "--num_samples", "3", "--max_new_tokens", "8",
                 "--seed", "1", "--no_cache", "--device", "cpu"]) == 0
    out, _ = capsys.readouterr()
    assert out.count("--- sample") == 3
    assert main(["sample", "--ckpt", str(path), "--top_p", "2"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_padded_vocabulary_never_emits_ids_without_text(tmp_path, capsys):
    """A model whose vocab_size exceeds its tokenizer's (padding, e.g. 50304 for 50257) and whose logits
    favour the padding ids still generates decodable text: those ids are never sampled."""
    from diyllm.cli import main

    model = _model(vocab_size=64, context_length=32)
    with torch.no_grad():
        model.lm_head.weight[10:] *= 50  # the 54 ids beyond the 10-char tokenizer dominate
    path, model, tok = _write_checkpoint(tmp_path, model=model)
    ids = generate(model, tok.encode("ab"), 20, temperature=0)[0]
    assert max(ids) >= tok.vocab_size  # without a limit the padding ids win
    limited = generate(model, [tok.encode("ab")] * 3, 20, temperature=1.0, seed=0, vocab_limit=tok.vocab_size)
    assert all(0 <= t < tok.vocab_size for row in limited for t in row)
    assert len(generate_text(model, tok, "ab", 20, temperature=0)) == 20
    assert main(["sample", "--ckpt", str(path), "--prompt", "ab", "--max_new_tokens", "10", "--device", "cpu"]) == 0
    assert main(["sample", "--ckpt", str(path), "--prompt", "ab", "--num_samples", "2", "--max_new_tokens", "10",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out.count("--- sample") == 2


def test_greedy_decoding_is_the_argmax_chain():
    model = _model()
    steps = list(iter_steps(model, [4, 5], 6, temperature=0))
    for s in steps:
        assert s.tokens.tolist() == s.logits.argmax(-1).tolist()
    assert not math.isnan(steps[-1].logits.sum().item())
