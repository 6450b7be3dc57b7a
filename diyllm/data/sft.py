"""Supervised fine-tuning data: conversations -> (x, y, loss_mask) rows with assistant-only loss.

Each record: {"conversations": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}, one per line
of a JSONL file (plain, .gz or .zst) or one per row of a Parquet file's conversations column (a list of
{role, content} structs, or JSON text); the column/key name is configurable (conversations_field). Files are
read through diyllm.data.readers, the same streaming readers as `diyllm prepare`; `hf:OWNER/DATASET/GLOB`
names files of a Hugging Face Hub dataset (fetched into its cache by diyllm.data.hub). A conversation
is encoded with the chat template (diyllm.data.chat_template.encode_chat), truncated to
context_length + 1 tokens and right-padded. Row layout: x = ids[:-1], y = ids[1:], loss_mask = mask[1:]
(the mask belongs to the token being predicted), y = -100 and mask = 0 on padding.

A conversation whose truncated form keeps no trained token (the assistant reply fell beyond the context)
would contribute nothing but could make a micro-batch with zero trained tokens; such conversations are
dropped at load time and counted (`dropped`). Every row therefore has at least one trained target, so no
micro-batch can have an all-zero mask (and cross_entropy returns 0, not NaN, even if one did).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diyllm.data.chat_template import add_chat_tokens, encode_chat, validate_conversation
from diyllm.data.hub import is_hub_source, resolve_hub_sources
from diyllm.data.jsonl import (
    IGNORE_INDEX,
    EpochOrder,
    is_val_document,
    resolve_jsonl_paths,
    resolve_tokenizer,
    to_device,
    trim_padding,
)
from diyllm.data.packed_rows import PackedRows
from diyllm.data.readers import file_kind, iter_jsonl_values, iter_parquet_values
from diyllm.data.sources import ReadStats
from diyllm.errors import UserError

SFT_ENDINGS = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".json.zst", ".parquet")  # picked up in folders
CONVERSATIONS_FIELD = "conversations"


def conversation_files(spec: str | os.PathLike | list) -> list[str]:
    """The files of an SFT data spec: a file, a folder (its JSONL/Parquet files), a glob, or an hf: source."""
    specs = spec if isinstance(spec, (list, tuple)) else [spec]
    local = [os.fspath(s) for s in specs if not is_hub_source(os.fspath(s))]
    remote = [os.fspath(s) for s in specs if is_hub_source(os.fspath(s))]
    return sorted(set(resolve_jsonl_paths(local, SFT_ENDINGS) if local else []) | set(resolve_hub_sources(remote)))


def _as_messages(value: Any, where: str) -> Any:
    if isinstance(value, str):  # some datasets store the messages as JSON text
        try:
            return json.loads(value)
        except ValueError as exc:
            raise UserError(f"{where}: the conversation is text that is not JSON ({exc})") from None
    return value


def iter_conversations(path: str, field: str = CONVERSATIONS_FIELD) -> Iterator[tuple[int, str, list[dict]]]:
    """(line or row number, where, validated messages) of every record of one JSONL or Parquet file."""
    stats = ReadStats()
    if file_kind(Path(path)) == "parquet":
        values = iter_parquet_values(Path(path), field, stats, text=False, option="--conversations_field")
        rows = True
    else:  # JSONL, plain or .gz/.zst (an explicitly named file is read as JSONL whatever its name)
        fix = f'each line must be an object with a "{field}" list of messages (another key: --conversations_field)'
        values = iter_jsonl_values(Path(path), field, stats, check=None, fix_hint=fix,
                                   utf8_hint="the file is not UTF-8: re-encode it (e.g. `iconv -f latin1 -t utf-8`)")
        rows = False
    for number, value in values:
        at = f"{path}:row {number}" if rows else f"{path}:{number}"
        yield number, at, validate_conversation(_as_messages(value, at), at)


def iter_held_out(spec, field: str = CONVERSATIONS_FIELD) -> Iterator[tuple[str, list[dict]]]:
    """("train" | "val" by the hash hold-out, conversation) for every validated conversation of `spec`, in
    file order (each file read once, one conversation in memory at a time)."""
    for path in conversation_files(spec):
        for number, _, conv in iter_conversations(path, field):
            yield ("val" if is_val_document(path, number) else "train"), conv


def read_conversations(spec, split: str | None = None, field: str = CONVERSATIONS_FIELD) -> list[list[dict]]:
    """Validated conversations of a file/folder/glob/hf: spec; split "train"/"val" applies the hash hold-out."""
    return [conv for side, conv in iter_held_out(spec, field) if split is None or side == split]


def iter_split_conversations(spec, val_spec: str = "", field: str = CONVERSATIONS_FIELD
                             ) -> Iterator[tuple[str, list[dict]]]:
    """("train" | "val", conversation) for all of `spec` and all of `val_spec` when given, else with the
    hash hold-out of `spec`."""
    if not val_spec:
        yield from iter_held_out(spec, field)
        return
    for split, source in (("train", spec), ("val", val_spec)):
        yield from ((split, conv) for _, conv in iter_held_out(source, field))


def read_split_conversations(spec, val_spec: str = "", field: str = CONVERSATIONS_FIELD) -> dict[str, list]:
    """{"train": [...], "val": [...]}: `iter_split_conversations` collected."""
    out: dict[str, list] = {"train": [], "val": []}
    for split, conv in iter_split_conversations(spec, val_spec, field):
        out[split].append(conv)
    return out


def encode_rows(tokenizer: Any, conversations: list[list[dict]], context_length: int, pad_id: int = 0):
    """(x, y, mask, dropped): one right-padded row per conversation that keeps a trained token. The plain
    layout; SFTSource holds the same rows packed (diyllm/data/packed_rows.py) and pads them per batch."""
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
    """BatchSource for data_format = "sft": data_dir = conversations (JSONL/Parquet file, folder, glob or hf:).

    The tokenizer (from_config: tokenizer_path, else the init_from checkpoint's, else tokenizer.json beside
    the data) gets the chat special tokens if missing (`added_tokens` lists the new ids: the model's
    embedding rows must then be grown, which `diyllm sft` does). Validation data: val_data or the ~5% hash
    hold-out. Rows are served in a seeded order, each once per epoch. Conversations are encoded as they are
    read and kept as PackedRows (~3 bytes per token), so a large SFT set fits in memory.
    """

    def __init__(self, data: str | os.PathLike, context_length: int, tokenizer: Any, *, val_data: str = "",
                 seed: int = 1337, dynamic_padding: bool = False, field: str = CONVERSATIONS_FIELD):
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
        self.dynamic_padding = bool(dynamic_padding)  # trim batches to the longest row
        val_spec = self.val_data
        self.rows = {s: PackedRows(self.context_length, self.vocab_size) for s in ("train", "val")}
        read = dict.fromkeys(self.rows, 0)
        for split, conv in iter_split_conversations(self.data, val_spec, field):
            self.rows[split].add(*encode_chat(tokenizer, conv))
            read[split] += 1
        self.order: dict[str, EpochOrder] = {}
        for split, rows in self.rows.items():
            rows.finish()
            self.dropped[split] = rows.dropped
            if len(rows) == 0:
                raise UserError(
                    f"no usable {split} conversations in {val_spec if split == 'val' and val_spec else self.data}"
                    f" ({read[split]} read, {rows.dropped} dropped because no assistant token fits in "
                    f"context_length={self.context_length}); add data, set val_data=PATH, or raise context_length"
                )
            self.order[split] = EpochOrder(len(rows), int(seed) * 2 + (split == "val"))
        self.trained_tokens = {s: r.trained_tokens for s, r in self.rows.items()}

    @classmethod
    def from_config(cls, cfg: Any, tokenizer: Any = None) -> SFTSource:
        """The source a training config describes (data_dir, val_data, context_length, seed, tokenizer)."""
        if tokenizer is None:
            tokenizer, _ = resolve_tokenizer(cfg.tokenizer_path, cfg.init_from, cfg.data_dir)
        return cls(cfg.data_dir, cfg.context_length, tokenizer, val_data=cfg.val_data, seed=cfg.seed,
                   dynamic_padding=cfg.dynamic_padding,
                   field=getattr(cfg, "conversations_field", CONVERSATIONS_FIELD))

    def set_rank(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = int(rank), int(world_size)

    def get_batch(self, split: str, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if split not in self.rows:
            raise ValueError(f"unknown split {split!r}; use train or val")
        while True:
            idx = self.order[split].take(batch_size * self.world_size)[self.rank :: self.world_size]
            x, y, mask = self.rows[split].padded(idx)
            if mask.sum() > 0:  # always true by construction (rows without targets are dropped)
                if self.dynamic_padding:
                    x, y, mask = trim_padding(x, y, mask)
                return to_device(x, y, mask, device)
            self.empty_batches_skipped += 1

    def state_dict(self) -> dict:
        return {"kind": "sft", **{s: o.state_dict() for s, o in self.order.items()}}

    def load_state_dict(self, state: dict) -> None:
        for split, order in self.order.items():
            if split in state:
                order.load_state_dict(state[split])
