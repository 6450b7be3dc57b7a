"""SFT: chat template, assistant-only loss mask, truncation, vocabulary growth, sft/show/chat commands."""

from __future__ import annotations

import json

import pytest
import torch

from diyllm.data.chat_template import (
    CHAT_TEMPLATE_JINJA,
    IM_END,
    IM_START,
    add_chat_tokens,
    encode_chat,
    render_chat,
)
from diyllm.data.sft import SFTSource, encode_rows
from diyllm.errors import UserError
from diyllm.model import DIYConfig, DIYForCausalLM
from diyllm.training.config import TrainConfig
from diyllm.training.loss import cross_entropy

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]

pytestmark = pytest.mark.usefixtures("one_thread")


def chat_tokenizer():
    from diyllm.tokenizers import BPETokenizer

    tok = BPETokenizer({i: bytes([i]) for i in range(256)}, [], special_tokens=["<|endoftext|>"])
    assert add_chat_tokens(tok) == [257, 258]
    return tok


def test_render_matches_the_jinja_template_with_and_without_generation_prompt():
    jinja2 = pytest.importorskip("jinja2")
    template = jinja2.Environment().from_string(CHAT_TEMPLATE_JINJA)
    for gen in (False, True):
        assert template.render(messages=CONV, add_generation_prompt=gen) == render_chat(CONV, gen)
    assert render_chat(CONV[:2], add_generation_prompt=True).endswith("<|im_start|>user\nHi<|im_end|>\n"
                                                                      "<|im_start|>assistant\n")


def test_loss_mask_covers_exactly_the_assistant_replies_and_their_end_token():
    tok = chat_tokenizer()
    ids, mask = encode_chat(tok, CONV)
    assert tok.decode(ids) == render_chat(CONV)  # one token per byte: positions are countable by hand
    start, end = tok.special_token_id(IM_START), tok.special_token_id(IM_END)
    # Build the expected positions by hand from the layout: [start] role \n content [end] \n
    expected = []
    for m in CONV:
        header = 1 + len(m["role"]) + 1
        expected += [0] * header + [int(m["role"] == "assistant")] * (len(m["content"]) + 1) + [0]
    assert mask == expected
    trained = [t for t, m in zip(ids, mask) if m]
    assert trained == tok.encode("Hello") + [end] + tok.encode("4") + [end]
    assert ids.count(start) == 5 and ids.count(end) == 5
    # the assistant header is never trained, also in the generation prompt
    gen_ids, gen_mask = encode_chat(tok, CONV[:2], add_generation_prompt=True)
    assert tok.decode(gen_ids).endswith("<|im_start|>assistant\n") and sum(gen_mask) == 0


def test_rows_shift_the_mask_with_the_targets_and_truncation_drops_untrainable_samples():
    tok = chat_tokenizer()
    long_user = [{"role": "user", "content": "x" * 100}, {"role": "assistant", "content": "ok"}]
    x, y, m, dropped = encode_rows(tok, [CONV, long_user], context_length=96)
    assert dropped == 1 and x.shape == (1, 96)  # the long one has no assistant token within 97 tokens
    ids, mask = encode_chat(tok, CONV)
    n = len(ids) - 1
    assert y[0, :n].tolist() == ids[1:] and m[0, :n].tolist() == mask[1:]
    assert (y[0, n:] == -100).all() and (m[0, n:] == 0).all()
    # a conversation truncated inside the reply keeps the fitting part of the reply
    cut = len(encode_chat(tok, CONV[:3])[0]) - 6  # keeps cut + 1 tokens: ends after "He" of "Hello"
    x2, y2, m2, d2 = encode_rows(tok, [CONV[:3]], context_length=cut)
    assert d2 == 0 and m2.sum() == 2


def test_all_zero_mask_gives_zero_loss_not_nan():
    logits = torch.randn(2, 5, 11, requires_grad=True)
    loss = cross_entropy(logits, torch.randint(0, 11, (2, 5)), loss_mask=torch.zeros(2, 5))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()


def _write_convs(path, convs):
    path.write_text("".join(json.dumps({"conversations": c}) + "\n" for c in convs), encoding="utf-8")


