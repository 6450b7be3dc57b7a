"""Pretraining on JSONL text: `{"text": "..."}` per line, packed into windows or padded per document.

Two layouts of the same documents:

* pack (default): every document is tokenized and followed by the end-of-text token, the documents are
  concatenated, and the stream is cut into consecutive windows of context_length + 1 tokens (the last
  token of a window is the first of the next, so every token is a target exactly once per epoch). No
  padding is wasted; attention crosses document boundaries, as in GPT-2 style pretraining, and the
  end-of-text token tells the model where a new document starts.
* pad: one document per row, truncated to context_length + 1 tokens and right-padded; the loss mask is
  0 on padding, so the loss is the mean over real target tokens only.

Train/val split: `val_data` names separate files; otherwise ~5% of the documents go to val, chosen by a
hash of (file name, line number), which does not depend on file order, worker count or epoch.

`JsonlPretrainSource` is the trainer's BatchSource for `data_format = "jsonl"`; with `streaming = true`
it reads through `diyllm.data.streaming.StreamingJsonlDataset` instead of loading everything.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

# The files half (finding, reading, splitting JSONL files) lives in jsonl_files.py, which streaming.py
# shares without importing this module (that would be a cycle: this module imports streaming.py).
from diyllm.data.jsonl_files import (  # noqa: F401  (re-exported: tests and users import them here)
    IGNORE_INDEX,
    VAL_PERCENT,
    is_val_document,
    iter_jsonl,
    iter_text_lines,
    parse_line,
    read_split_texts,
    resolve_jsonl_paths,
)
from diyllm.errors import UserError

# ---- layouts ---------------------------------------------------------------------------------------------


def pack_documents(docs: list[list[int]], eot_id: int | None) -> np.ndarray:
    """Concatenate token lists, each followed by end-of-text (if the tokenizer has one)."""
    parts = []
    for d in docs:
        parts.append(np.asarray(d, dtype=np.int64))
        if eot_id is not None:
            parts.append(np.asarray([eot_id], dtype=np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def packed_windows(tokens: np.ndarray, context_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut a token stream into (x, y, mask) rows of context_length, every target used exactly once.

    Window k covers tokens[kT : kT + T + 1]. The last window is right-padded; its mask is 0 there.
    """
    T = context_length
    n_targets = len(tokens) - 1
    if n_targets < 1:
        raise UserError("not enough tokens to make even one training window")
    rows = -(-n_targets // T)
    padded = np.zeros(rows * T + 1, dtype=np.int64)
    padded[: len(tokens)] = tokens
    idx = np.arange(rows)[:, None] * T + np.arange(T + 1)[None, :]
    windows = padded[idx]
    mask = (idx[:, 1:] < len(tokens)).astype(np.float32)
    y = np.where(mask > 0, windows[:, 1:], IGNORE_INDEX)
    return windows[:, :-1], y, mask


def padded_documents(docs: list[list[int]], context_length: int, eot_id: int | None, pad_id: int = 0):
    """One row per document (+ end-of-text), truncated to context_length + 1 tokens; mask 0 on padding."""
    T = context_length
    x = np.full((len(docs), T), pad_id, dtype=np.int64)
    y = np.full((len(docs), T), IGNORE_INDEX, dtype=np.int64)
    for i, d in enumerate(docs):
        seq = (list(d) + ([eot_id] if eot_id is not None else []))[: T + 1]
        n = len(seq) - 1
        if n < 1:
            continue
        x[i, : n] = seq[:-1]
        y[i, : n] = seq[1:]
    mask = (y != IGNORE_INDEX).astype(np.float32)
    keep = mask.sum(axis=1) > 0  # a one-token document has no target: drop it
    return x[keep], y[keep], mask[keep]


class EpochOrder:
    """Row numbers 0..n-1 in a seeded random order, each exactly once per epoch; the position is resumable."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.pos = int(n), seed, 0, 0
        self.order = self._order()

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def take(self, n: int) -> np.ndarray:
        out = []
        while n > 0:
            if self.pos == len(self.order):
                self.epoch, self.pos = self.epoch + 1, 0
                self.order = self._order()
            k = min(n, len(self.order) - self.pos)
            out.append(self.order[self.pos : self.pos + k])
            self.pos, n = self.pos + k, n - k
        return np.concatenate(out)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self.order = self._order()


class EpochRows(EpochOrder):
    """Padded (x, y, mask) rows drawn in an EpochOrder."""

    def __init__(self, x: np.ndarray, y: np.ndarray, mask: np.ndarray, seed: int):
        if len(x) == 0:
            raise UserError("no training rows: the JSONL split is empty or every document is too short")
        self.x, self.y, self.mask = x, y, mask
        super().__init__(len(x), seed)


def trim_padding(x: np.ndarray, y: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dynamic padding: drop the trailing columns no row of the batch trains on, so the batch is only as
    long as its longest row instead of context_length. The loss is unchanged: those positions have loss
    mask 0, and attention is causal, so no earlier position ever sees them."""
    used = np.flatnonzero(mask.any(axis=0))
    width = int(used[-1]) + 1 if len(used) else 1
    return tuple(np.ascontiguousarray(a[:, :width]) for a in (x, y, mask))


def to_device(x: np.ndarray, y: np.ndarray, mask: np.ndarray, device) -> tuple[torch.Tensor, ...]:
    device = torch.device(device)
    tensors = (torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(mask))
    if device.type == "cuda":
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in tensors)
    return tuple(t.to(device) for t in tensors)


