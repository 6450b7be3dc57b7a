"""JSONL pretraining data: packing keeps every token once, padding is masked out, splits, resume, errors."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from diyllm.data.jsonl import (
    JsonlPretrainSource,
    pack_documents,
    packed_windows,
    padded_documents,
    read_split_texts,
)
from diyllm.errors import UserError
from diyllm.training.config import TrainConfig
from diyllm.training.loss import cross_entropy

pytestmark = pytest.mark.usefixtures("one_thread")


def byte_tokenizer():
    from diyllm.tokenizers import BPETokenizer

    return BPETokenizer({i: bytes([i]) for i in range(256)}, [], special_tokens=["<|endoftext|>"])


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def test_packed_windows_use_every_token_exactly_once_as_a_target():
    tokens = np.arange(100, 150)  # 50 tokens
    x, y, mask = packed_windows(tokens, 8)
    targets = y[mask > 0]
    assert sorted(targets.tolist()) == tokens[1:].tolist()  # each target once
    assert x[mask > 0].tolist() == tokens[:-1].tolist()  # inputs in order, each once
    assert (y[mask == 0] == -100).all()
    assert x.shape == (7, 8)  # ceil(49 / 8) windows


def test_pack_documents_separates_documents_with_end_of_text():
    packed = pack_documents([[1, 2], [3], [4, 5, 6]], eot_id=0)
    assert packed.tolist() == [1, 2, 0, 3, 0, 4, 5, 6, 0]


def test_padded_documents_mask_exactly_the_padding_and_loss_is_masked_mean():
    x, y, mask = padded_documents([[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11], [12]], 4, eot_id=0, pad_id=0)
    assert y.tolist() == [[2, 3, 0, -100], [5, 6, 7, 8], [0, -100, -100, -100]]  # truncated to T + 1 tokens
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 16)
    yt, mt = torch.from_numpy(y), torch.from_numpy(mask)
    loss = cross_entropy(logits, yt, loss_mask=mt)
    real = mt.bool()
    manual = torch.nn.functional.cross_entropy(logits[real], yt[real])
    torch.testing.assert_close(loss, manual)


def _cfg(tmp_path, data, **kw):
    tok = byte_tokenizer()
    tok.save(tmp_path / "tokenizer.json")
    return TrainConfig(data_dir=str(data), data_format="jsonl", context_length=16, progress=False,
                       tokenizer_path=str(tmp_path / "tokenizer.json"), **kw), tok


def test_jsonl_source_packs_one_epoch_with_every_token_once(tmp_path):
    texts = [f"document number {i} " + "x" * (i % 7) for i in range(60)]
    write_jsonl(tmp_path / "a.jsonl", texts)
    cfg, tok = _cfg(tmp_path, tmp_path / "a.jsonl")
    src = JsonlPretrainSource.from_config(cfg)
    assert src.vocab_size == tok.vocab_size and src.bytes_per_token == pytest.approx(1.0, rel=0.2)
    train = read_split_texts(cfg.data_dir, "train")
    val = read_split_texts(cfg.data_dir, "val")
    assert sorted(train + val) == sorted(texts) and not set(train) & set(val) and val
    n_rows = len(src.rows["train"].x)
    targets = Counter()
    for _ in range(n_rows // 4):
        x, y, mask = src.get_batch("train", 4, "cpu")
        assert x.shape == (4, 16) and x.dtype == torch.int64
        targets.update(y[mask > 0].tolist())
    x, y, mask = src.get_batch("train", n_rows % 4 or 4, "cpu")
    if n_rows % 4:
        targets.update(y[mask > 0].tolist())
    stream = pack_documents([tok.encode(t) for t in train], tok.eot_id)
    assert targets == Counter(stream[1:].tolist())


def test_jsonl_source_resumes_exactly_and_pad_mode_masks(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [f"doc {i} " * (1 + i % 5) for i in range(80)])
    cfg, _ = _cfg(tmp_path, tmp_path, jsonl_mode="pad")
    a = JsonlPretrainSource.from_config(cfg)
    for _ in range(5):
        a.get_batch("train", 3, "cpu")
    state = json.loads(json.dumps(a.state_dict()))  # plain types only
    expected = [a.get_batch("train", 3, "cpu") for _ in range(20)]
    b = JsonlPretrainSource.from_config(cfg)
    b.load_state_dict(state)
    for want, got in zip(expected, (b.get_batch("train", 3, "cpu") for _ in range(20))):
        for w, g in zip(want, got):
            assert torch.equal(w, g)
    x, y, mask = a.get_batch("val", 4, "cpu")
    assert ((mask == 0) == (y == -100)).all() and mask.sum() > 0


def test_bad_jsonl_lines_are_clear_errors(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": broken\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad.jsonl:2: invalid JSON"):
        read_split_texts(tmp_path / "bad.jsonl", "train")
    (tmp_path / "bad.jsonl").write_text('{"content": "no text field"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r'bad.jsonl:1: expected an object with a "text" field'):
        read_split_texts(tmp_path / "bad.jsonl", "train")
    with pytest.raises(UserError, match="does not exist"):
        read_split_texts(tmp_path / "missing.jsonl", "train")


def test_streaming_source_serves_batches_and_resumes(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [f"streamed doc {i} " * (1 + i % 3) for i in range(50)])
    cfg, _ = _cfg(tmp_path, tmp_path / "a.jsonl", streaming=True, shuffle_buffer=8)
    a = JsonlPretrainSource.from_config(cfg)
    for _ in range(3):
        x, y, mask = a.get_batch("train", 2, "cpu")
        assert x.shape == (2, 16) and torch.equal(x[:, 1:][mask[:, :-1] > 0], y[:, :-1][mask[:, :-1] > 0])
    state = a.state_dict()
    want = [a.get_batch("train", 2, "cpu") for _ in range(4)]
    b = JsonlPretrainSource.from_config(cfg)
    b.load_state_dict(state)
    for w, g in zip(want, (b.get_batch("train", 2, "cpu") for _ in range(4))):
        assert all(torch.equal(p, q) for p, q in zip(w, g))
    assert a.get_batch("val", 2, "cpu")[0].shape[1] == 16
