"""Parquet is read in bounded record batches whatever its row-group layout (diyllm.data.readers)."""

from __future__ import annotations

import random

import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from diyllm.data import readers  # noqa: E402
from diyllm.data.readers import iter_parquet_records, parquet_batch_rows  # noqa: E402
from diyllm.data.sources import ReadStats  # noqa: E402

_REAL_PARQUET_FILE = pq.ParquetFile


def _docs(n: int, chars: int) -> list[str]:
    rng = random.Random(0)  # random hex: the column chunk barely compresses, so its size is real
    return [f"doc {i} " + rng.randbytes(chars // 2).hex() for i in range(n)]


class _Spy:
    """pq.ParquetFile that records how it was opened, each batch's rows and Arrow's allocation meanwhile."""

    opened: list[dict] = []
    batches: list[int] = []
    allocated: list[int] = []

    def __init__(self, path, **kw):
        self.opened.append(kw)
        self._pf = _REAL_PARQUET_FILE(path, **kw)

    def __getattr__(self, name):
        return getattr(self._pf, name)

    def iter_batches(self, **kw):
        base = pa.total_allocated_bytes()
        for batch in self._pf.iter_batches(**kw):
            self.batches.append(batch.num_rows)
            self.allocated.append(pa.total_allocated_bytes() - base)
            yield batch


def test_one_row_group_file_is_read_in_bounded_batches_with_the_same_documents(tmp_path, monkeypatch):
    docs = _docs(40_000, 400)  # ~16 MB of text, in pages of ~1 MB (pyarrow's default page size)
    table = pa.table({"id": list(range(len(docs))), "text": docs})
    pq.write_table(table, tmp_path / "one.parquet", row_group_size=len(docs))
    pq.write_table(table, tmp_path / "many.parquet", row_group_size=1500)
    md = pq.ParquetFile(tmp_path / "one.parquet").metadata
    assert md.num_row_groups == 1
    chunk = md.row_group(0).column(1).total_compressed_size
    assert chunk > 14_000_000  # the whole text column is one ~16 MB column chunk

    monkeypatch.setattr(readers, "PARQUET_ROWS_PER_BATCH", 64)
    monkeypatch.setattr(pq, "ParquetFile", _Spy)
    _Spy.opened, _Spy.batches, _Spy.allocated = [], [], []
    one = list(iter_parquet_records(tmp_path / "one.parquet", "text", ReadStats()))
    batches, allocated = list(_Spy.batches), list(_Spy.allocated)
    many = list(iter_parquet_records(tmp_path / "many.parquet", "text", ReadStats()))

    assert [t for _, t in one] == docs == [t for _, t in many]
    assert [w for w, _ in one] == [f"{tmp_path / 'one.parquet'}:row {i}" for i in range(1, len(docs) + 1)]
    assert max(batches) <= 64 and len(batches) == -(-len(docs) // 64)  # bounded batches out of one row group
    assert all(kw.get("pre_buffer") is False for kw in _Spy.opened)  # page by page, not the chunk up front
    # what Arrow holds while the batches stream is a few pages (~3.6 MB measured), not the 16 MB column chunk
    # (pre-buffering, pyarrow's default, holds all of it: measured ~1.2x the chunk)
    assert max(allocated) < chunk / 4, (max(allocated), chunk)


def test_batch_rows_shrink_for_long_documents(tmp_path, monkeypatch):
    pq.write_table(pa.table({"text": _docs(40, 16_000)}), tmp_path / "long.parquet")
    md = pq.ParquetFile(tmp_path / "long.parquet").metadata
    monkeypatch.setattr(readers, "PARQUET_BATCH_BYTES", 64_000)
    assert parquet_batch_rows(md, "text") == 3  # 64 KB / ~16 KB per row (rounded down), not 256 rows
    monkeypatch.setattr(readers, "PARQUET_BATCH_BYTES", 1 << 30)
    assert parquet_batch_rows(md, "text") == readers.PARQUET_ROWS_PER_BATCH
    monkeypatch.setattr(readers, "PARQUET_BATCH_BYTES", 1)
    assert parquet_batch_rows(md, "text") == 1
