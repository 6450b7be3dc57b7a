"""Reading a sharded dataset for training: several memory-mapped token files as one array, and batches.

`ShardedTokens` presents the shards of one split as their concatenation without reading them (only the
windows indexed are read, so a 10B-token dataset opens instantly). `TokenBatcher` draws training windows
from it, either anywhere (`random`, identical to `get_batch` on one file) or starting at a document
start (`doc_aligned`, using the per-shard offsets written by prepare), with one seeded numpy Generator
per split whose state is the whole sampling position: `state_dict()` restores the exact batch sequence.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from diyllm.errors import UserError

if TYPE_CHECKING:  # torch is imported only to build batches: prepare's workers never load it
    import torch

SPLITS = ("train", "val")
SAMPLING_MODES = ("random", "doc_aligned")


class ShardedTokens:
    """The concatenation of token arrays (memmaps), indexable by int or slice like one 1-D array."""

    def __init__(self, arrays: list[Any], offsets_files: list[Path | None] | None = None, eot_id: int | None = None):
        self.arrays = arrays
        self.offsets_files = offsets_files or [None] * len(arrays)
        self.eot_id = eot_id
        self.bounds = np.cumsum([0] + [len(a) for a in arrays]).astype(np.int64)
        self.dtype = arrays[0].dtype if arrays else np.dtype(np.uint16)
        self._doc_starts: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.bounds[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def __getitem__(self, key: int | slice) -> Any:
        n = len(self)
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step != 1:
                return np.asarray(self)[key]
            return self._read(start, max(start, stop))
        i = int(key) + (n if int(key) < 0 else 0)
        if not 0 <= i < n:
            raise IndexError(f"index {key} out of range for {n} tokens")
        s = int(np.searchsorted(self.bounds, i, side="right")) - 1
        return self.arrays[s][i - self.bounds[s]]

    def _read(self, start: int, stop: int) -> np.ndarray:
        first = int(np.searchsorted(self.bounds, start, side="right")) - 1
        parts = []
        s = max(first, 0)
        while start < stop and s < len(self.arrays):
            lo, hi = self.bounds[s], self.bounds[s + 1]
            take = min(stop, hi) - start
            if take > 0:
                parts.append(np.asarray(self.arrays[s][start - lo : start - lo + take]))
                start += take
            s += 1
        if not parts:
            return np.zeros(0, dtype=self.dtype)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self._read(0, len(self))
        return out.astype(dtype) if dtype is not None else out

    def doc_starts(self) -> np.ndarray:
        """Global positions where documents start (from the .idx files, or found after each EOT token)."""
        if self._doc_starts is None:
            if all(idx is not None and Path(idx).is_file() for idx in self.offsets_files):
                parts = [np.fromfile(idx, dtype="<u8").astype(np.int64) + self.bounds[s]
                         for s, idx in enumerate(self.offsets_files)]
                self._doc_starts = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
            elif self.eot_id is not None:  # an older dataset: a document starts after each EOT
                after = np.flatnonzero(np.asarray(self) == self.eot_id).astype(np.int64) + 1
                self._doc_starts = np.concatenate([[0], after[after < len(self)]]).astype(np.int64)
            else:
                raise UserError("doc_aligned sampling needs document offsets (.idx files) or an eot_id; "
                                "re-run `diyllm prepare` or use batch_sampling=random")
        return self._doc_starts


def split_seed(seed: int, rank: int, split: str) -> np.random.SeedSequence:
    """Independent, reproducible streams per (seed, rank, split)."""
    return np.random.SeedSequence([int(seed), int(rank), SPLITS.index(split) if split in SPLITS else 99])


class TokenBatcher:
    """Seeded (x, y) windows of `context_length` from each split; exact resume through state_dict()."""

    def __init__(self, splits: dict[str, Any], context_length: int, seed: int = 1337, rank: int = 0,
                 sampling: str = "random") -> None:
        if sampling not in SAMPLING_MODES:
            raise UserError(f"batch_sampling must be one of {SAMPLING_MODES}, not {sampling!r}")
        self.splits, self.context_length, self.seed, self.sampling = splits, int(context_length), int(seed), sampling
        self._aligned: dict[str, np.ndarray] = {}
        if sampling == "doc_aligned":
            for name, data in splits.items():
                starts = data.doc_starts() if isinstance(data, ShardedTokens) else ShardedTokens([data]).doc_starts()
                starts = starts[starts <= len(data) - self.context_length - 1]
                if len(starts) == 0:
                    raise UserError(f"the {name} split has no document start leaving a full window of "
                                    f"{self.context_length + 1} tokens; lower context_length or use "
                                    "batch_sampling=random")
                self._aligned[name] = starts
        self.set_rank(rank)

    def set_rank(self, rank: int) -> None:
        self.rank = int(rank)
        self.generators = {s: np.random.Generator(np.random.PCG64(split_seed(self.seed, rank, s))) for s in self.splits}

    def sample_starts(self, split: str, batch_size: int) -> np.ndarray:
        rng = self.generators[split]
        if self.sampling == "doc_aligned":
            starts = self._aligned[split]
            return starts[rng.integers(0, len(starts), size=batch_size)]
        return rng.integers(0, len(self.splits[split]) - self.context_length, size=batch_size)

    def get_batch(self, split: str, batch_size: int, device: torch.device | str = "cpu"):

        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; use one of {tuple(self.splits)}")
        from diyllm.data.batch import windows_at

        return windows_at(self.splits[split], self.sample_starts(split, batch_size), self.context_length, device)

    def state_dict(self) -> dict:
        return {"rank": self.rank, "sampling": self.sampling,
                "generators": {s: g.bit_generator.state for s, g in self.generators.items()}}

    def load_state_dict(self, state: dict) -> None:
        for split, gen_state in state["generators"].items():
            self.generators[split].bit_generator.state = gen_state
