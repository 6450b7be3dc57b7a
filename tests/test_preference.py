"""Preference JSONL: the three row forms, reply-only loss masks, bad rows skipped and reported."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from diyllm.data.chat_template import add_chat_tokens, encode_chat
from diyllm.errors import UserError


def _tok():
    from diyllm.tokenizers import BPETokenizer

    tok = BPETokenizer({i: bytes([i]) for i in range(256)}, [], special_tokens=["<|endoftext|>"])
    add_chat_tokens(tok)
    return tok


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")


def test_string_message_and_conversation_rows_give_the_same_pair(tmp_path):
    from diyllm.data.preference import read_pairs

    msgs = [{"role": "user", "content": "What is 3 + 5?"}]
    rows = [
        {"prompt": "What is 3 + 5?", "chosen": "8", "rejected": "9"},
        {"prompt": msgs, "chosen": [{"role": "assistant", "content": "8"}],
         "rejected": [{"role": "assistant", "content": "9"}]},
        {"chosen": msgs + [{"role": "assistant", "content": "8"}],
         "rejected": msgs + [{"role": "assistant", "content": "9"}]},
    ]
    _write(tmp_path / "p.jsonl", rows)
    pairs = read_pairs(tmp_path / "p.jsonl")
    assert len(pairs) == 3
    assert all((p.prompt, p.chosen, p.rejected) == (pairs[0].prompt, pairs[0].chosen, pairs[0].rejected)
               for p in pairs)


def test_loss_mask_covers_only_the_last_reply_with_its_end_token():
    from diyllm.data.preference import encode_reply

    tok = _tok()
    prompt = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "earlier"},
              {"role": "user", "content": "and now?"}]
    ids, mask = encode_reply(tok, prompt, [{"role": "assistant", "content": "yes"}])
    full_ids, sft_mask = encode_chat(tok, prompt + [{"role": "assistant", "content": "yes"}])
    assert ids == full_ids
    trained = [t for t, m in zip(ids, mask) if m]
    assert tok.decode(trained) == "yes<|im_end|>"
    assert sum(sft_mask) > sum(mask)  # SFT would also train "earlier"


def test_bad_rows_are_skipped_counted_and_located(tmp_path, capsys):
    from diyllm.data.preference import PreferenceSource

    good = [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(30)]
    bad = [{"prompt": "q", "chosen": "same", "rejected": "same"}, {"prompt": "q", "chosen": "x"},
           {"prompt": "q", "chosen": "x" * 500, "rejected": "y"}]
    _write(tmp_path / "train.jsonl", good + bad)
    _write(tmp_path / "val.jsonl", good[:4])
    cfg = SimpleNamespace(context_length=64, data_dir=str(tmp_path / "train.jsonl"),
                          val_data=str(tmp_path / "val.jsonl"), seed=0)
    src = PreferenceSource(cfg, _tok())
    rep = src.reports["train"]
    assert rep.skipped == {"chosen equals rejected": 1, "missing chosen/rejected": 1,
                           "longer than context_length=64": 1}
    assert f"{tmp_path / 'train.jsonl'}:31: chosen equals rejected" in rep.examples
    assert "skipped 3 rows" in capsys.readouterr().out
    batch = src.get_batch("train", 4, "cpu")
    assert batch.x.shape == (8, 64) and batch.pairs == 4
    # chosen row i and rejected row i share the prompt: identical up to the first reply token
    first = batch.mask[0].nonzero()[0].item()
    assert (batch.x[0, : first + 1] == batch.x[4, : first + 1]).all()
    state = src.state_dict()
    again = src.get_batch("train", 4, "cpu")
    src.load_state_dict(state)
    assert (src.get_batch("train", 4, "cpu").x == again.x).all()
    _write(tmp_path / "bad.jsonl", bad)
    with pytest.raises(UserError, match="no usable train preference pairs"):
        PreferenceSource(SimpleNamespace(context_length=64, data_dir=str(tmp_path / "bad.jsonl"),
                                         val_data=str(tmp_path / "val.jsonl"), seed=0), _tok(), log=lambda *a: None)


def test_synthetic_pairs_reject_a_wrong_answer_of_the_same_shape():
    from diyllm.data.synthetic_preference import make_preference_splits

    train, val = make_preference_splits(200, 30, seed=3)
    assert all(r["chosen"] != r["rejected"] for r in train + val)
    for r in train:
        if r["task"] == "add":
            assert r["rejected"].isdigit() and abs(int(r["rejected"]) - int(r["chosen"])) <= 2
        if r["task"] == "spell":
            assert len(r["rejected"]) == len(r["chosen"])
    assert not {r["prompt"][-1]["content"] for r in train} & {r["prompt"][-1]["content"] for r in val}


def test_pairs_are_held_compactly_and_batches_are_the_padded_rows(tmp_path):
    """Each pair is kept as its real tokens (uint16 ids, uint8 mask); a batch is the chosen rows, then the
    rejected ones, laid out as right-padded rows of context_length (or, with dynamic_padding, cut after the
    last trained column), with the same DPO log-probabilities either way."""
    import numpy as np
    import torch

    from diyllm.data.jsonl import IGNORE_INDEX
    from diyllm.data.preference import PreferenceSource, encode_reply, read_pairs
    from diyllm.model import DIYConfig, DIYForCausalLM
    from diyllm.training.post_losses import sequence_logps

    rows = [{"prompt": f"question {i}?", "chosen": "yes " * (1 + i % 4), "rejected": f"no {i}"} for i in range(40)]
    _write(tmp_path / "train.jsonl", rows)
    _write(tmp_path / "val.jsonl", rows[:4])
    T = 96
    cfg = dict(context_length=T, data_dir=str(tmp_path / "train.jsonl"), val_data=str(tmp_path / "val.jsonl"), seed=0)
    tok = _tok()
    src = PreferenceSource(SimpleNamespace(**cfg), tok)
    store = src.rows["train"]
    assert store.chosen.ids.dtype == np.uint16 and store.chosen.mask.dtype == np.uint8
    real = sum(len(encode_reply(tok, p.prompt, side)[0])
               for p in read_pairs(tmp_path / "train.jsonl") for side in (p.chosen, p.rejected))
    assert store.chosen.ids.size + store.rejected.ids.size == real  # nothing padded in memory

    def padded_row(ids, mask):  # the plain layout, written out
        x, y, m = np.zeros(T, np.int64), np.full(T, IGNORE_INDEX, np.int64), np.zeros(T, np.float32)
        x[: len(ids) - 1], y[: len(ids) - 1], m[: len(ids) - 1] = ids[:-1], ids[1:], mask[1:]
        return x, y, m

    pairs = read_pairs(tmp_path / "train.jsonl")
    order = src.order["train"].order[:3]  # the first batch's pairs
    batch = src.get_batch("train", 3, "cpu")
    for k, i in enumerate(order):
        for side, row in ((pairs[i].chosen, k), (pairs[i].rejected, 3 + k)):
            expected = padded_row(*encode_reply(tok, pairs[i].prompt, side))
            for got, want in zip((batch.x[row], batch.y[row], batch.mask[row]), expected):
                assert np.array_equal(got.numpy(), want)
    x, y, m = src.rows["val"].padded()
    assert x.shape == (4, 2, T) and np.array_equal(x[:, 1], src.rows["val"].rejected.padded(np.arange(4))[0])

    trimmed = PreferenceSource(SimpleNamespace(**cfg, dynamic_padding=True), tok, log=lambda *a: None)
    short = trimmed.get_batch("train", 3, "cpu")
    width = short.x.shape[1]
    assert width < T and int(batch.mask[:, width:].sum()) == 0 and torch.equal(short.x, batch.x[:, :width])
    torch.manual_seed(0)
    model = DIYForCausalLM(DIYConfig(vocab_size=tok.vocab_size, context_length=T, d_model=32, num_layers=1,
                                     num_heads=2, d_ff=64)).eval()
    with torch.no_grad():
        full = sequence_logps(model(batch.x).logits, batch.y, batch.mask)
        cut = sequence_logps(model(short.x).logits, short.y, short.mask)
    torch.testing.assert_close(cut, full, rtol=1e-5, atol=1e-4)

