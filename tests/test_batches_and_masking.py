"""Dynamic padding: a padded batch is trimmed to its longest row, and the loss does not change."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diyllm.data.jsonl import JsonlPretrainSource, trim_padding
from diyllm.model import DIYConfig, DIYForCausalLM
from diyllm.training.config import TrainConfig
from diyllm.training.loss import cross_entropy


def byte_tokenizer():
    from diyllm.tokenizers import BPETokenizer

    return BPETokenizer({i: bytes([i]) for i in range(256)}, [], special_tokens=["<|endoftext|>"])


def test_trim_padding_keeps_every_trained_column():
    mask = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    x = np.arange(10).reshape(2, 5)
    tx, ty, tm = trim_padding(x, x + 1, mask)
    assert tx.shape == (2, 3) and tm.sum() == mask.sum() and np.array_equal(ty, (x + 1)[:, :3])
    assert tx.flags["C_CONTIGUOUS"]


@pytest.mark.parametrize("fmt", ["jsonl", "sft"])
def test_dynamic_padding_gives_narrower_batches_with_the_same_loss(tmp_path, fmt):
    tok = byte_tokenizer()
    if fmt == "sft":
        from diyllm.data.chat_template import add_chat_tokens

        add_chat_tokens(tok)
        rows = [{"conversations": [{"role": "user", "content": f"q{i}"},
                                   {"role": "assistant", "content": "a" * (1 + i % 4)}]} for i in range(40)]
    else:
        rows = [{"text": f"doc {i} " * (1 + i % 3)} for i in range(40)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tok.save(tmp_path / "tok.json")
    common = dict(data_dir=str(tmp_path / "d.jsonl"), data_format=fmt, context_length=96, jsonl_mode="pad",
                  tokenizer_path=str(tmp_path / "tok.json"), progress=False)
    if fmt == "sft":
        from diyllm.data.sft import SFTSource as Source
    else:
        Source = JsonlPretrainSource
    fixed = Source.from_config(TrainConfig(**common))
    dynamic = Source.from_config(TrainConfig(**common, dynamic_padding=True))
    model = DIYForCausalLM(DIYConfig(vocab_size=fixed.vocab_size, context_length=96, d_model=32, num_layers=1,
                                     num_heads=2))
    for _ in range(4):
        (x, y, m), (dx, dy, dm) = fixed.get_batch("train", 4, "cpu"), dynamic.get_batch("train", 4, "cpu")
        assert dx.shape[1] < x.shape[1] == 96  # same rows, fewer columns
        assert torch.equal(dx, x[:, : dx.shape[1]]) and dm.sum() == m.sum()
        full = cross_entropy(model(x).logits, y, loss_mask=m)
        trimmed = cross_entropy(model(dx).logits, dy, loss_mask=dm)
        torch.testing.assert_close(trimmed, full, rtol=1e-5, atol=1e-6)


def test_mlm_style_masks_about_fifteen_percent_and_only_those_positions_train():
    from diyllm.lab.masking import MASK_ID, mlm_style

    x = torch.randint(0, 256, (64, 128))
    masked_x, loss_mask = mlm_style(x, x, torch.Generator().manual_seed(0))
    share = loss_mask.float().mean().item()
    assert 0.13 < share < 0.17
    assert (masked_x[loss_mask] == MASK_ID).all() and torch.equal(masked_x[~loss_mask], x[~loss_mask])
