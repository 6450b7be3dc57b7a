"""Corpus readers (diyllm.data.readers): Parquet in bounded record batches whatever its row-group layout;
JSONL lines decoded on a fast path that leaves the output unchanged."""

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


def test_jsonl_fast_utf8_path_keeps_replacement_counts_errors_and_shards(tmp_path):
    import json

    from diyllm.data.prepare import prepare_dataset
    from diyllm.data.readers import iter_jsonl_records
    from diyllm.errors import UserError

    docs = [f"document {i}: " + "word " * (i % 7 + 3) + ("día ☃ " if i % 5 == 0 else "") for i in range(120)]
    lines = [json.dumps({"text": d}, ensure_ascii=False).encode() for d in docs]
    for i in (7, 40, 41):  # invalid bytes inside the JSON string: \xff, a truncated 3-byte sequence
        lines[i] = lines[i][:-2] + (b"\xff" if i != 41 else b"\xe2\x98") + lines[i][-2:]
    raw = b"\n".join(lines[:60]) + b"\n\n" + b"\n".join(lines[60:]) + b"\n"  # a blank line too
    (tmp_path / "bad.jsonl").write_bytes(raw)
    clean = [json.loads(line.decode("utf-8", "replace"))["text"] for line in lines]
    assert sum(t.count("\ufffd") for t in clean) == 3

    stats = ReadStats()
    got = list(iter_jsonl_records(tmp_path / "bad.jsonl", "text", "replace", False, stats))
    assert [t for _, t in got] == clean and stats.bad_utf8 == 3
    assert [w.rsplit(":", 1)[1] for w, _ in got] == [str(n) for n in [*range(1, 61), *range(62, 122)]]
    offset = raw.index(b"\xff")
    with pytest.raises(UserError, match=rf"bad\.jsonl:8: invalid UTF-8 at byte offset {offset} "):
        list(iter_jsonl_records(tmp_path / "bad.jsonl", "text", "error", False, ReadStats()))
    with pytest.raises(UserError, match="on_bad_utf8 must be"):
        list(iter_jsonl_records(tmp_path / "bad.jsonl", "text", "ignore", False, ReadStats()))

    # prepare: the same shards as from a file holding the already-replaced text
    (tmp_path / "clean.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in clean), encoding="utf-8")
    kw = dict(verbose=False, shard_tokens=400)
    meta = prepare_dataset(tmp_path / "bad.jsonl", tmp_path / "a", vocab_size=300, **kw)
    ref = prepare_dataset(tmp_path / "clean.jsonl", tmp_path / "b", tokenizer=tmp_path / "a" / "tokenizer.json", **kw)
    assert meta["bad_utf8_replaced"] == 3 and ref["bad_utf8_replaced"] == 0
    assert meta["shards"] == ref["shards"] and len(meta["shards"]["train"]) > 1
    for shard in meta["shards"]["train"] + meta["shards"]["val"]:
        assert (tmp_path / "a" / shard["file"]).read_bytes() == (tmp_path / "b" / shard["file"]).read_bytes()
