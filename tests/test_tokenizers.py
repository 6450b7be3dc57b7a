"""The tokenizer objects: round trips, fast == reference, special tokens, streaming, files."""

from __future__ import annotations

import json
import os
import random
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diyllm.errors import UserError
from diyllm.tokenizers import BPETokenizer, CharTokenizer, load_tokenizer, train_bpe
from diyllm.tokenizers.gpt2_bytes import bytes_to_unicode, encode_token

EOT = "<|endoftext|>"
TRAIN_TEXT = (
    "The quick brown fox jumps over the lazy dog. It's 2024; we'll see 123 foxes!\n\n"
    "  Indented   spaces\tand tabs\n"
    "Ünïcödé wörds, 日本語のテキスト, emoji 😀🎉 and more.\n"
    "def f(x):\n    return x ** 2  # code\n"
) * 30


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> BPETokenizer:
    path = tmp_path_factory.mktemp("bpe") / "train.txt"
    path.write_text(EOT.join([TRAIN_TEXT] * 3), encoding="utf-8")
    vocab, merges = train_bpe(path, 400, [EOT])
    return BPETokenizer(vocab, merges, [EOT])


PIECES = ["the", " quick", "  ", "\n", "\n\n", " \n", "\t", "'s", "'ll", EOT, "<|endo", "😀", "é", "1234", "!!"]
TEXTS = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=80) | st.lists(
    st.sampled_from(PIECES), max_size=25
).map("".join)


def test_bytes_to_unicode_mapping():
    m = bytes_to_unicode()
    assert len(m) == 256 and len(set(m.values())) == 256
    assert m[ord("!")] == "!" and m[ord("a")] == "a" and m[ord("~")] == "~"
    assert m[32] == "\u0120" and m[10] == "\u010a"  # space -> Ġ, newline -> Ċ
    assert all(c.isprintable() and not c.isspace() for c in m.values())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(TEXTS)
def test_roundtrip_and_fast_equals_python(tok, text):
    fast = tok.encode(text)
    assert fast == tok.encode(text, backend="python")
    assert tok.decode(fast) == text
    assert tok.encode(text, allowed_special="none") == tok.encode(text, allowed_special="none", backend="python")


def test_fast_backend_is_used_and_empty_string(tok):
    assert tok.fast_encoding() is not None
    assert tok.encode("") == [] and tok.encode("", backend="python") == []
    assert tok.decode([]) == ""


def test_special_tokens_never_split(tok):
    ids = tok.encode(f"a{EOT}b")
    assert ids.count(tok.eot_id) == 1 and tok.eot_id == 256
    plain = tok.encode(f"a{EOT}b", allowed_special="none")
    assert tok.eot_id not in plain and tok.decode(plain) == f"a{EOT}b"


def test_overlapping_special_tokens_longest_first(tok):
    double = EOT + EOT
    t = BPETokenizer(tok.vocab, tok.merges, [EOT, double])
    text = f"hi{EOT}{EOT}{EOT} there"
    for backend in ("auto", "python"):
        ids = t.encode(text, backend=backend)
        assert ids.count(t.special_token_id(double)) == 1
        assert ids.count(t.special_token_id(EOT)) == 1
        assert t.decode(ids) == text


def test_add_special_tokens_appends_ids(tok):
    t = BPETokenizer(tok.vocab, tok.merges, [EOT])
    n = t.vocab_size
    ids = t.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    assert ids == [n, n + 1] and t.vocab_size == n + 2
    assert t.add_special_tokens(["<|im_end|>"]) == [n + 1]  # idempotent
    enc = t.encode("<|im_start|>user hi<|im_end|>")
    assert enc[0] == n and enc[-1] == n + 1
    assert enc == t.encode("<|im_start|>user hi<|im_end|>", backend="python")
    with pytest.raises(KeyError, match="not a special token"):
        t.special_token_id("<|nope|>")


def test_decode_replaces_invalid_utf8(tok):
    assert tok.token_bytes(0xC3) == b"\xc3"
    assert tok.decode([0xC3]) == "\ufffd"
    assert tok.decode([ord("a"), 0xFF, ord("b")]) == "a\ufffdb"
    lengths = tok.token_byte_lengths()
    assert lengths[tok.eot_id] == 0 and lengths[ord("a")] == 1


LINES = st.lists(st.text(alphabet="ab \n\t'l<|>endoftx", max_size=12), max_size=30)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(LINES)
def test_encode_iterable_equals_encode(tok, chunks):
    import diyllm.tokenizers.bpe as bpe_mod

    old = bpe_mod._STREAM_CHUNK_CHARS
    bpe_mod._STREAM_CHUNK_CHARS = 8  # force many cuts
    try:
        assert list(tok.encode_iterable(chunks)) == tok.encode("".join(chunks))
    finally:
        bpe_mod._STREAM_CHUNK_CHARS = old


