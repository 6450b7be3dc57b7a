"""Append the token stream of one split to fixed-size shards, each finished atomically, resumable.

A shard is written as `.train_00003.bin.partial` and renamed to `train_00003.bin` (with its document
offsets `train_00003.idx` and a SHA-256 recorded) only when it holds exactly `shard_tokens` tokens, or at
the end. Cutting at an exact token count (not at a job or document boundary) keeps the shards identical
whatever the number of workers. A document may continue into the next shard; `.idx` lists the positions,
inside this shard, where documents start (raw little-endian uint64).

`checkpoint()` makes the partial shard durable and returns a small state; `ShardWriter.resume(state)`
truncates the partial file back to that state, so a run killed at any moment continues exactly.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from diyllm.atomic import atomic_write

HASH_BLOCK = 1 << 24


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:05d}.bin"


def file_sha256(path: Path, limit: int | None = None, progress: Callable[[int], Any] | None = None) -> str:
    """SHA-256 of a file (or of its first `limit` bytes), read in blocks; `progress(n)` after each block."""
    return _hash_file(path, limit, progress).hexdigest()


def _hash_file(path: Path, limit: int | None = None, progress: Callable[[int], Any] | None = None) -> Any:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = limit
        while remaining is None or remaining > 0:
            block = f.read(HASH_BLOCK if remaining is None else min(HASH_BLOCK, remaining))
            if not block:
                break
            h.update(block)
            if progress is not None:
                progress(len(block))
            if remaining is not None:
                remaining -= len(block)
    return h


class ShardWriter:
    """Writes one split ("train" or "val") of token ids into `folder` as shards of `shard_tokens` tokens."""

    def __init__(self, folder: Path, split: str, dtype: str, shard_tokens: int) -> None:
        self.folder, self.split, self.dtype = Path(folder), split, np.dtype(dtype).newbyteorder("<")
        self.shard_tokens = int(shard_tokens)
        self.finished: list[dict[str, Any]] = []
        self.index = 0
        self.n = 0  # tokens in the partial shard
        self.starts: list[int] = []  # document starts inside the partial shard
        self.file = None
        self.hasher = hashlib.sha256()

    # --- paths -------------------------------------------------------------------------------
    @property
    def partial_path(self) -> Path:
        return self.folder / f".{shard_name(self.split, self.index)}.partial"

    @property
    def total_tokens(self) -> int:
        return sum(s["tokens"] for s in self.finished) + self.n

    @property
    def total_documents(self) -> int:
        return sum(s["documents"] for s in self.finished) + len(self.starts)

    def _open(self) -> None:
        if self.file is None:
            self.file = open(self.partial_path, "ab")  # noqa: SIM115 (closed in _finish/close)

    # --- writing -----------------------------------------------------------------------------
    def append(self, tokens: np.ndarray, doc_start: bool) -> None:
        """Append tokens; `doc_start` marks the first tokens of a new document."""
        self._open()
        if doc_start:
            self.starts.append(self.n)
        tokens = np.asarray(tokens, dtype=self.dtype)
        while len(tokens):
            room = self.shard_tokens - self.n
            head, tokens = tokens[:room], tokens[room:]
            data = head.tobytes()
            self.file.write(data)
            self.hasher.update(data)
            self.n += len(head)
            if self.n == self.shard_tokens:
                self._finish()
                if len(tokens):
                    self._open()

    def _finish(self) -> None:
        """Seal the partial shard under its final name (data first, then the offsets, then the rename)."""
        assert self.file is not None
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.file = None
        name = shard_name(self.split, self.index)
        idx_name = name[:-4] + ".idx"
        with atomic_write(self.folder / idx_name) as f:
            f.write(np.asarray(self.starts, dtype="<u8").tobytes())
        os.replace(self.partial_path, self.folder / name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._partial_idx_path())
        self.finished.append({"file": name, "tokens": self.n, "documents": len(self.starts),
                              "sha256": self.hasher.hexdigest(), "offsets": idx_name})
        self.index += 1
        self.n, self.starts, self.hasher = 0, [], hashlib.sha256()

    def close(self) -> None:
        """Seal the last, shorter shard (if it holds anything) at the end of the corpus."""
        if self.n:
            self._open()
            self._finish()
        elif self.file is not None:
            self.file.close()
            self.file = None
            self.partial_path.unlink(missing_ok=True)

    def drop_file_handle(self) -> None:
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()
            self.file = None

    # --- the last document, for a validation split that would otherwise be empty -------------
    def pop_last_document(self) -> np.ndarray | None:
        """Remove and return the last document of the partial shard, if the shard keeps another one."""
        if len(self.starts) < 2:
            return None
        self._open()
        self.file.flush()
        start = self.starts.pop()
        tokens = np.fromfile(self.partial_path, dtype=self.dtype)[start:]
        self.file.truncate(start * self.dtype.itemsize)
        self.file.seek(0, os.SEEK_END)
        self.n = start
        self.hasher = _hash_file(self.partial_path, start * self.dtype.itemsize)
        return tokens

    # --- checkpoints ---------------------------------------------------------------------------
    def _partial_idx_path(self) -> Path:
        return self.folder / f".{shard_name(self.split, self.index)[:-4]}.idx.partial"

    def checkpoint(self) -> dict[str, Any]:
        """Make the partial shard durable and describe it (plain JSON) for resume()."""
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())
        with atomic_write(self._partial_idx_path()) as f:
            f.write(np.asarray(self.starts, dtype="<u8").tobytes())
        return {"finished": list(self.finished), "index": self.index, "tokens": self.n, "documents": len(self.starts)}

    @classmethod
    def resume(cls, folder: Path, split: str, dtype: str, shard_tokens: int, state: dict[str, Any]) -> ShardWriter:
        """The writer as it was at `checkpoint()`; raises ValueError if the files on disk do not match it."""
        w = cls(folder, split, dtype, shard_tokens)
        w.finished, w.index, w.n = list(state["finished"]), int(state["index"]), int(state["tokens"])
        keep = {w.partial_path.name, w._partial_idx_path().name}
        for stray in w.folder.glob(f".{split}_*.partial"):  # written after the checkpoint: redone
            if stray.name not in keep:
                stray.unlink()
        for s in w.finished:
            path = w.folder / s["file"]
            if not path.is_file() or path.stat().st_size != s["tokens"] * w.dtype.itemsize:
                raise ValueError(f"{path} is missing or has the wrong size")
            if file_sha256(path) != s["sha256"]:
                raise ValueError(f"{path} does not match its checksum")
        nbytes = w.n * w.dtype.itemsize
        final = w.folder / shard_name(split, w.index)
        final_idx = final.with_suffix(".idx")
        if w.n:
            # Killed after this shard was sealed but before the next checkpoint: its head is in the sealed file.
            if not (w.partial_path.is_file() and w.partial_path.stat().st_size >= nbytes):
                if not (final.is_file() and final.stat().st_size >= nbytes):
                    raise ValueError(f"{w.partial_path} is shorter than its checkpoint")
                with open(final, "rb") as src, open(w.partial_path, "wb") as dst:
                    dst.write(src.read(nbytes))
            docs = int(state["documents"])
            starts = np.zeros(0, dtype="<u8")
            for idx in (w._partial_idx_path(), final_idx):
                if idx.is_file() and idx.stat().st_size >= 8 * docs:
                    starts = np.fromfile(idx, dtype="<u8")
                    break
            if len(starts) < docs:
                raise ValueError(f"{w._partial_idx_path()} is shorter than its checkpoint")
            w.starts = [int(s) for s in starts[:docs]]
            with open(w.partial_path, "r+b") as f:
                f.truncate(nbytes)
            w.hasher = _hash_file(w.partial_path, nbytes)
        else:
            w.partial_path.unlink(missing_ok=True)
        done = {s["file"] for s in w.finished} | {s["offsets"] for s in w.finished}
        for sealed in list(w.folder.glob(f"{split}_*.bin")) + list(w.folder.glob(f"{split}_*.idx")):
            if sealed.name not in done:  # sealed after the checkpoint: it will be written again, identically
                sealed.unlink()
        return w
