"""Sharded datasets: Parquet / compressed JSONL in, resume and refusals, hygiene counts, Hub sources,
validation on open, multi-shard reading and document-aligned sampling, exact training resume over shards."""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from diyllm.cli import main
from diyllm.data import encode as encode_mod
from diyllm.data import load_split, prepare_dataset, read_meta
from diyllm.data.dataset import open_dataset
from diyllm.data.shard_writer import ShardWriter
from diyllm.data.shards import ShardedTokens, TokenBatcher
from diyllm.errors import UserError
from diyllm.tokenizers import CharTokenizer, load_tokenizer

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
zstd = pytest.importorskip("zstandard")

DOCS = [f"story {i}: the fox {'jumps ' * (i % 7 + 1)}over the dog number {i * 7919 % 1000}." for i in range(300)]


def _parquet(path, docs, column="content", row_group_size=40):
    table = pa.table({"id": list(range(len(docs))), column: docs})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def _jsonl_bytes(docs, field="text"):
    return "".join(json.dumps({field: d}) + "\n" for d in docs).encode()


def _tokens(out, split):
    return np.asarray(load_split(out, split)).tolist()


def _decoded_docs(out):
    tok = load_tokenizer(out / "tokenizer.json")
    text = tok.decode(_tokens(out, "train")) + tok.decode(_tokens(out, "val"))
    return sorted(d for d in text.split("<|endoftext|>") if d)


