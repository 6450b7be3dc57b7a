"""JSONL files: finding them (file, folder, glob), reading them line by line with errors that name the
file and line, and the stable train/val split by a hash of (file name, line number).

Shared by the in-memory JSONL source (jsonl.py) and the streaming one (streaming.py).
"""

from __future__ import annotations

import glob
import json
import os
import zlib
from collections.abc import Iterator
from typing import Any

from diyllm.errors import UserError

VAL_PERCENT = 5
IGNORE_INDEX = -100


def resolve_jsonl_paths(spec: str | os.PathLike | list, endings: tuple[str, ...] = (".jsonl",)) -> list[str]:
    """A file, a folder (its files ending in `endings`, recursively) or a glob -> sorted list of files."""
    if isinstance(spec, (list, tuple)):
        return sorted({p for s in spec for p in resolve_jsonl_paths(s, endings)})
    spec = os.fspath(spec)
    if os.path.isdir(spec):
        paths = sorted(p for p in glob.glob(os.path.join(spec, "**", "*"), recursive=True)
                       if p.lower().endswith(endings) and os.path.isfile(p))
    elif any(c in spec for c in "*?["):
        paths = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
    elif os.path.isfile(spec):
        paths = [spec]
    else:
        raise UserError(f"JSONL data {spec!r} does not exist (give a .jsonl file, a folder of them or a glob)")
    if not paths:
        raise UserError(f"no {' / '.join(endings)} files found for {spec!r}")
    return paths


def iter_jsonl(path: str, key: str | None = None) -> Iterator[tuple[int, Any]]:
    """(line number, value) for every non-blank line of a JSONL file; the value is obj[key] if key is given.

    A malformed line is an error naming file and line, because silently skipping data hides real bugs.
    """
    for lineno, line in iter_text_lines(path):
        if line.strip():
            yield lineno, parse_line(line, path, lineno, key)


def iter_text_lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file; bytes that are not UTF-8 are an error naming line and byte offset
    (decoding the whole file in text mode would fail with a traceback that names neither)."""
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UserError(f"{path}:{lineno}: bytes that are not UTF-8 at byte offset {offset + exc.start} "
                                f"({raw[exc.start:exc.start + 4]!r}); re-encode the file as UTF-8 "
                                "(e.g. `iconv -f latin1 -t utf-8`)") from None
            offset += len(raw)


def parse_line(line: str, path: str, lineno: int, key: str | None = None) -> Any:
    """One JSONL line -> the object (or obj[key]), with an error naming file and line."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{lineno}: invalid JSON ({exc.msg}); one JSON object per line") from None
    if key is None:
        return obj
    if not isinstance(obj, dict) or key not in obj:
        raise UserError(f'{path}:{lineno}: expected an object with a "{key}" field, got {line.strip()[:80]!r}')
    if key == "text" and not isinstance(obj[key], str):
        raise UserError(f'{path}:{lineno}: "text" must be a string, got {type(obj[key]).__name__} '
                        f"{json.dumps(obj[key])[:40]}")
    return obj[key]


SAME_SPLIT_ENDINGS = (".jsonl.gz", ".jsonl.zst", ".json.gz", ".json.zst", ".parquet")


def split_name(path: str | os.PathLike) -> str:
    """The file name the split hash uses: NAME.jsonl also for NAME.jsonl.gz/.zst and NAME.parquet, so that
    compressing a JSONL file or converting it to Parquet (one row per line) keeps every record's split."""
    name = os.path.basename(os.fspath(path))
    for ending in SAME_SPLIT_ENDINGS:
        if name.lower().endswith(ending):
            return name[: -len(ending)] + ".jsonl"
    return name


def is_val_document(path: str, lineno: int, val_percent: int = VAL_PERCENT) -> bool:
    """The held-out split: a stable hash of (file name, line or row) decides, whatever the reading order."""
    return zlib.crc32(f"{split_name(path)}:{lineno}".encode()) % 100 < val_percent


def read_split_texts(spec, split: str, val_spec: str = "", key: str = "text") -> list[str]:
    """All texts of one split: from `val_spec` for val if given, else the hash hold-out of `spec`."""
    if split == "val" and val_spec:
        return [t for p in resolve_jsonl_paths(val_spec) for _, t in iter_jsonl(p, key)]
    want_val = split == "val"
    out = []
    for p in resolve_jsonl_paths(spec):
        for lineno, text in iter_jsonl(p, key):
            if val_spec or is_val_document(p, lineno) == want_val:
                out.append(text)
    return out