def test_encode_iterable_tricky_lines(tok):
    lines = ["foo\n", "\n", " bar  \n", "  \n", "\n", "x's", "'ll  ", "\t\n", EOT[:5], EOT[5:] + "z\n", "   "]
    assert list(tok.encode_iterable(lines)) == tok.encode("".join(lines))
    assert list(tok.encode_iterable(iter(lines * 5000))) == tok.encode("".join(lines * 5000))


def test_encode_iterable_memory_is_bounded(tok):
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "ünï", "42", "  ", "x's"]
    line_pool = [" ".join(rng.choice(words) for _ in range(12)) + "\n" for _ in range(64)]

    def lines(n_bytes: int):
        made = 0
        i = 0
        while made < n_bytes:
            line = line_pool[i % 64]
            i += 1
            made += len(line)
            yield line

    def peak(n_bytes: int) -> int:
        tracemalloc.start()
        n = 0
        for _ in tok.encode_iterable(lines(n_bytes)):
            n += 1
        _, p = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert n > n_bytes // 10
        return p

    small, large = peak(500_000), peak(5_000_000)
    assert large < 4_000_000  # 5 MB of text streamed through a few MB at most
    assert large < 2 * small + 500_000  # and it does not grow with the input


def test_save_load_roundtrip(tok, tmp_path):
    path = tmp_path / "tok.json"
    tok.save(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["kind"] == "bpe" and data["special_tokens"] == {EOT: 256} and data["pattern"] == tok.pattern
    back = load_tokenizer(path)
    assert isinstance(back, BPETokenizer)
    assert back.vocab == tok.vocab and back.merges == tok.merges and back.special_tokens == tok.special_tokens
    assert back.encode(TRAIN_TEXT) == tok.encode(TRAIN_TEXT)
    assert BPETokenizer.load(path).vocab_size == tok.vocab_size
    assert not list(tmp_path.glob(".*tmp"))  # atomic write left no temp file


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        load_tokenizer(bad)
    bad.write_text('{"kind": "wordpiece"}')
    with pytest.raises(UserError, match="unknown tokenizer kind"):
        load_tokenizer(bad)
    bad.write_text('{"kind": "bpe", "vocab": {}}')
    with pytest.raises(UserError, match="malformed"):
        load_tokenizer(bad)


def test_from_files_gpt2_format(tok, tmp_path):
    """CS336 format: vocab.json {token: id} and merges.txt, both byte-to-unicode encoded."""
    (tmp_path / "vocab.json").write_text(
        json.dumps({encode_token(b): i for i, b in tok.vocab.items()}, ensure_ascii=False), encoding="utf-8"
    )
    (tmp_path / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{encode_token(a)} {encode_token(b)}\n" for a, b in tok.merges), encoding="utf-8"
    )
    t = BPETokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt", [EOT])
    assert t.eot_id == tok.eot_id and t.vocab == tok.vocab
    assert t.encode(TRAIN_TEXT + EOT) == tok.encode(TRAIN_TEXT + EOT)


def test_non_monotonic_ids_still_match_reference(tok):
    """A vocabulary whose ids do not follow merge order makes the fast path remap ranks -> ids."""
    ids = list(tok.vocab)
    perm = ids[:]
    random.Random(1).shuffle(perm)
    remap = dict(zip(ids, perm))
    t = BPETokenizer({remap[i]: b for i, b in tok.vocab.items() if i != tok.eot_id}, tok.merges, [EOT])
    assert t.fast_encoding() is not None and t._id_map is not None
    text = TRAIN_TEXT[:500] + EOT + "tail"
    assert t.encode(text) == t.encode(text, backend="python")
    assert t.decode(t.encode(text)) == text


GPT2_DIR = os.environ.get("DIYLLM_GPT2_DIR")


@pytest.mark.skipif(not GPT2_DIR, reason="set DIYLLM_GPT2_DIR to a folder with GPT-2's vocab.json + merges.txt")
def test_gpt2_published_files_give_gpt2_ids():
    d = Path(GPT2_DIR or ".")
    t = BPETokenizer.from_files(d / "vocab.json", d / "merges.txt", [EOT])
    assert t.encode("hello world") == [31373, 995]
    assert t.eot_id == 50256
    assert t.encode("hello world", backend="python") == [31373, 995]


def test_char_tokenizer(tmp_path):
    t = CharTokenizer.train(["hello ", "wörld\n"])
    assert t.vocab_size == len(set("hello wörld\n")) and t.chars == sorted(set("hello wörld\n"))
    ids = t.encode("world hello")
    assert t.decode(ids) == "world hello" and ids == [t.chars.index(c) for c in "world hello"]
    assert t.token_bytes(t.chars.index("ö")) == "ö".encode() and t.eot_id is None
    with pytest.raises(ValueError, match="'z'.*position 3"):
        t.encode("helz")
    t.save(tmp_path / "c.json")
    back = load_tokenizer(tmp_path / "c.json")
    assert isinstance(back, CharTokenizer) and back.chars == t.chars
    assert json.loads((tmp_path / "c.json").read_text(encoding="utf-8"))["kind"] == "char"
    with pytest.raises(UserError, match="empty"):
        CharTokenizer.train("")
