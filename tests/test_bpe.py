"""BPE training: exact merges (hand-computed and against a naive reference), layout, speed, determinism."""

from __future__ import annotations

import time
from collections import Counter

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from diyllm.errors import UserError
from diyllm.tokenizers import train as train_mod
from diyllm.tokenizers import train_bpe
from diyllm.tokenizers.pretokenize import GPT2_PATTERN, chunk_boundaries, count_pretokens, last_safe_cut
from diyllm.tokenizers.train import _reverse_key, train_bpe_from_counts

EOT = "<|endoftext|>"


def naive_train(counts: dict[str, int], vocab_size: int, specials: list[str]):
    """Obviously-correct reference: recount every pair at every step."""
    vocab = {i: bytes([i]) for i in range(256)}
    for s in specials:
        vocab[len(vocab)] = s.encode()
    words = {tuple(bytes([x]) for x in w.encode()): c for w, c in counts.items()}
    merges = []
    while len(vocab) < vocab_size:
        pc: Counter = Counter()
        for w, c in words.items():
            for p in zip(w, w[1:]):
                pc[p] += c
        if not pc:
            break
        best = max(pc, key=lambda p: (pc[p], p))
        merges.append(best)
        vocab[len(vocab)] = best[0] + best[1]
        new_words: dict = {}
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] = new_words.get(tuple(out), 0) + c
        words = new_words
    return vocab, merges


def test_hand_computed_merges_with_ties(tmp_path):
    # pre-tokens: "ab" x1, " ab" x2, " cd" x3 -> pairs (a,b)=3, ( ,a)=2, ( ,c)=3, (c,d)=3.
    # Step 1: three pairs tie at 3; the greatest bytes pair is (c, d). Step 2: (a,b)=3 ties ( ,cd)=3 and
    # b"a" > b" " so (a, b). Then ( ,cd)=3, then ( ,ab)=2; after that no pair is left.
    path = tmp_path / "c.txt"
    path.write_text("ab ab ab cd cd cd")
    vocab, merges = train_bpe(path, 300, [EOT])
    assert merges == [(b"c", b"d"), (b"a", b"b"), (b" ", b"cd"), (b" ", b"ab")]
    assert len(vocab) == 256 + 1 + 4  # stops early when nothing is left to merge


def test_vocab_layout(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("the cat sat on the mat<|endoftext|>the hat<|im_end|> " * 20)
    vocab, merges = train_bpe(path, 266, [EOT, "<|im_end|>"])
    assert all(vocab[i] == bytes([i]) for i in range(256))
    assert vocab[256] == EOT.encode() and vocab[257] == b"<|im_end|>"
    assert len(vocab) == 266 and len(merges) == 266 - 258
    for k, (a, b) in enumerate(merges):
        assert vocab[258 + k] == a + b


def test_special_tokens_are_never_merged(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text(("x" + EOT) * 200 + "<|a|>" * 50)
    vocab, merges = train_bpe(path, 300, [EOT])
    special = EOT.encode()
    for a, b in merges:
        assert special not in a + b
        assert not (a.endswith(b"x") and b.startswith(b"<")), "merge crossed a special token"
    # "<|a|>" is not special, so its pieces may merge with each other.
    assert any(b"<|" in a + b for a, b in merges)


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet="ab c\n'!1é", max_size=60), st.integers(257, 300))
def test_matches_naive_reference(text, vocab_size):
    counts = count_pretokens(text, [EOT])
    assert train_bpe_from_counts(counts, vocab_size, [EOT]) == naive_train(counts, vocab_size, [EOT])


@given(st.binary(max_size=6), st.binary(max_size=6))
def test_reverse_key_reverses_order(a, b):
    assert (a < b) == (_reverse_key(a) > _reverse_key(b))
    assert (a == b) == (_reverse_key(a) == _reverse_key(b))


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab \n\t'sl!1\u00a0\u3000", max_size=40))
def test_last_safe_cut_does_not_change_pretokens(text):
    pat = regex.compile(GPT2_PATTERN)
    cut = last_safe_cut(text)
    assert 0 <= cut <= len(text)
    if cut:
        assert pat.findall(text[:cut]) + pat.findall(text[cut:]) == pat.findall(text)


def test_last_safe_cut_respects_special_tokens():
    specials = ["<|a b|>"]
    text = "x <|a b|>"
    cut = last_safe_cut(text, specials)
    assert cut == 1  # the cut inside "<|a b|>" is refused; the one after "x" is fine


def test_parallel_pretokenization_equals_serial(tmp_path, monkeypatch):
    lines = ["hello  world\n\n", "  indented line\n", "x's y'll\n", "\u00a0\n", "end\n"] * 400
    path = tmp_path / "c.txt"
    path.write_text("".join(lines))
    bounds = chunk_boundaries(path, 8, [])
    assert bounds[0] == 0 and bounds[-1] == path.stat().st_size and len(bounds) > 3
    serial = train_bpe(path, 320, [EOT], num_workers=1)
    monkeypatch.setattr(train_mod, "PARALLEL_MIN_BYTES", 0)
    assert train_bpe(path, 320, [EOT], num_workers=2) == serial
    path.write_text(EOT.join(lines))  # chunks cut at special tokens
    assert train_bpe(path, 320, [EOT], num_workers=2) == train_bpe(path, 320, [EOT], num_workers=1)


def test_vocab_too_small_is_a_user_error(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("abc")
    with pytest.raises(UserError, match="too small"):
        train_bpe(path, 256, [EOT])
    with pytest.raises(UserError, match="not found"):
        train_bpe(tmp_path / "missing.txt", 300, [EOT])


def test_corpus_en_cs336_style(shared_data):
    path = shared_data / "corpus.en"
    t0 = time.perf_counter()
    vocab, merges = train_bpe(path, 500, [EOT])
    elapsed = time.perf_counter() - t0
    assert elapsed < 3.0  # ~0.15 s here; generous for a loaded CI machine
    assert len(vocab) == 500 and len(merges) == 500 - 257
    assert len(set(vocab.values())) == 500
    # The first merge is the most frequent pair (greatest on ties), computed directly.
    counts = count_pretokens(path.read_text(encoding="utf-8"), [EOT])
    pairs: Counter = Counter()
    for w, c in counts.items():
        b = w.encode()
        for p in zip(b, b[1:]):
            pairs[(bytes([p[0]]), bytes([p[1]]))] += c
    assert merges[0] == max(pairs, key=lambda p: (pairs[p], p))
    assert train_bpe(path, 500, [EOT]) == (vocab, merges)  # deterministic