def test_sft_source_never_yields_a_batch_without_trained_tokens(tmp_path):
    tok = chat_tokenizer()
    tok_path = tmp_path / "tok.json"
    tok.save(tok_path)
    good = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(30)]
    bad = [[{"role": "user", "content": "y" * 200}, {"role": "assistant", "content": "z"}] for _ in range(30)]
    _write_convs(tmp_path / "train.jsonl", good + bad)
    _write_convs(tmp_path / "val.jsonl", good[:5])
    cfg = TrainConfig(data_dir=str(tmp_path / "train.jsonl"), val_data=str(tmp_path / "val.jsonl"),
                      context_length=48, tokenizer_path=str(tok_path), data_format="sft")
    src = SFTSource.from_config(cfg)
    assert src.dropped == {"train": 30, "val": 0} and src.vocab_size == 259
    for _ in range(40):  # several epochs of batches of 1: every single row has trained targets
        x, y, mask = src.get_batch("train", 1, "cpu")
        assert mask.sum() > 0 and (y[mask > 0] != -100).all()
    assert src.empty_batches_skipped == 0
    state = src.state_dict()
    a = [src.get_batch("train", 4, "cpu")[0] for _ in range(3)]
    src2 = SFTSource.from_config(cfg)
    src2.load_state_dict(state)
    assert all(torch.equal(p, src2.get_batch("train", 4, "cpu")[0]) for p in a)


def test_bad_conversations_and_char_tokenizers_are_clear_errors(tmp_path):
    from diyllm.data.sft import read_conversations
    from diyllm.tokenizers import CharTokenizer

    (tmp_path / "c.jsonl").write_text(json.dumps({"conversations": [{"role": "bot", "content": "x"}]}) + "\n")
    with pytest.raises(UserError, match=r"c.jsonl:1: message 0 has role 'bot'"):
        read_conversations(tmp_path / "c.jsonl")
    with pytest.raises(UserError, match="BPE tokenizer"):
        add_chat_tokens(CharTokenizer("abc"))
    with pytest.raises(UserError, match="BPE tokenizer"):
        encode_chat(CharTokenizer("abc"), CONV)


def test_resize_vocabulary_adds_mean_rows_and_keeps_old_predictions():
    from diyllm.training.sft_cli import resize_vocabulary

    for tie in (False, True):
        torch.manual_seed(0)
        model = DIYForCausalLM(DIYConfig(vocab_size=20, context_length=16, d_model=32, num_layers=1, num_heads=2,
                                         tie_embeddings=tie)).eval()
        ids = torch.randint(0, 20, (1, 8))
        before = model(ids).logits
        old_head = model.lm_head.weight.detach().clone()
        assert resize_vocabulary(model, 23) == [20, 21, 22]
        after = model(ids).logits
        torch.testing.assert_close(after[..., :20], before)
        torch.testing.assert_close(model.lm_head.weight[20], old_head.mean(0))
        assert model.token_embeddings.weight.shape == (23, 32) and model.config.vocab_size == 23
        assert (model.token_embeddings.weight is model.lm_head.weight) == tie
        model(torch.tensor([[21, 22]]))  # the new ids are valid inputs


def _pretrained_checkpoint(tmp_path):
    from diyllm.tokenizers import BPETokenizer
    from diyllm.training.checkpoint import save_checkpoint

    tok = BPETokenizer({i: bytes([i]) for i in range(256)}, [], special_tokens=["<|endoftext|>"])
    tok.save(tmp_path / "base_tok.json")
    model = DIYForCausalLM(DIYConfig(vocab_size=257, context_length=64, d_model=32, num_layers=1, num_heads=2))
    path = tmp_path / "pre.pt"
    save_checkpoint(model, None, 0, path, model_config=model.config.to_dict(),
                    tokenizer=(tmp_path / "base_tok.json").read_text())
    return path