# ---- tokenizer -------------------------------------------------------------------------------------------


def resolve_tokenizer(tokenizer_path: str, init_from: str, data: str | os.PathLike) -> tuple[Any, str]:
    """The tokenizer for JSONL/SFT data and where it came from.

    Order: tokenizer_path; the checkpoint named by init_from (fine-tuning must keep the pretraining
    tokenizer); tokenizer.json beside the data.
    """
    from diyllm.tokenizers import load_tokenizer

    if tokenizer_path:
        return load_tokenizer(tokenizer_path), str(tokenizer_path)
    if init_from.startswith("hf:") or (init_from not in ("scratch", "resume") and os.path.exists(init_from)):
        from diyllm.checkpoints import tokenizer_from_text
        from diyllm.loading import read_model_reference

        ckpt, path = read_model_reference(init_from)
        tok = tokenizer_from_text(ckpt.get("tokenizer"), path)
        if tok is not None:
            return tok, path
    folder = Path(data) if Path(data).is_dir() else Path(data).parent
    candidate = folder / "tokenizer.json"
    if candidate.exists():
        return load_tokenizer(candidate), str(candidate)
    raise UserError(
        f"no tokenizer for {data}: set tokenizer_path=PATH/tokenizer.json (e.g. one written by "
        "`diyllm prepare`), or init_from=a checkpoint, or put tokenizer.json beside the data"
    )


# ---- the trainer's source --------------------------------------------------------------------------------


