"""The corpus as one ordered stream of documents, with hygiene (dedup, min_chars) and the split decided by hash.

Order is the sorted file list, then records in file order: the same inputs always give the same stream,
whatever the number of encoding workers, which is what makes prepared shards byte-identical.

Each document is hashed once (BLAKE2b, 16 bytes). The first 8 bytes identify it for exact-duplicate
removal; the other 8, mixed with the seed, give a number in [0, 1) that decides whether it is a
validation candidate. A document's split therefore depends only on its own text and the seed: adding
documents to a corpus never moves an old document between train and val.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diyllm.data.readers import (
    WHOLE_TEXT_FILE_LIMIT,
    file_kind,
    iter_jsonl_records,
    iter_parquet_records,
    iter_text_document,
)
from diyllm.data.sources import ReadStats, iter_text_file

TWO64 = float(1 << 64)


@dataclass
class Doc:
    """One document: `want` is "train", "val", or "val?" (validation if the --val_tokens budget allows)."""

    want: str
    where: str
    pieces: Iterator[str]
    sampled: bool = False  # picked for the tokenizer-training sample


@dataclass
class HygieneStats:
    """Documents seen and dropped, written to the manifest."""

    documents_seen: int = 0
    duplicates_dropped: int = 0
    too_short_dropped: int = 0
    read: ReadStats = field(default_factory=ReadStats)


class SeenHashes:
    """A set of 64-bit document hashes at ~8 bytes each: a small Python set merged into a sorted array."""

    MERGE_AT = 1 << 20

    def __init__(self) -> None:
        self.sorted = np.zeros(0, dtype=np.uint64)
        self.recent: set[int] = set()

    def add_if_new(self, h: int) -> bool:
        if h in self.recent:
            return False
        i = int(np.searchsorted(self.sorted, np.uint64(h)))
        if i < len(self.sorted) and int(self.sorted[i]) == h:
            return False
        self.recent.add(h)
        if len(self.recent) >= self.MERGE_AT:
            self.sorted = np.union1d(self.sorted, np.fromiter(self.recent, dtype=np.uint64, count=len(self.recent)))
            self.recent.clear()
        return True


def _mix(seed: int, salt: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(str(int(seed)).encode() + salt, digest_size=8).digest(), "little")


class DocumentStream:
    """Iterate the documents of `files` (see the module docstring); one instance per pass over the corpus."""

    def __init__(
        self,
        files: list[Path],
        *,
        text_field: str = "text",
        on_bad_utf8: str = "replace",
        skip_bad_lines: bool = False,
        min_chars: int = 0,
        dedup: bool = True,
        val_fraction: float = 0.1,
        seed: int = 1337,
        max_bytes: int | None = None,
        tail_split: tuple[int, int] | None = None,
        sample_fraction: float = 1.0,
        progress: Callable[[int], None] = lambda n: None,
    ) -> None:
        self.files = files
        self.text_field, self.on_bad_utf8, self.skip_bad_lines = text_field, on_bad_utf8, skip_bad_lines
        self.min_chars, self.dedup = int(min_chars), bool(dedup)
        self.val_threshold = val_fraction * TWO64
        self.sample_threshold = sample_fraction * TWO64
        self.split_mix, self.sample_mix = _mix(seed, b"split"), _mix(seed, b"sample")
        self.max_bytes, self.tail_split = max_bytes, tail_split
        self.progress = progress
        self.stats = HygieneStats()
        self.seen = SeenHashes()

    def __iter__(self) -> Iterator[Doc]:
        read = self.stats.read
        if self.tail_split is not None:  # one plain text file: train is its head, val its tail
            f, (cut, end) = self.files[0], self.tail_split
            self.stats.documents_seen = 1 + (end > cut)
            yield Doc("train", str(f), self._progressed(iter_text_file(f, self.on_bad_utf8, read, 0, cut)), True)
            if end > cut:
                yield Doc("val", f"{f}:{cut}", self._progressed(iter_text_file(f, self.on_bad_utf8, read, cut, end)))
            return
        for f in self.files:
            if self.max_bytes is not None and read.bytes_read >= self.max_bytes:
                return
            kind = file_kind(f)
            if kind == "text" and f.stat().st_size > WHOLE_TEXT_FILE_LIMIT:
                self.stats.documents_seen += 1  # too big to hold: streamed, never deduplicated
                yield Doc("train", str(f), iter_text_document(f, self.on_bad_utf8, read, self.progress), True)
                continue
            for where, text in self._records(f, kind):
                doc = self._judge(where, text)
                if doc is not None:
                    yield doc
                if self.max_bytes is not None and read.bytes_read >= self.max_bytes:
                    return

    def _progressed(self, pieces: Iterator[str]) -> Iterator[str]:
        for p in pieces:
            self.progress(len(p))
            yield p

    def _records(self, f: Path, kind: str) -> Iterator[tuple[str, str]]:
        read = self.stats.read
        if kind == "parquet":
            yield from iter_parquet_records(f, self.text_field, read, self.progress)
        elif kind == "jsonl":
            yield from iter_jsonl_records(
                f, self.text_field, self.on_bad_utf8, self.skip_bad_lines, read, self.progress)
        else:
            yield str(f), "".join(iter_text_document(f, self.on_bad_utf8, read, self.progress))

    def _judge(self, where: str, text: str) -> Doc | None:
        """Drop empty/short and duplicate documents; decide the split candidate and the tokenizer sample."""
        self.stats.documents_seen += 1
        if len(text.strip()) < max(self.min_chars, 1):
            self.stats.too_short_dropped += 1
            return None
        digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        key = int.from_bytes(digest[:8], "little")
        if self.dedup and not self.seen.add_if_new(key):
            self.stats.duplicates_dropped += 1
            return None
        is_val = (int.from_bytes(digest[8:], "little") ^ self.split_mix) < self.val_threshold
        sampled = not is_val and (key ^ self.sample_mix) < self.sample_threshold
        return Doc("val?" if is_val else "train", where, iter((text,)), sampled)