def test_sft_command_adds_chat_tokens_trains_and_checks_the_tokenizer(tmp_path, capsys):
    from diyllm.cli import main
    from diyllm.tokenizers import CharTokenizer
    from diyllm.training.checkpoint import load_model

    ckpt = _pretrained_checkpoint(tmp_path)
    convs = [[{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": str(i)}] for i in range(40)]
    _write_convs(tmp_path / "train.jsonl", convs)
    _write_convs(tmp_path / "val.jsonl", convs[:4])
    common = [f"--data_dir={tmp_path / 'train.jsonl'}", f"--val_data={tmp_path / 'val.jsonl'}", "--device=cpu",
              "--batch_size=4", "--max_iters=3", "--eval_interval=3", "--eval_iters=1", "--warmup_iters=0",
              "--progress=false", f"--out_dir={tmp_path / 'sft'}"]
    assert main(["sft", *common]) == 2
    assert "--init_from" in capsys.readouterr().err
    assert main(["sft", *common, f"--init_from={ckpt}"]) == 0
    model, tok, saved = load_model(tmp_path / "sft" / "latest.pt")
    assert tok.special_token_id(IM_END) == 258 and model.config.vocab_size == 259
    assert saved["model_config"]["vocab_size"] == 259
    CharTokenizer("abc").save(tmp_path / "char.json")
    assert main(["sft", *common, f"--init_from={ckpt}", f"--tokenizer_path={tmp_path / 'char.json'}"]) == 2
    assert "does not match the tokenizer" in capsys.readouterr().err


def test_show_sft_sample_marks_trained_tokens(tmp_path, capsys):
    from diyllm.cli import main

    _write_convs(tmp_path / "c.jsonl", [CONV, CONV[:3]])
    assert main(["show-sft-sample", str(tmp_path / "c.jsonl"), "--index", "1"]) == 0
    out = capsys.readouterr().out
    body = out.split("\n", 1)[1]  # after the summary line
    assert "[[Hello<|im_end|>]]" in body and body.count("[[") == 1
    assert main(["show-sft-sample", str(tmp_path / "c.jsonl"), "--index", "5"]) == 2


def test_chat_session_drops_the_oldest_turns_to_fit_the_context():
    from diyllm.generation.chat import ChatSession, chat_loop

    tok = chat_tokenizer()
    torch.manual_seed(0)
    model = DIYForCausalLM(DIYConfig(vocab_size=259, context_length=96, d_model=32, num_layers=1, num_heads=2))
    session = ChatSession(model, tok, system="sys", max_new_tokens=8, temperature=0)
    import io

    out = io.StringIO()
    chat_loop(session, ["first question here", "second question here", "third question here",
                        "/reset", "again"], out, interactive=False)
    text = out.getvalue()
    assert "dropped the" in text and "(conversation reset)" in text
    assert len(session.history) == 2 and session.history[0]["content"] == "again"
    assert len(session.prompt_ids()) + 8 <= 96


def test_chat_cli_quantize_int8_replies_as_the_int8_session(tmp_path, capsys, monkeypatch):
    import importlib

    from diyllm.cli import main
    from diyllm.generation.chat import ChatSession
    from diyllm.training.checkpoint import save_checkpoint

    gen = importlib.import_module("diyllm.generation.generate")  # the module (the package re-exports the function)
    made = []  # the flag must reach generation: the int8 copy is made (at this size its tokens equal fp32's)
    real = gen.quantized_for
    monkeypatch.setattr(gen, "quantized_for", lambda m, scheme: made.append(scheme) or real(m, scheme))

    tok = chat_tokenizer()
    tok.save(tmp_path / "tokenizer.json")
    torch.manual_seed(0)
    model = DIYForCausalLM(DIYConfig(vocab_size=259, context_length=96, d_model=32, num_layers=1, num_heads=2))
    save_checkpoint(model, None, 0, tmp_path / "m.pt", model_config=model.config.to_dict(),
                    tokenizer=(tmp_path / "tokenizer.json").read_text())
    assert main(["chat", "--ckpt", str(tmp_path / "m.pt"), "--prompt", "hello", "--temperature", "0",
                 "--max_new_tokens", "12", "--quantize", "int8", "--device", "cpu"]) == 0
    assert made == ["int8"]
    want = "".join(ChatSession(model, tok, max_new_tokens=12, temperature=0, quantize="int8").reply("hello"))
    assert capsys.readouterr().out == want + "\n"
