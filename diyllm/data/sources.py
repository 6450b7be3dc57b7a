"""Finding corpus files (files, folders, globs) and reading text files: UTF-8 decoding and the tail split.

Everything here streams (files are read in blocks) so that preparing a corpus never
needs it in memory. Bad input is reported with the file and position so the user can fix it.
"""

from __future__ import annotations

import codecs
import glob
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from diyllm.errors import UserError

# Extensions picked up when a folder is given (a glob selects anything it matches).
TEXT_SUFFIXES = frozenset({".txt", ".text", ".md", ".rst", ".py", ".jsonl", ".parquet"})
DATA_FILE_ENDINGS = (".jsonl.gz", ".jsonl.zst")  # compressed JSONL, picked up in folders too
READ_BLOCK = 1 << 20  # bytes read per block from a text file

_bad_counter = [0]


def _count_and_replace(exc: UnicodeError) -> tuple[str, int]:
    """Codec error handler: like errors="replace" but counts each invalid sequence it replaces."""
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    _bad_counter[0] += 1
    return "\ufffd", exc.end


codecs.register_error("diyllm_count_replace", _count_and_replace)


@dataclass
class ReadStats:
    """What was tolerated while reading (reported and written to meta.json)."""

    bad_utf8: int = 0  # invalid UTF-8 sequences replaced by U+FFFD
    skipped_lines: int = 0  # malformed JSONL lines skipped
    bytes_read: int = 0
    documents: int = 0
    skipped_examples: list[str] = field(default_factory=list)


def resolve_inputs(inputs: list[str] | str) -> list[Path]:
    """Expand files, folders (recursively, TEXT_SUFFIXES, no hidden files) and globs into a sorted list."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [os.fspath(inputs)]
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if any(ch in str(item) for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(str(item), recursive=True) if Path(m).is_file())
            if not matches:
                raise UserError(f"no files match {item}")
            files.extend(matches)
        elif p.is_dir():
            found = sorted(
                f
                for f in p.rglob("*")
                if f.is_file()
                and (f.suffix in TEXT_SUFFIXES or f.name.lower().endswith(DATA_FILE_ENDINGS))
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
            if not found:
                raise UserError(f"folder {p} has no text files ({', '.join(sorted(TEXT_SUFFIXES))})")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"input not found: {item}")
    seen: set[Path] = set()
    unique = []
    for f in files:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            unique.append(f)
    return unique


class Utf8Decoder:
    """Incremental UTF-8 decoding that either replaces-and-counts or fails naming file and byte offset."""

    def __init__(self, path: Path, on_bad_utf8: str, stats: ReadStats, start_offset: int = 0,
                 hint: str = "fix the file or use --on_bad_utf8=replace") -> None:
        if on_bad_utf8 not in ("replace", "error"):
            raise UserError(f"on_bad_utf8 must be 'replace' or 'error', not {on_bad_utf8!r}")
        self.path, self.mode, self.stats, self.hint = path, on_bad_utf8, stats, hint
        errors = "diyllm_count_replace" if on_bad_utf8 == "replace" else "strict"
        self._dec = codecs.getincrementaldecoder("utf-8")(errors=errors)
        self._offset = start_offset  # file offset of the next byte fed

    def decode(self, data: bytes, final: bool = False, line: int | None = None) -> str:
        before = _bad_counter[0]
        pending = len(self._dec.getstate()[0])
        try:
            text = self._dec.decode(data, final)
        except UnicodeDecodeError as exc:
            where = f"{self.path}:{line}" if line is not None else str(self.path)
            raise UserError(
                f"{where}: invalid UTF-8 at byte offset {self._offset - pending + exc.start} "
                f"({exc.reason}); {self.hint}"
            ) from None
        self._offset += len(data)
        self.stats.bad_utf8 += _bad_counter[0] - before
        return text


def iter_text_file(
    path: Path, on_bad_utf8: str, stats: ReadStats, start: int = 0, end: int | None = None
) -> Iterator[str]:
    """Decoded text of bytes [start, end) of a file, in blocks of about READ_BLOCK bytes."""
    dec = Utf8Decoder(path, on_bad_utf8, stats, start)
    with open(path, "rb") as f:
        f.seek(start)
        remaining = None if end is None else end - start
        while True:
            n = READ_BLOCK if remaining is None else min(READ_BLOCK, remaining)
            data = f.read(n) if n > 0 else b""
            if remaining is not None:
                remaining -= len(data)
            stats.bytes_read += len(data)
            if not data:
                tail = dec.decode(b"", final=True)
                if tail:
                    yield tail
                return
            text = dec.decode(data)
            if text:
                yield text


def tail_split_offset(path: Path, val_fraction: float, limit: int | None = None) -> int:
    """Byte offset where the validation tail of a single file starts: the first line start at or after
    (1 - val_fraction) of the file, or the exact offset (moved to a UTF-8 boundary) if no newline follows."""
    size = os.path.getsize(path) if limit is None else min(limit, os.path.getsize(path))
    target = int(size * (1.0 - val_fraction))
    if target >= size:
        return size
    with open(path, "rb") as f:
        f.seek(target)
        window = f.read(min(size - target, 1 << 16))
    j = window.find(b"\n")
    if j >= 0 and target + j + 1 < size:
        return target + j + 1
    k = 0
    while k < len(window) and (window[k] & 0xC0) == 0x80:  # do not start inside a UTF-8 sequence
        k += 1
    return target + k
