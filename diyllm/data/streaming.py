"""A streaming dataset for JSONL corpora that do not fit in memory.

`StreamingJsonlDataset` is a torch IterableDataset that reads a file, folder or glob of JSONL files line by
line and yields (x, y, loss_mask) rows of context_length tokens:

* per epoch the file order is shuffled (seeded by seed and epoch), then documents pass through a bounded
  shuffle buffer (memory: `shuffle_buffer` documents), so neighbouring lines rarely share a batch;
* sharding: every DataLoader worker of every DDP rank reads the same file sequence and keeps document i
  (counting the documents of its split in that sequence) iff i % (world_size * num_workers) is its shard
  index. Every document is therefore seen exactly once per epoch across all ranks and workers, none
  twice, none skipped, whatever the number of files;
* the tokenizer is created inside each worker (from a path) so no tokenizer state is shared between
  processes;
* pack mode concatenates the shard's documents with end-of-text and cuts windows whose last token starts
  the next window (each token is a target once; the shard's last window is padded with mask 0); pad mode
  gives one row per document.

Resuming: `endless_batches(..., skip=n)` replays the deterministic stream and drops the first n batches.
That costs re-reading, never changes which batches follow (seeded order), and is what
JsonlPretrainSource uses when a run resumes.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from diyllm.data.jsonl_files import IGNORE_INDEX, is_val_document, parse_line, resolve_jsonl_paths


def shuffle_buffer(items: Iterator[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """Yield every item once, in an order randomised within a sliding buffer of `size` items."""
    if size <= 1:
        yield from items
        return
    buf: list[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = int(rng.integers(len(buf)))
        buf[i], item = item, buf[i]
        yield item
    rng.shuffle(buf)
    yield from buf


class StreamingJsonlDataset(IterableDataset):
    def __init__(
        self,
        spec: str | os.PathLike | list,
        tokenizer: Any,
        context_length: int,
        mode: str = "pack",
        split: str | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 10000,
        key: str = "text",
    ):
        """`tokenizer`: a tokenizer JSON path (loaded per worker) or a tokenizer object.
        `split`: None = every document; "train"/"val" = the hash hold-out of diyllm.data.jsonl."""
        super().__init__()
        if mode not in ("pack", "pad"):
            raise ValueError(f"mode must be 'pack' or 'pad', got {mode!r}")
        self.paths = resolve_jsonl_paths(spec)
        self.tokenizer_spec = tokenizer
        self.context_length = int(context_length)
        self.mode, self.split, self.key = mode, split, key
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.shuffle_buffer = int(shuffle_buffer)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def shard(self) -> tuple[int, int]:
        """(this shard's index, number of shards) for the current worker process and rank."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.rank * workers + worker, self.world_size * workers

    def file_order(self) -> list[str]:
        rng = np.random.default_rng([self.seed, self.epoch, 0])
        return [self.paths[i] for i in rng.permutation(len(self.paths))]

    def iter_documents(self) -> Iterator[str]:
        """This shard's documents for the current epoch, after the shuffle buffer."""
        shard, num_shards = self.shard()

        def mine() -> Iterator[str]:
            # Shard on raw lines: a worker JSON-parses only the documents it keeps.
            counter = itertools.count()
            for path in self.file_order():
                with open(path, encoding="utf-8") as f:
                    for lineno, line in enumerate(f, start=1):
                        if not line.strip():
                            continue
                        if self.split is not None and is_val_document(path, lineno) != (self.split == "val"):
                            continue
                        if next(counter) % num_shards == shard:
                            yield parse_line(line, path, lineno, self.key)

        rng = np.random.default_rng([self.seed, self.epoch, 1 + shard])
        return shuffle_buffer(mine(), self.shuffle_buffer, rng)

    def _tokenizer(self) -> Any:
        if isinstance(self.tokenizer_spec, (str, os.PathLike)):
            from diyllm.tokenizers import load_tokenizer

            return load_tokenizer(self.tokenizer_spec)
        return self.tokenizer_spec

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        tok = self._tokenizer()  # created here, i.e. once per worker process
        eot = getattr(tok, "eot_id", None)
        T = self.context_length
        tail = [eot] if eot is not None else []
        if self.mode == "pad":
            for text in self.iter_documents():
                seq = (tok.encode(text) + tail)[: T + 1]
                if len(seq) >= 2:
                    yield _row(seq, T)
            return
        buf: list[int] = []
        for text in self.iter_documents():
            buf.extend(tok.encode(text))
            buf.extend(tail)
            while len(buf) >= T + 1:
                yield _row(buf[: T + 1], T)
                del buf[:T]  # the window's last token is the next window's first input
        if len(buf) >= 2:
            yield _row(buf, T)


def _row(seq: list[int], T: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, y, mask) of length T from a sequence of 2..T+1 tokens, right-padded."""
    n = len(seq) - 1
    x = torch.zeros(T, dtype=torch.long)
    y = torch.full((T,), IGNORE_INDEX, dtype=torch.long)
    x[:n] = torch.tensor(seq[:-1])
    y[:n] = torch.tensor(seq[1:])
    return x, y, (y != IGNORE_INDEX).float()


def endless_batches(ds: StreamingJsonlDataset, batch_size: int, num_workers: int = 0, skip: int = 0) -> Iterator:
    """Batches forever, epoch after epoch (set_epoch reshuffles), dropping the first `skip` batches."""
    produced = 0
    for epoch in itertools.count():
        ds.set_epoch(epoch)
        loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers)
        empty = True
        for batch in loader:
            empty = False
            produced += 1
            if produced > skip:
                yield batch
        if empty:
            raise ValueError("the streaming dataset produced no rows (empty split or documents too short)")
