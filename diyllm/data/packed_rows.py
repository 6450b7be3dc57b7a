"""SFT rows held compactly: every conversation's tokens in one flat array, padded only per batch.

`encode_rows` (sft.py) is the plain form: one right-padded (x, y, loss_mask) row of context_length per
conversation, 20 bytes per position (int64 x and y, float32 mask) however short the conversation. At
MiniMind's SFT size (~1.2M conversations, context 512) that is ~12 GB before the first step. Here a row
is its truncated tokens (uint16, or int32 above 65,536 ids) and their loss mask (uint8) in two flat
arrays with offsets, 3 bytes per real token, and `padded(rows)` builds a batch exactly as `encode_rows`
lays it out (tests/test_sft_sources.py checks the two are equal, row for row).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from diyllm.data.jsonl import IGNORE_INDEX


class PackedRows:
    """Conversations added one at a time (`add`), then `finish`ed into flat arrays; `padded(idx)` is the
    (x, y, mask) of rows idx: x = ids[:-1], y = ids[1:], mask = mask[1:], right-padded to context_length
    with pad_id / IGNORE_INDEX / 0."""

    def __init__(self, context_length: int, vocab_size: int, pad_id: int = 0):
        self.context_length, self.pad_id = int(context_length), int(pad_id)
        self.dtype = np.uint16 if vocab_size <= 2**16 else np.int32
        self.dropped = 0  # conversations whose truncated form keeps no trained token
        self.trained_tokens = 0
        self._ids: list[np.ndarray] = []
        self._masks: list[np.ndarray] = []
        self.ids = np.zeros(0, self.dtype)
        self.mask = np.zeros(0, np.uint8)
        self.offsets = np.zeros(1, np.int64)

    def add(self, ids: Sequence[int], mask: Sequence[int]) -> bool:
        """Keep the first context_length + 1 tokens of one conversation, unless none of their targets is
        trained (then count it in `dropped`). Returns whether it was kept."""
        ids, mask = ids[: self.context_length + 1], mask[: self.context_length + 1]
        trained = int(sum(mask[1:]))
        if trained == 0:
            self.dropped += 1
            return False
        self._ids.append(np.asarray(ids, dtype=self.dtype))
        self._masks.append(np.asarray(mask, dtype=np.uint8))
        self.trained_tokens += trained
        return True

    def finish(self) -> PackedRows:
        """Join what was added into the flat arrays (and let the per-conversation pieces go)."""
        if self._ids:
            lengths = [len(a) for a in self._ids]
            self.ids = np.concatenate([self.ids, *self._ids])
            self.mask = np.concatenate([self.mask, *self._masks])
            self.offsets = np.concatenate([self.offsets, self.offsets[-1] + np.cumsum(lengths)])
        self._ids, self._masks = [], []
        return self

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def padded(self, rows: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(x, y, mask) of `rows`, each (len(rows), context_length): int64, int64, float32."""
        T = self.context_length
        x = np.full((len(rows), T), self.pad_id, dtype=np.int64)
        y = np.full((len(rows), T), IGNORE_INDEX, dtype=np.int64)
        m = np.zeros((len(rows), T), dtype=np.float32)
        for r, i in enumerate(rows):
            start, end = self.offsets[i], self.offsets[i + 1]
            n = end - start - 1
            x[r, :n], y[r, :n] = self.ids[start : end - 1], self.ids[start + 1 : end]
            m[r, :n] = self.mask[start + 1 : end]
        return x, y, m


__all__ = ["PackedRows"]
