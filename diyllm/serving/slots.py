"""A KV cache of independent rows ("slots") for continuous batching.

`diyllm.model.kv_cache.KVCache` keeps one length for the whole batch, which fits a batch that starts and
ends together. A server's rows start and finish at different times, so here every slot has its own
length: a new request is prefilled alone into a free slot, then decodes one token per step together with
every other active slot. Active slots are kept packed at indices 0..B-1 (a finishing row is replaced by
the last one, `move`), so the batch's keys are always a view, never a gather.

The model sees these objects through the same duck-typed interface as `KVCache` (`length`, `update`,
`advance`); row b of a decode step writes its key at its own position `lengths[b]` and a boolean mask
hides every other row's longer tail.
"""

from __future__ import annotations

import torch
from torch import nn

from diyllm.model.kv_cache import KVBuffers


class SlotKVCache:
    def __init__(self, model: nn.Module, num_slots: int, buffers: KVBuffers | None = None):
        # the same storage as the decode caches; `buffers` given: those of a compiled step's StaticKVCache
        # (`diyllm serve --compile`), which prefill and `move` then write in place
        buffers = buffers if buffers is not None else KVBuffers.for_model(model, num_slots)
        self.k, self.v = buffers.k, buffers.v
        self.num_slots, self.max_len = num_slots, buffers.max_len
        self.lengths = [0] * num_slots  # tokens stored per slot

    def prefill(self, slot: int) -> _PrefillView:
        """The cache as the model sees it while it prefills one prompt into `slot` (emptied first)."""
        self.lengths[slot] = 0
        return _PrefillView(self, slot)

    def decode(self, num_rows: int) -> tuple[_DecodeView, torch.Tensor, torch.Tensor | None]:
        """(cache view, positions (B, 1), attention mask (B, 1, 1, keys) or None) for one decode step of
        slots 0..num_rows-1. Each row's new token sits at its own length; the mask is None when all rows
        have the same length (then every key is real for every row)."""
        lengths = torch.tensor(self.lengths[:num_rows], device=self.k.device)
        positions = lengths[:, None]
        longest = max(self.lengths[:num_rows])
        mask = None
        if min(self.lengths[:num_rows]) != longest:
            keys = torch.arange(longest + 1, device=self.k.device)
            mask = (keys[None, :] <= lengths[:, None])[:, None, None, :]
        return _DecodeView(self, num_rows, lengths, longest), positions, mask

    def move(self, src: int, dst: int) -> None:
        """Copy slot `src` (its stored tokens) into slot `dst`: packs the batch or clones a prefilled prompt."""
        n = self.lengths[src]
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst] = n


class _PrefillView:
    def __init__(self, cache: SlotKVCache, slot: int):
        self.cache, self.slot, self.length = cache, slot, 0

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T, s = k.shape[2], self.slot
        k_all, v_all = self.cache.k[layer_idx, s : s + 1, :, :T], self.cache.v[layer_idx, s : s + 1, :, :T]
        k_all.copy_(k)
        v_all.copy_(v)
        return k_all, v_all

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens
        self.cache.lengths[self.slot] = self.length


class _DecodeView:
    def __init__(self, cache: SlotKVCache, num_rows: int, lengths: torch.Tensor, longest: int):
        self.cache, self.num_rows, self.positions, self.length = cache, num_rows, lengths, longest
        self.rows = torch.arange(num_rows, device=cache.k.device)

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k_all, v_all = self.cache.k[layer_idx], self.cache.v[layer_idx]
        k_all[self.rows, :, self.positions] = k[:, :, 0]
        v_all[self.rows, :, self.positions] = v[:, :, 0]
        end = self.length + 1
        return k_all[: self.num_rows, :, :end], v_all[: self.num_rows, :, :end]

    def advance(self, num_tokens: int) -> None:
        for b in range(self.num_rows):
            self.cache.lengths[b] += num_tokens
