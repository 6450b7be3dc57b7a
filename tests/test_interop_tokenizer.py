"""Hugging Face interop of tokenizers: the exported tokenizer.json must give our ids in transformers and
`tokenizers`, and a byte-level BPE tokenizer.json must import to a tokenizer with the library's ids."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from diyllm.errors import UserError
from diyllm.interop.hf import export_hf, import_hf, load_hf_model
from diyllm.interop.hf_tokenizer import from_hf_tokenizer_json, to_hf_tokenizer_json
from diyllm.model import DIYConfig, DIYForCausalLM
from diyllm.tokenizers import BPETokenizer, CharTokenizer, load_tokenizer, train_bpe

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

transformers.logging.set_verbosity_error()

CORPUS = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
    "It's 2024 and they're   running 12345 tests; we've won't I'll.\r\n\tTabbed line\n"
    "Ünïcödé façade naïve — “quotes” ‘single’ … 日本語のテキスト 中文 한국어 😀🎉 emoji\n"
) * 8
GPT4_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
TEXTS = [
    "Hello world!",
    "",
    " ",
    "   leading and trailing spaces   ",
    "line one\nline two\n\n\nthree\r\nfour\t\ttabs  \t mixed",
    "It's they're we've I'll don't 1234567890 3.14159",
    "Ünïcödé façade naïve — “quotes” 日本語のテキスト 😀🎉👍🏽 zero\u200bwidth",
    "words<|endoftext|>more words<|endoftext|><|endoftext|>",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
    "<|im_start|><|im_end|><|endoftext|>",
    "almost special <|endoftext| and <|im_start",
    "\n\n\n   \n  x  \n",
    "ⓤⓝⓢⓔⓔⓝ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ✓ ✗ ∑ ∫",
]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> BPETokenizer:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(CORPUS, encoding="utf-8")
    vocab, merges = train_bpe(path, 420, ["<|endoftext|>"])
    tok = BPETokenizer(vocab, merges, ["<|endoftext|>"])
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])  # what SFT adds
    return tok


def _export_with(tokenizer, folder: Path) -> Path:
    cfg = DIYConfig(vocab_size=tokenizer.vocab_size, context_length=64, d_model=32, num_layers=1, num_heads=2,
                    d_ff=64)
    return export_hf(DIYForCausalLM(cfg), folder, tokenizer)


def test_exported_bpe_gives_our_ids_in_transformers(tmp_path, bpe):
    out = _export_with(bpe, tmp_path / "hf")
    hf_tok = AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        ids = bpe.encode(text)
        assert hf_tok(text)["input_ids"] == ids, text
        assert hf_tok.decode(ids) == text
    assert hf_tok.eos_token == "<|endoftext|>" and hf_tok.eos_token_id == bpe.eot_id
    assert hf_tok.convert_tokens_to_ids("<|im_end|>") == bpe.special_token_id("<|im_end|>")
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == bpe.eot_id == config["bos_token_id"]
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [bpe.eot_id, bpe.special_token_id("<|im_end|>")]  # stop at either


def test_exported_tokenizer_json_matches_on_a_real_corpus(bpe, shared_data):
    """The whole Shakespeare text (whitespace runs, punctuation, newlines) encodes identically."""
    text = (shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")[:200_000]
    hf_tok = Tokenizer.from_str(json.dumps(to_hf_tokenizer_json(bpe)))
    assert hf_tok.encode(text).ids == bpe.encode(text)


def test_custom_pretokenizer_pattern_is_exported(tmp_path, bpe):
    path = tmp_path / "c.txt"
    path.write_text(CORPUS, encoding="utf-8")
    vocab, merges = train_bpe(path, 400, ["<|endoftext|>"], pattern=GPT4_PATTERN)
    tok = BPETokenizer(vocab, merges, ["<|endoftext|>"], pattern=GPT4_PATTERN)
    hf_tok = Tokenizer.from_str(json.dumps(to_hf_tokenizer_json(tok)))
    for text in TEXTS:
        assert hf_tok.encode(text).ids == tok.encode(text), text


def test_exported_char_tokenizer_gives_our_ids(tmp_path):
    tok = CharTokenizer.train(CORPUS)
    out = _export_with(tok, tmp_path / "hf")
    hf_tok = AutoTokenizer.from_pretrained(out)
    text = "First Citizen:\n  Speak,\tspeak. 日本語 😀\r\n"
    assert hf_tok(text)["input_ids"] == tok.encode(text)
    assert hf_tok.decode(tok.encode(text)) == text
    with pytest.raises(Exception, match="(?i)unk"):  # an unknown character fails on both sides
        hf_tok("Zebra~")
    with pytest.raises(ValueError):
        tok.encode("Zebra~")
    _, back = load_hf_model(out)
    assert isinstance(back, CharTokenizer) and back.chars == tok.chars


def test_export_import_round_trip_keeps_the_tokenizer(tmp_path, bpe):
    out = _export_with(bpe, tmp_path / "hf")
    import_hf(out, tmp_path / "x.pt")
    from diyllm.training.checkpoint import load_model

    _, tok, ckpt = load_model(tmp_path / "x.pt")
    assert isinstance(tok, BPETokenizer) and json.loads(ckpt["tokenizer"])["kind"] == "bpe"
    assert tok.vocab == bpe.vocab and tok.merges == bpe.merges and tok.special_tokens == bpe.special_tokens
    assert tok.pattern == bpe.pattern
    for text in TEXTS:
        assert tok.encode(text) == bpe.encode(text)


@pytest.mark.parametrize("style", ["gpt2", "split+bytelevel"])
def test_import_tokenizers_library_bpe_gives_the_library_ids(tmp_path, style):
    """A byte-level BPE trained by the `tokenizers` library (GPT-2 or Llama-3 style pre-tokenizer)."""
    tok = Tokenizer(models.BPE())
    if style == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(GPT4_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS], trainer=trainer)
    ours, notes = from_hf_tokenizer_json(json.loads(tok.to_str()))
    assert notes == []
    assert ours.special_tokens == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    for text in TEXTS:
        assert ours.encode(text) == tok.encode(text).ids, text
        assert ours.encode(text, backend="python") == tok.encode(text).ids, text


def test_unsupported_tokenizer_is_left_out_with_a_note(tmp_path, bpe):
    out = _export_with(bpe, tmp_path / "hf")
    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    (out / "tokenizer.json").write_text(wordpiece.to_str())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, tok = load_hf_model(out)
    assert tok is None and model.config.vocab_size == bpe.vocab_size
    assert any("WordPiece" in str(w.message) for w in caught)

    spm_like = json.loads(json.dumps(to_hf_tokenizer_json(bpe)))
    spm_like["normalizer"] = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
    with pytest.raises(UserError, match="normalizer"):
        from_hf_tokenizer_json(spm_like)
    spm_like["normalizer"], spm_like["model"]["byte_fallback"] = None, True
    with pytest.raises(UserError, match="byte_fallback"):
        from_hf_tokenizer_json(spm_like)

    (out / "tokenizer.json").write_text('{"truncated": ')
    with pytest.raises(UserError, match="tokenizer.json"):
        load_hf_model(out)


def test_ckpt_tokenizer_is_the_one_exported(tmp_path, bpe):
    """export_checkpoint takes the tokenizer embedded in the checkpoint (the checkpoint contract)."""
    from diyllm.interop.hf import export_checkpoint
    from diyllm.training.checkpoint import save_checkpoint

    bpe.save(tmp_path / "tok.json")
    text = (tmp_path / "tok.json").read_text(encoding="utf-8")
    assert load_tokenizer(tmp_path / "tok.json").vocab == bpe.vocab
    cfg = DIYConfig(vocab_size=bpe.vocab_size + 12, context_length=64, d_model=32, num_layers=1, num_heads=2)
    model = DIYForCausalLM(cfg)
    save_checkpoint(model, None, 3, tmp_path / "best.pt", model_config=cfg.to_dict(), tokenizer=text)
    out = export_checkpoint(tmp_path / "best.pt", tmp_path / "hf")
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert hf_tok(TEXTS[4])["input_ids"] == bpe.encode(TEXTS[4])
    assert json.loads((out / "config.json").read_text())["vocab_size"] == bpe.vocab_size + 12
    with pytest.raises(UserError, match="tokenizer has"):
        export_hf(DIYForCausalLM(DIYConfig(vocab_size=300, d_model=32, num_layers=1, num_heads=2)),
                  tmp_path / "bad", bpe)
    assert torch.equal(model.lm_head.weight, load_hf_model(out)[0].lm_head.weight)


CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "Ünïcödé  and\nnewlines 😀"},
     {"role": "assistant", "content": "  spaced\n\nreply "}],
]


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_renders_like_diyllm(tmp_path, bpe, add_generation_prompt):
    from diyllm.data.chat_template import CHAT_TEMPLATE_JINJA, render_chat

    out = _export_with(bpe, tmp_path / "hf")
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE_JINJA
    hf_tok = AutoTokenizer.from_pretrained(out)
    for messages in CONVERSATIONS:
        text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert text == render_chat(messages, add_generation_prompt=add_generation_prompt)
        assert hf_tok(text)["input_ids"] == bpe.encode(text)


def test_no_chat_template_without_chat_tokens(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text(CORPUS, encoding="utf-8")
    vocab, merges = train_bpe(path, 300, ["<|endoftext|>"])
    out = _export_with(BPETokenizer(vocab, merges, ["<|endoftext|>"]), tmp_path / "hf")
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 256
