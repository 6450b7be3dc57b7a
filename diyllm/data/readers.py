"""Documents out of corpus files, streamed: Parquet by record batches, JSONL plain/.gz/.zst, text files.

Every reader yields `(where, text)` pairs, `where` naming the file and line/row so that an error (or a
character the tokenizer cannot encode) points at the exact record. Nothing here holds more than one
record batch (Parquet) or one line (JSONL) in memory. Compressed and columnar formats need optional
packages (pyarrow, zstandard: `pip install 'diyllm[data]'`); they are imported only when such a file is read.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from diyllm.data.sources import READ_BLOCK, ReadStats, Utf8Decoder, iter_text_file
from diyllm.errors import UserError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".json.zst")
PARQUET_ROWS_PER_BATCH = 256  # at most this many rows decoded at a time
PARQUET_BATCH_BYTES = 8 << 20  # and about this many bytes of column data (fewer rows when rows are long)
WHOLE_TEXT_FILE_LIMIT = 64 << 20  # text files up to this size are one in-memory document (deduplicable)


def file_kind(path: Path) -> str:
    """'parquet', 'jsonl' (plain or compressed) or 'text', from the file name."""
    name = path.name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return "text"


def _optional(module: str, why: str):  # noqa: ANN202
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{why} needs the {module} package: pip install 'diyllm[data]' (or pip install {module})"
                        ) from None


def open_binary(path: Path) -> IO[bytes]:
    """A binary stream of the decompressed bytes of `path` (.gz and .zst are decompressed on the fly)."""
    name = path.name.lower()
    if name.endswith(".gz"):
        import gzip

        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        return io.BufferedReader(_ZstdStream(path), READ_BLOCK)
    return open(path, "rb")  # noqa: SIM115


class _ZstdStream(io.RawIOBase):
    """Streamed zstd decompression that, unlike a plain reader, notices a truncated last frame."""

    def __init__(self, path: Path) -> None:
        self.zstd = _optional("zstandard", f"reading {path}")
        self.raw = open(path, "rb")  # noqa: SIM115 (closed in close())
        self.dec = self.zstd.ZstdDecompressor().decompressobj()
        self.buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self.buf:
            chunk = self.raw.read(READ_BLOCK)
            if not chunk:
                if not self.dec.eof:
                    raise self.zstd.ZstdError("the file ends inside a zstd frame (truncated)")
                return 0
            if self.dec.eof:  # another frame follows
                self.dec = self.zstd.ZstdDecompressor().decompressobj()
            self.buf = self.dec.decompress(chunk)
        n = min(len(b), len(self.buf))
        b[:n] = self.buf[:n]
        self.buf = self.buf[n:]
        return n

    def close(self) -> None:
        self.raw.close()
        super().close()


def _decompress_errors() -> tuple[type[BaseException], ...]:
    import gzip
    import zlib

    errors: list[type[BaseException]] = [gzip.BadGzipFile, zlib.error, EOFError]
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


def field_text(value: object, text_field: str) -> str:
    """`value` if it is text, else ValueError naming the field and what it holds."""
    if not isinstance(value, str):
        raise ValueError(f'"{text_field}" must be a string, got {type(value).__name__}')
    return value


def iter_jsonl_values(
    path: Path, field: str, stats: ReadStats, *, check: Callable[[Any, str], Any] | None = field_text,
    on_bad_utf8: str = "error", skip_bad_lines: bool = False, progress: Callable[[int], None] = lambda n: None,
    fix_hint: str = "fix it or pass --skip_bad_lines", utf8_hint: str = "fix the file or use --on_bad_utf8=replace",
) -> Iterator[tuple[int, Any]]:
    """(line number, record[field]) per non-blank line of a JSONL file (plain, .gz or .zst).

    `check(value, field)` validates the value (ValueError: a bad line). A bad line is an error naming
    file:line and ending with `fix_hint`, or (skip_bad_lines) is skipped and counted in `stats`; invalid
    UTF-8 is replaced and counted (on_bad_utf8="replace") or an error ending with `utf8_hint`.
    """
    Utf8Decoder(path, on_bad_utf8, stats)  # checks on_bad_utf8 once (valid lines never need a decoder)
    bad_stream = _decompress_errors()
    with open_binary(path) as f:
        offset = 0
        lineno = 0
        try:
            for raw in f:
                lineno += 1
                stats.bytes_read += len(raw)
                progress(len(raw))
                try:  # fast path: almost every line is valid UTF-8 (then both modes decode it the same)
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:  # replace-and-count, or the error naming line and byte offset
                    line = Utf8Decoder(path, on_bad_utf8, stats, offset, utf8_hint).decode(raw, final=True, line=lineno)
                offset += len(raw)
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    if not isinstance(record, dict) or field not in record:
                        raise ValueError(f'expected an object with a "{field}" field')
                    value = record[field] if check is None else check(record[field], field)
                except ValueError as exc:  # json.JSONDecodeError is a ValueError
                    msg = f"{path}:{lineno}: malformed JSONL line ({exc})"
                    if not skip_bad_lines:
                        raise UserError(f"{msg}; {fix_hint}") from None
                    stats.skipped_lines += 1
                    if len(stats.skipped_examples) < 5:
                        stats.skipped_examples.append(msg)
                    continue
                yield lineno, value
        except bad_stream as exc:
            raise UserError(f"{path}: the compressed stream is corrupt after line {lineno} ({exc}); "
                            "re-download or re-compress the file") from None


def iter_jsonl_records(
    path: Path, text_field: str, on_bad_utf8: str, skip_bad_lines: bool, stats: ReadStats,
    progress: Callable[[int], None] = lambda n: None,
) -> Iterator[tuple[str, str]]:
    """(f"{path}:{line}", text) per record; a bad line is an error naming file:line or is skipped and counted."""
    for lineno, text in iter_jsonl_values(path, text_field, stats, on_bad_utf8=on_bad_utf8,
                                          skip_bad_lines=skip_bad_lines, progress=progress):
        yield f"{path}:{lineno}", text


def _column_bytes(md: Any, field: str) -> int:
    """Uncompressed bytes of column `field` (a nested column: all its leaves) over all row groups."""
    total = 0
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        for c in range(rg.num_columns):
            name = rg.column(c).path_in_schema
            if name == field or name.startswith(field + "."):
                total += rg.column(c).total_uncompressed_size
    return total


def parquet_batch_rows(md: Any, field: str) -> int:
    """Rows per record batch: PARQUET_ROWS_PER_BATCH, fewer when rows are long, so that one decoded
    batch stays near PARQUET_BATCH_BYTES whatever the documents' length."""
    per_row = _column_bytes(md, field) / max(md.num_rows, 1)
    return max(1, min(PARQUET_ROWS_PER_BATCH, int(PARQUET_BATCH_BYTES // max(per_row, 1.0))))


def iter_parquet_values(
    path: Path, field: str, stats: ReadStats, *, text: bool = True, option: str = "--text_field",
    progress: Callable[[int], None] = lambda n: None,
) -> Iterator[tuple[int, Any]]:
    """(row number, value) per row of column `field`, read in bounded record batches; nulls are skipped.

    Memory does not depend on the file's row-group layout: `pre_buffer=False` with a 1 MiB read buffer
    makes pyarrow read a column chunk page by page (pre-buffering, pyarrow's default, loads a whole row
    group's column chunk first: a file written as one row group would be read whole), and each batch
    holds at most `parquet_batch_rows` rows; what remains is the largest page, which pyarrow decodes whole
    (writers aim at ~1 MB). `text`: the column must hold strings (else any type: the
    caller checks the values, e.g. a list of messages). `option` names the setting that picks the column.
    """
    pq = _optional("pyarrow.parquet", f"reading {path}")
    import pyarrow as pa

    try:
        pf = pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{path}: not a readable Parquet file ({exc})") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise UserError(f"{path} has no column {field!r}; its columns are {names}: pick one with {option}")
    col_type = pf.schema_arrow.field(field).type
    if text and not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type)):
        raise UserError(f"{path}: column {field!r} holds {col_type}, not text; pick a text column with {option}")
    size = path.stat().st_size
    rows = max(pf.metadata.num_rows, 1)
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=parquet_batch_rows(pf.metadata, field), columns=[field],
                                     use_threads=False):
            for value in batch.column(0).to_pylist():
                row += 1
                if value is not None:
                    if text:
                        stats.bytes_read += len(value)
                    yield row, value
            progress(size * batch.num_rows // rows)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{path}: corrupt Parquet data after row {row} ({exc}); re-download the file") from None


def iter_parquet_records(
    path: Path, text_field: str, stats: ReadStats, progress: Callable[[int], None] = lambda n: None
) -> Iterator[tuple[str, str]]:
    """(f"{path}:row {i}", text) per row of column `text_field` (see iter_parquet_values)."""
    for row, text in iter_parquet_values(path, text_field, stats, progress=progress):
        yield f"{path}:row {row}", text


def iter_text_document(
    path: Path, on_bad_utf8: str, stats: ReadStats, progress: Callable[[int], None] = lambda n: None
) -> Iterator[str]:
    """One text file as pieces of decoded text (a whole string when the file is small)."""
    before = stats.bytes_read
    for piece in iter_text_file(path, on_bad_utf8, stats):
        progress(stats.bytes_read - before)
        before = stats.bytes_read
        yield piece
    progress(stats.bytes_read - before)


def estimated_text_bytes(path: Path, text_field: str = "text") -> int:
    """About how many bytes of text `path` holds (Parquet: its column's uncompressed size; .gz/.zst: x4)."""
    kind, size = file_kind(path), path.stat().st_size
    name = path.name.lower()
    if kind == "parquet":
        try:
            import pyarrow.parquet as pq

            total = _column_bytes(pq.ParquetFile(path).metadata, text_field)
            return total or size
        except Exception:  # noqa: BLE001 - an estimate only; reading reports the real error
            return size
    if name.endswith((".gz", ".zst")):
        return 4 * size
    return size
