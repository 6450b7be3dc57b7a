"""Supervised fine-tuning data: conversations JSONL -> (x, y, loss_mask) rows with assistant-only loss.

Each line: {"conversations": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}. A conversation
is encoded with the chat template (diyllm.data.chat_template.encode_chat), truncated to
context_length + 1 tokens and right-padded. Row layout: x = ids[:-1], y = ids[1:], loss_mask = mask[1:]
(the mask belongs to the token being predicted), y = -100 and mask = 0 on padding.

A conversation whose truncated form keeps no trained token (the assistant reply fell beyond the context)
would contribute nothing but could make a micro-batch with zero trained tokens; such conversations are
dropped at load time and counted (`dropped`). Every row therefore has at least one trained target, so no
micro-batch can have an all-zero mask (and cross_entropy returns 0, not NaN, even if one did).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from diyllm.data.chat_template import add_chat_tokens, encode_chat, validate_conversation
from diyllm.data.jsonl import (
    IGNORE_INDEX,
    EpochRows,
    is_val_document,
    iter_jsonl,
    resolve_jsonl_paths,
    resolve_tokenizer,
    to_device,
)
from diyllm.errors import UserError


def read_conversations(spec, split: str | None = None) -> list[list[dict]]:
    """Validated conversations of a file/folder/glob; split "train"/"val" applies the hash hold-out."""
    out = []
    for path in resolve_jsonl_paths(spec):
        for lineno, conv in iter_jsonl(path, "conversations"):
            if split is not None and is_val_document(path, lineno) != (split == "val"):
                continue
            out.append(validate_conversation(conv, f"{path}:{lineno}"))
    return out


def encode_rows(tokenizer: Any, conversations: list[list[dict]], context_length: int, pad_id: int = 0):
    """(x, y, mask, dropped): one right-padded row per conversation that keeps a trained token."""
    T = context_length
    xs, ys, ms = [], [], []
    dropped = 0
    for conv in conversations:
        ids, mask = encode_chat(tokenizer, conv)
        ids, mask = ids[: T + 1], mask[: T + 1]
        if sum(mask[1:]) == 0:
            dropped += 1
            continue
        n = len(ids) - 1
        x = np.full(T, pad_id, dtype=np.int64)
        y = np.full(T, IGNORE_INDEX, dtype=np.int64)
        m = np.zeros(T, dtype=np.float32)
        x[:n], y[:n], m[:n] = ids[:-1], ids[1:], mask[1:]
        xs.append(x)
        ys.append(y)
        ms.append(m)
    if not xs:
        return (np.zeros((0, T), np.int64), np.zeros((0, T), np.int64), np.zeros((0, T), np.float32), dropped)
    return np.stack(xs), np.stack(ys), np.stack(ms), dropped


class SFTSource:
    """BatchSource for data_format = "sft": data_dir = conversations JSONL (file/folder/glob).

    The tokenizer (from_config: tokenizer_path, else the init_from checkpoint's, else tokenizer.json beside
    the data) gets the chat special tokens if missing (`added_tokens` lists the new ids: the model's
    embedding rows must then be grown, which `diyllm sft` does). Validation data: val_data or the ~5% hash
    hold-out. Rows are served in a seeded order, each once per epoch.
    """

    def __init__(self, data: str | os.PathLike, context_length: int, tokenizer: Any, *, val_data: str = "",
                 seed: int = 1337):
        self.data, self.val_data = os.fspath(data), os.fspath(val_data) if val_data else ""
        self.context_length = int(context_length)
        self.added_tokens = add_chat_tokens(tokenizer)
        self.tokenizer = tokenizer
        self.tokenizer_path = None  # the tokenizer may have grown: the trainer saves the object itself
        self.vocab_size = int(tokenizer.vocab_size)
        self.bytes_per_token = None
        self.rank, self.world_size = 0, 1
        self.dropped: dict[str, int] = {}
        self.empty_batches_skipped = 0
        val_spec = self.val_data
        self.rows: dict[str, EpochRows] = {}
        for split in ("train", "val"):
            convs = read_conversations(val_spec if (split == "val" and val_spec) else self.data,
                                       None if val_spec else split)
            x, y, m, dropped = encode_rows(tokenizer, convs, self.context_length)
            self.dropped[split] = dropped
            if len(x) == 0:
                raise UserError(
                    f"no usable {split} conversations in {val_spec if split == 'val' and val_spec else self.data}"
                    f" ({len(convs)} read, {dropped} dropped because no assistant token fits in context_length="
                    f"{self.context_length}); add data, set val_data=PATH, or raise context_length"
                )
            self.rows[split] = EpochRows(x, y, m, int(seed) * 2 + (split == "val"))
        self.trained_tokens = {s: int(r.mask.sum()) for s, r in self.rows.items()}

    @classmethod
    def from_config(cls, cfg: Any, tokenizer: Any = None) -> SFTSource:
        """The source a training config describes (data_dir, val_data, context_length, seed, tokenizer)."""
        if tokenizer is None:
            tokenizer, _ = resolve_tokenizer(cfg.tokenizer_path, cfg.init_from, cfg.data_dir)
        return cls(cfg.data_dir, cfg.context_length, tokenizer, val_data=cfg.val_data, seed=cfg.seed)

    def set_rank(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = int(rank), int(world_size)

    def get_batch(self, split: str, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if split not in self.rows:
            raise ValueError(f"unknown split {split!r}; use train or val")
        rows = self.rows[split]
        while True:
            idx = rows.take(batch_size * self.world_size)[self.rank :: self.world_size]
            if rows.mask[idx].sum() > 0:  # always true by construction (rows without targets are dropped)
                return to_device(rows.x[idx], rows.y[idx], rows.mask[idx], device)
            self.empty_batches_skipped += 1

    def state_dict(self) -> dict:
        return {"kind": "sft", **{s: r.state_dict() for s, r in self.rows.items()}}

    def load_state_dict(self, state: dict) -> None:
        for split, rows in self.rows.items():
            if split in state:
                rows.load_state_dict(state[split])