def test_parquet_by_row_groups_and_compressed_jsonl_agree(tmp_path, monkeypatch):
    src = _parquet(tmp_path / "c.parquet", DOCS)
    assert pq.ParquetFile(src).num_row_groups == 8
    monkeypatch.setattr("diyllm.data.readers.PARQUET_ROWS_PER_BATCH", 16)  # several batches per row group
    kw = dict(vocab_size=300, verbose=False, shard_tokens=2000)
    meta = prepare_dataset(src, tmp_path / "pq", text_field="content", **kw)
    assert _decoded_docs(tmp_path / "pq") == sorted(DOCS)
    assert len(meta["shards"]["train"]) > 2 and meta["documents_seen"] == 300
    (tmp_path / "c.jsonl.zst").write_bytes(zstd.ZstdCompressor().compress(_jsonl_bytes(DOCS)))
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(_jsonl_bytes(DOCS)))
    tok = tmp_path / "pq" / "tokenizer.json"
    for name in ("c.jsonl.zst", "c.jsonl.gz"):
        out = tmp_path / name.replace(".", "_")
        prepare_dataset(tmp_path / name, out, tokenizer=tok, **kw)
        for split in ("train", "val"):  # same documents, same hash split, same tokens
            assert _tokens(out, split) == _tokens(tmp_path / "pq", split)
    with pytest.raises(UserError, match=r"c\.parquet has no column 'text'; its columns are \['id', 'content'\]"):
        prepare_dataset(src, tmp_path / "x", **kw)
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(UserError, match=r"bad\.parquet: not a readable Parquet file"):
        prepare_dataset(tmp_path / "bad.parquet", tmp_path / "x", **kw)
    good = zstd.ZstdCompressor().compress(_jsonl_bytes(DOCS))
    (tmp_path / "bad.jsonl.zst").write_bytes(good[: len(good) // 2] + b"\x00" * 64)
    with pytest.raises(UserError, match=r"bad\.jsonl\.zst: the compressed stream is corrupt"):
        prepare_dataset(tmp_path / "bad.jsonl.zst", tmp_path / "x", tokenizer=tok, **kw)
    assert not (tmp_path / "x").exists()


def test_dedup_min_chars_and_val_budget(tmp_path):
    docs = DOCS[:100] + DOCS[:20] + ["short", "   ", "tiny!"]
    (tmp_path / "d.jsonl").write_bytes(_jsonl_bytes(docs))
    meta = prepare_dataset(tmp_path / "d.jsonl", tmp_path / "o", vocab_size=280, verbose=False, min_chars=10)
    assert meta["documents_seen"] == 123 and meta["duplicates_dropped"] == 20 and meta["too_short_dropped"] == 3
    assert meta["train_documents"] + meta["val_documents"] == 100
    assert _decoded_docs(tmp_path / "o") == sorted(DOCS[:100])
    capped = prepare_dataset(tmp_path / "d.jsonl", tmp_path / "v", verbose=False, min_chars=10, val_fraction=0.5,
                             val_tokens=100, tokenizer=tmp_path / "o" / "tokenizer.json")
    assert 100 <= capped["val_tokens"] < 100 + 60 and capped["train_documents"] + capped["val_documents"] == 100
    # the split is by document hash: growing the corpus keeps every old document on its side
    (tmp_path / "more.jsonl").write_bytes(_jsonl_bytes(DOCS[100:]))
    prepare_dataset([tmp_path / "d.jsonl", tmp_path / "more.jsonl"], tmp_path / "g", verbose=False, min_chars=10,
                    tokenizer=tmp_path / "o" / "tokenizer.json")
    tok = load_tokenizer(tmp_path / "o" / "tokenizer.json")
    val_small = set(tok.decode(_tokens(tmp_path / "o", "val")).split("<|endoftext|>")) - {""}
    val_big = set(tok.decode(_tokens(tmp_path / "g", "val")).split("<|endoftext|>")) - {""}
    assert val_small and val_small <= val_big


def test_resume_keeps_finished_shards_and_refuses_changes(tmp_path, monkeypatch):
    src = _parquet(tmp_path / "c.parquet", DOCS * 2 + [d.upper() for d in DOCS], column="text")
    monkeypatch.setattr(encode_mod, "JOB_CHARS", 2000)
    kw = dict(tokenizer_kind="char", verbose=False, shard_tokens=3000)
    prepare_dataset(src, tmp_path / "clean", **kw)
    real, calls = encode_mod.JobEncoder.__call__, [0]

    def dies_midway(self, job):
        calls[0] += 1
        if calls[0] == 10:
            raise KeyboardInterrupt
        return real(self, job)

    monkeypatch.setattr(encode_mod.JobEncoder, "__call__", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(src, tmp_path / "out", **kw)
    finished = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("train_*.bin")}
    assert len(finished) >= 2 and not (tmp_path / "out" / "meta.json").exists()
    monkeypatch.setattr(encode_mod.JobEncoder, "__call__", real)
    prepare_dataset(src, tmp_path / "out", **kw)
    names = sorted(p.name for p in (tmp_path / "clean").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "out").iterdir())
    for name in names:
        if name not in ("meta.json", ".diyllm-verified.json"):  # the record holds each file's own stat
            assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name
    assert all((tmp_path / "out" / n).stat().st_mtime_ns == t for n, t in finished.items())  # not rewritten
    done = (tmp_path / "out" / "meta.json").stat().st_mtime_ns
    prepare_dataset(src, tmp_path / "out", **kw)  # finished: nothing rebuilt
    assert (tmp_path / "out" / "meta.json").stat().st_mtime_ns == done
    with pytest.raises(UserError, match="made from other inputs or options.*seed.*--overwrite"):
        prepare_dataset(src, tmp_path / "out", seed=5, **kw)
    _parquet(src, DOCS, column="text")  # the input changed
    with pytest.raises(UserError, match=r"input changed: .*c\.parquet"):
        prepare_dataset(src, tmp_path / "out", **kw)
    meta = prepare_dataset(src, tmp_path / "out", overwrite=True, **kw)
    assert meta["documents_seen"] == len(DOCS)


def test_out_folder_safety(tmp_path, monkeypatch, capsys):
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "a.txt").write_text("my only copy of the corpus\n" * 50)
    before = (corpus / "a.txt").read_bytes()
    assert main(["prepare", str(corpus), "--out", str(corpus), "--tokenizer_kind", "char", "--quiet"]) == 2
    assert "inside the input folder" in capsys.readouterr().err
    assert main(["prepare", str(corpus / "a.txt"), "--out", str(corpus / "ds"), "--tokenizer_kind", "char"]) == 0
    assert sorted(p.name for p in corpus.iterdir()) == ["a.txt", "ds"] and (corpus / "a.txt").read_bytes() == before
    capsys.readouterr()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for out in (mine, tmp_path / "c" / "a.txt"):
        assert main(["prepare", str(corpus / "a.txt"), "--out", str(out), "--tokenizer_kind", "char",
                     "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "is not empty and is not a diyllm dataset (it holds notes.txt)" in err and "is a file" in err
    assert err.count("error:") == 2 and "Traceback" not in err
    monkeypatch.chdir(mine)
    assert main(["prepare", str(corpus / "a.txt"), "--out", ".", "--tokenizer_kind", "char"]) == 2
    assert sorted(os.listdir(mine)) == ["notes.txt"] and not list(tmp_path.glob(".*"))
    # temp leftovers of killed runs are removed once the lock shows nobody is writing
    stale_file = corpus / "ds" / ".train_00000.idx.abc123.tmp"
    stale_file.write_bytes(b"x")
    stale_dir = corpus / ".ds.xyz.tmp"
    stale_dir.mkdir()
    (stale_dir / "train.bin").write_bytes(b"\0" * 100)
    assert main(["prepare", str(corpus / "a.txt"), "--out", str(corpus / "ds"), "--tokenizer_kind", "char",
                 "--quiet"]) == 0
    assert not stale_file.exists() and not stale_dir.exists()


def test_disk_full_and_read_only_are_clear(tmp_path, monkeypatch):
    src = tmp_path / "in.jsonl"
    src.write_bytes(_jsonl_bytes(DOCS))
    real, n = ShardWriter._finish, [0]

    def fills_disk(self):
        n[0] += 1
        if n[0] == 3:
            self.file.write(b"\0" * 10)
            raise OSError(errno.ENOSPC, "No space left on device", str(self.partial_path))
        return real(self)

    monkeypatch.setattr(ShardWriter, "_finish", fills_disk)
    with pytest.raises(UserError, match=r"disk full while writing .*partial: the 2 finished shard\(s\) .* are kept"):
        prepare_dataset(src, tmp_path / "o", tokenizer_kind="char", verbose=False, shard_tokens=1500)
    assert sorted(p.name for p in (tmp_path / "o").glob("*_*.bin")) == ["train_00000.bin", "train_00001.bin"]
    assert not (tmp_path / "o" / "meta.json").exists()
    monkeypatch.setattr(ShardWriter, "_finish", real)
    prepare_dataset(src, tmp_path / "o", tokenizer_kind="char", verbose=False, shard_tokens=1500)  # resumes
    prepare_dataset(src, tmp_path / "clean", tokenizer_kind="char", verbose=False, shard_tokens=1500)
    for split in ("train", "val"):
        assert _tokens(tmp_path / "o", split) == _tokens(tmp_path / "clean", split)

    def read_only(self):
        raise OSError(errno.EROFS, "Read-only file system", str(self.partial_path))

    monkeypatch.setattr(ShardWriter, "_open", read_only)
    with pytest.raises(UserError, match="cannot write .*Read-only file system; choose a writable --out"):
        prepare_dataset(src, tmp_path / "ro", tokenizer_kind="char", verbose=False)


def test_char_tokenizer_missing_character_names_the_record(tmp_path):
    CharTokenizer.train("abc ").save(tmp_path / "tok.json")
    (tmp_path / "d.jsonl").write_bytes(_jsonl_bytes(["abc", "cab", "a b z", "bb"]))
    with pytest.raises(UserError, match=r"d\.jsonl:3: character 'z' .* not in the vocabulary of .*tokenizer\.json"):
        prepare_dataset(tmp_path / "d.jsonl", tmp_path / "o", tokenizer=tmp_path / "tok.json", verbose=False)
    assert not (tmp_path / "o").exists()


def test_validation_on_open(tmp_path):
    ok = tmp_path / "ok"
    prepare_dataset(_write(tmp_path / "in.jsonl"), ok, tokenizer_kind="char", verbose=False, shard_tokens=4000)
    assert len(read_meta(ok)["shards"]["train"]) >= 3

    def broken(name, fn):
        d = tmp_path / name
        shutil.copytree(ok, d)
        fn(d)
        return d

    meta = json.loads((ok / "meta.json").read_text())
    cases = {
        "truncated": (lambda d: os.truncate(d / "train_00001.bin", 4000), "holds 2000 tokens but meta.json says 4000"),
        "odd": (lambda d: os.truncate(d / "train_00001.bin", 3999), "has 3999 bytes, not a multiple of 2"),
        "dtype": (lambda d: (d / "meta.json").write_text(json.dumps({**meta, "dtype": "float32"})), "dtype 'float32'"),
        "int64": (lambda d: (d / "meta.json").write_text(json.dumps({**meta, "dtype": "int64"})),
                  "holds 1000 tokens but meta.json says 4000"),
        "list": (lambda d: (d / "meta.json").write_text("[1, 2]"), "holds a JSON list, not an object"),
        "vocab": (lambda d: (d / "meta.json").write_text(json.dumps({**meta, "vocab_size": 5})), "outside the vocab"),
        "noval": (lambda d: (d / "meta.json").write_text(json.dumps({**meta, "val_tokens": 0, "shards": {
            "train": meta["shards"]["train"], "val": []}})), "the val split of .* is empty"),
    }
    for name, (damage, message) in cases.items():
        d = broken(name, damage)
        with pytest.raises(UserError, match=message):
            open_dataset(d, require_val=True)
    r = subprocess.run([sys.executable, "-m", "diyllm", "train", "shakespeare_char_cpu",
                        f"--data_dir={tmp_path / 'truncated'}", f"--out_dir={tmp_path / 'run'}", "--max_iters=1",
                        "--warmup_iters=0"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "train_00001.bin holds 2000 tokens but meta.json says 4000" in r.stderr


def _write(path):
    path.write_bytes(_jsonl_bytes(DOCS))
    return path


def test_sharded_reading_and_doc_aligned_sampling(tmp_path, capsys):
    out = tmp_path / "o"
    prepare_dataset(_write(tmp_path / "in.jsonl"), out, vocab_size=300, verbose=False, shard_tokens=777)
    ds = open_dataset(out)
    train = ds.splits["train"]
    assert len(train.arrays) > 3
    flat = np.concatenate([np.asarray(a) for a in train.arrays])
    for a, b in [(0, 10), (770, 790), (5, 777 * 3 + 5), (len(flat) - 3, len(flat) + 5)]:
        assert train[a:b].tolist() == flat[a:b].tolist()  # windows across shard boundaries
    eot = read_meta(out)["eot_id"]
    expected = np.concatenate([[0], np.flatnonzero(flat == eot)[:-1] + 1])
    assert train.doc_starts().tolist() == expected.tolist()  # the .idx offsets are the document starts
    assert ShardedTokens(train.arrays, None, eot).doc_starts().tolist() == expected.tolist()
    batcher = TokenBatcher(ds.splits, 24, seed=3, sampling="doc_aligned")
    starts = set(expected.tolist())
    for _ in range(5):
        picked = batcher.sample_starts("train", 16)
        assert all(int(s) in starts for s in picked)
    x, y = batcher.get_batch("train", 16)
    assert (x[:, 1:] == y[:, :-1]).all() and x.shape == (16, 24)
    tok = load_tokenizer(out / "tokenizer.json")
    assert all(tok.decode(row[:6].tolist()).startswith("story ") for row in x)  # every window opens a document
    assert main(["inspect-data", str(out), "--shard", "2", "--verify", "--context", "4"]) == 0
    shown = capsys.readouterr().out
    assert "window at train_00002.bin[" in shown and shown.count("sha256 ok") == len(ds.meta["shards"]["train"]) + 1
    with open(out / "train_00001.bin", "r+b") as f:  # same size, one byte flipped: only the checksum sees it
        f.seek(10)
        low = f.read(1)[0]  # the low byte of a little-endian id: the id stays below vocab_size
        f.seek(10)
        f.write(bytes([low ^ 1]))
    assert main(["inspect-data", str(out), "--verify"]) == 2
    assert "train_00001.bin does not match its SHA-256" in capsys.readouterr().err


def test_exact_training_resume_over_three_shards(tmp_path):
    from diyllm.training.checkpoint import read_checkpoint
    from diyllm.training.config import TrainConfig
    from diyllm.training.trainer import train

    data = tmp_path / "data"
    prepare_dataset(_write(tmp_path / "in.jsonl"), data, tokenizer_kind="char", verbose=False, shard_tokens=7000)
    assert len(read_meta(data)["shards"]["train"]) == 3

    def cfg(out, **kw):
        base = dict(data_dir=str(data), out_dir=str(out), context_length=32, d_model=32, num_layers=2, num_heads=2,
                    d_ff=64, batch_size=4, max_iters=8, lr_decay_iters=8, warmup_iters=2, eval_interval=4,
                    eval_iters=2, checkpoint_interval=4, device="cpu", dtype="float32", progress=False,
                    batch_sampling="doc_aligned")
        base.update(kw)
        return TrainConfig(**base).validate()

    train(cfg(tmp_path / "full"))
    train(cfg(tmp_path / "split", max_iters=4))
    train(cfg(tmp_path / "split", init_from="resume"))
    a, b = read_checkpoint(tmp_path / "full" / "latest.pt"), read_checkpoint(tmp_path / "split" / "latest.pt")
    assert a["data_state"] == b["data_state"] and a["data_state"]["sampling"] == "doc_aligned"
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def _fake_hub(cache, repo, files):
    base = cache / f"datasets--{repo.replace('/', '--')}"
    snap = base / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    for rel, data in files.items():
        (snap / rel).parent.mkdir(parents=True, exist_ok=True)
        (snap / rel).write_bytes(data)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(snap.name)
    return snap


def test_hub_sources_offline_cache_and_download_path(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    shards = {f"data/train-{i:05d}.parquet": None for i in range(3)}
    snap = _fake_hub(cache, "someone/stories", {k: b"" for k in shards} | {"README.md": b"# card"})
    for i, rel in enumerate(shards):
        _parquet(snap / rel, DOCS[i * 100 : (i + 1) * 100], column="text")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "diyllm", "prepare", "hf:someone/stories/data/*.parquet", "--max_shards", "2",
           "--out", str(tmp_path / "o"), "--tokenizer_kind", "char", "--quiet"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    meta = read_meta(tmp_path / "o")
    assert meta["documents_seen"] == 200 and [os.path.basename(s) for s in meta["sources"]] == [
        "train-00000.parquet", "train-00001.parquet"]
    r = subprocess.run(cmd[:4] + ["hf:someone/absent", "--out", str(tmp_path / "o2")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "HF_HUB_OFFLINE=1" in r.stderr, r.stderr

    # online: the real huggingface_hub calls, with the network replaced at list_repo_files / hf_hub_download
    import types

    import huggingface_hub as hf
    from huggingface_hub import constants, errors

    from diyllm.data.hub import resolve_hub_sources

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf.HfApi, "list_repo_files", lambda self, repo, repo_type=None: ["README.md", *shards])
    fetched = []
    monkeypatch.setattr(hf, "hf_hub_download", lambda repo, name, repo_type=None: fetched.append(name) or
                        str(snap / name))
    assert resolve_hub_sources(["hf:someone/stories"], max_files=1) == [str(snap / "data/train-00000.parquet")]
    assert fetched == ["data/train-00000.parquet"]

    def missing(self, repo, repo_type=None):
        response = types.SimpleNamespace(headers={}, status_code=404, request=None, url="https://hub", text="")
        raise errors.RepositoryNotFoundError("404", response=response)

    monkeypatch.setattr(hf.HfApi, "list_repo_files", missing)
    with pytest.raises(UserError, match="no such dataset on the Hugging Face Hub .*HF_TOKEN"):
        resolve_hub_sources(["hf:someone/nothing"])


def test_single_file_dataset_of_before_sharding_still_opens_and_samples(tmp_path):
    """train.bin / val.bin and a meta.json without "shards" (format 1) read as one shard per split."""
    ids = np.arange(3000, dtype=np.uint16) % 50
    ids[::97] = 50  # an EOT every 97 tokens
    ids[:2500].tofile(tmp_path / "train.bin")
    ids[2500:].tofile(tmp_path / "val.bin")
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 51, "dtype": "uint16", "eot_id": 50,
                                                    "train_tokens": 2500, "val_tokens": 500}))
    ds = open_dataset(tmp_path, require_val=True)
    assert isinstance(load_split(tmp_path, "train"), np.memmap) and len(ds.splits["val"]) == 500
    batcher = TokenBatcher(ds.splits, 16, sampling="doc_aligned")
    starts = batcher.sample_starts("train", 64)
    assert all(s == 0 or ids[s - 1] == 50 for s in starts)
    rng = np.random.default_rng(np.random.SeedSequence([1337, 0, 0]))  # random mode = get_batch's windows
    assert TokenBatcher(ds.splits, 16).sample_starts("train", 8).tolist() == rng.integers(0, 2500 - 16, 8).tolist()


def test_hub_recipes_take_local_copies_and_explain_offline(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    _parquet(tmp_path / "train-00000.parquet", DOCS, column="text")
    assert main(["prepare", "tinystories", "--input", str(tmp_path / "train-00000.parquet"), "--out",
                 str(tmp_path / "ts"), "--tokenizer_kind", "char", "--quiet"]) == 0
    meta = read_meta(tmp_path / "ts")
    assert meta["documents_seen"] == len(DOCS) and meta["tokenizer_kind"] == "char"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # no network is ever tried
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert main(["prepare", "fineweb_edu", "--max_shards", "1", "--out", str(tmp_path / "fw")]) == 2
    err = capsys.readouterr().err
    assert "hf:HuggingFaceFW/fineweb-edu" in err and "pass the local files as SOURCE" in err
    assert err.count("\n") == 1 and not (tmp_path / "fw").exists()


def test_gpt2_tokenizer_from_the_hub_cache(tmp_path, monkeypatch, capsys):
    """`--tokenizer gpt2` reads GPT-2's vocab.json/merges.txt through the Hub cache (a tiny fake here)."""
    from huggingface_hub import constants

    from diyllm.tokenizers.gpt2_bytes import encode_token

    vocab = {encode_token(bytes([b])): b for b in range(256)} | {encode_token(b"th"): 256, "<|endoftext|>": 257}
    base = tmp_path / "hub" / "models--openai-community--gpt2"
    snap = base / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / "vocab.json").write_text(json.dumps(vocab))
    (snap / "merges.txt").write_text("#version: 0.2\nt h\n")
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "d.jsonl").write_bytes(_jsonl_bytes(["the thin thing", "this then that"]))
    assert main(["prepare", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "o"), "--tokenizer", "gpt2",
                 "--quiet"]) == 0
    meta = read_meta(tmp_path / "o")
    assert meta["vocab_size"] == 258 and meta["eot_id"] == 257
    assert 256 in _tokens(tmp_path / "o", "train") + _tokens(tmp_path / "o", "val")  # the "th" merge was used