class JsonlPretrainSource:
    """BatchSource over {"text": ...} JSONL (see the module docstring for pack/pad and the val split).

    In memory (default): all documents are tokenized once at start (with a progress bar) and rows are
    served in a seeded random order, each exactly once per epoch. With streaming=True the files are read
    lazily through a DataLoader (`StreamingJsonlDataset`), for corpora that do not fit in memory.
    `from_config(cfg)` takes the arguments from a training config (data_dir, val_data, jsonl_mode, ...).
    """

    def __init__(self, data: str | os.PathLike, context_length: int, tokenizer: Any, *,
                 tokenizer_path: str | None = None, val_data: str = "", mode: str = "pack", seed: int = 1337,
                 streaming: bool = False, num_workers: int = 0, shuffle_buffer: int = 10000, progress: bool = True,
                 dynamic_padding: bool = False):
        self.data, self.val_data = os.fspath(data), os.fspath(val_data) if val_data else ""
        self.context_length = int(context_length)
        self.mode = mode
        if self.mode not in ("pack", "pad"):
            raise UserError(f"jsonl_mode={self.mode!r} must be 'pack' or 'pad'")
        self.tokenizer, self.tokenizer_path = tokenizer, tokenizer_path or None
        self.vocab_size = int(tokenizer.vocab_size)
        self.eot_id = getattr(tokenizer, "eot_id", None)
        self.seed = int(seed)
        self.rank, self.world_size = 0, 1
        self.streaming, self.num_workers, self.shuffle_buffer = bool(streaming), int(num_workers), int(shuffle_buffer)
        self.progress = progress
        self.dynamic_padding = bool(dynamic_padding)  # pad mode: trim each batch to its longest row
        self.bytes_per_token: float | None = None
        if self.streaming:
            self._streams: dict[str, Any] = {}
            self._consumed = {"train": 0, "val": 0}
        else:
            self.rows = {split: self._load_split(split) for split in ("train", "val")}

    @classmethod
    def from_config(cls, cfg: Any, tokenizer: Any = None) -> JsonlPretrainSource:
        """The source a training config describes; the tokenizer is resolved (see resolve_tokenizer)."""
        if tokenizer is None:
            tokenizer, path = resolve_tokenizer(cfg.tokenizer_path, cfg.init_from, cfg.data_dir)
        else:
            path = cfg.tokenizer_path or None
        return cls(cfg.data_dir, cfg.context_length, tokenizer, tokenizer_path=path, val_data=cfg.val_data,
                   mode=cfg.jsonl_mode, seed=cfg.seed, streaming=cfg.streaming, num_workers=cfg.num_workers,
                   shuffle_buffer=cfg.shuffle_buffer, progress=cfg.progress,
                   dynamic_padding=cfg.dynamic_padding)

    def _load_split(self, split: str) -> EpochRows:
        from tqdm.auto import tqdm

        texts = read_split_texts(self.data, split, self.val_data)
        if not texts:
            raise UserError(
                f"the {split} split of {self.data} is empty (val holds ~{VAL_PERCENT}% of the documents); "
                "add documents or set val_data=PATH"
            )
        docs = [self.tokenizer.encode(t) for t in tqdm(texts, desc=f"tokenizing {split}", unit="doc",
                                                        disable=not self.progress)]
        if split == "val":
            n_tokens = sum(len(d) for d in docs)
            self.bytes_per_token = sum(len(t.encode("utf-8")) for t in texts) / max(1, n_tokens)
        if self.mode == "pack":
            x, y, mask = packed_windows(pack_documents(docs, self.eot_id), self.context_length)
        else:
            x, y, mask = padded_documents(docs, self.context_length, self.eot_id)
        seed = self.seed * 2 + (split == "val")
        return EpochRows(x, y, mask, seed)

    def set_rank(self, rank: int, world_size: int) -> None:
        """Under DDP each rank takes every world_size-th row of the shared order (in memory) or its own
        shard of the lines (streaming), so no row is used by two ranks in the same step."""
        self.rank, self.world_size = int(rank), int(world_size)

    def get_batch(self, split: str, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if split not in ("train", "val"):
            raise ValueError(f"unknown split {split!r}; use train or val")
        if self.streaming:
            return self._stream_batch(split, batch_size, device)
        rows = self.rows[split]
        # all ranks walk the same order; rank r takes rows r, r+W, r+2W, ... of each global batch
        idx = rows.take(batch_size * self.world_size)[self.rank :: self.world_size]
        x, y, mask = rows.x[idx], rows.y[idx], rows.mask[idx]
        if self.dynamic_padding:
            x, y, mask = trim_padding(x, y, mask)
        return to_device(x, y, mask, device)

    def _stream_batch(self, split: str, batch_size: int, device):
        it = self._streams.get(split)
        if it is None:
            it = self._streams[split] = self._open_stream(split, batch_size, skip=self._consumed[split])
        x, y, mask = (t.numpy() for t in next(it))
        self._consumed[split] += 1
        if self.dynamic_padding:
            x, y, mask = trim_padding(x, y, mask)
        return to_device(x, y, mask, device)

    def _open_stream(self, split: str, batch_size: int, skip: int) -> Iterator:
        from diyllm.data.streaming import StreamingJsonlDataset, endless_batches

        val_spec = self.val_data
        ds = StreamingJsonlDataset(
            val_spec if (split == "val" and val_spec) else self.data,
            tokenizer=self.tokenizer_path or self.tokenizer, context_length=self.context_length,
            mode=self.mode, split=None if val_spec else split, seed=self.seed + (split == "val"),
            rank=self.rank, world_size=self.world_size, shuffle_buffer=self.shuffle_buffer,
        )
        return endless_batches(ds, batch_size, self.num_workers, skip=skip)

    def state_dict(self) -> dict:
        if self.streaming:
            return {"kind": "jsonl-stream", "consumed": dict(self._consumed)}
        return {"kind": "jsonl", **{s: r.state_dict() for s, r in self.rows.items()}}

    def load_state_dict(self, state: dict) -> None:
        if self.streaming:
            self._consumed = {k: int(v) for k, v in state.get("consumed", {}).items()} or self._consumed
            self._streams = {}
            return
        for split, rows in self.rows.items():
            if split in state:
                rows.load_state_dict(state[split])
