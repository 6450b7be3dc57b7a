"""`diyllm prepare` / prepare_dataset: exact read-back, splits, dtypes, atomicity, and every bad input."""

from __future__ import annotations

import json
import urllib.error

import numpy as np
import pytest

from diyllm.cli import main
from diyllm.data import encode as encode_mod
from diyllm.data import get_batch, load_split, prepare_dataset, read_meta
from diyllm.data import prepare as prepare_mod
from diyllm.data.recipes import pystdlib_files
from diyllm.errors import UserError
from diyllm.tokenizers import load_tokenizer

EOT = "<|endoftext|>"
TEXT = "".join(f"Line {i}: the cat sat on the mat, naïvely. 😀\n" for i in range(400))


def _read(out, split):
    return np.asarray(load_split(out, split))


def test_char_single_file_reads_back_exactly(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text(TEXT, encoding="utf-8")
    meta = prepare_dataset(src, tmp_path / "out", tokenizer_kind="char", verbose=False)
    tok = load_tokenizer(tmp_path / "out" / "tokenizer.json")
    train, val = _read(tmp_path / "out", "train"), _read(tmp_path / "out", "val")
    assert tok.decode(train.tolist()) + tok.decode(val.tolist()) == TEXT  # tail split, nothing lost
    assert tok.decode(val.tolist()).startswith("Line ")  # the tail starts at a line start
    assert meta["dtype"] == "uint16" and meta["split_mode"] == "tail" and meta["eot_id"] is None
    assert meta["train_tokens"] == len(train) and abs(len(val) / len(TEXT) - 0.1) < 0.02
    x, y = get_batch(load_split(tmp_path / "out", "train"), 4, 8, generator=np.random.default_rng(0))
    assert (x[:, 1:] == y[:, :-1]).all()
    start = int(np.random.default_rng(0).integers(0, len(train) - 8, size=4)[0])
    assert x[0].tolist() == train[start : start + 8].tolist()


def test_bpe_folder_split_by_document(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    texts = {f"d{i:02d}.txt": f"document {i} " + "words and more words " * (i + 1) for i in range(20)}
    for name, t in texts.items():
        (docs / name).write_text(t)
    (docs / ".hidden.txt").write_text("never read")
    (docs / "image.png").write_bytes(b"\x89PNG")
    meta = prepare_dataset(docs, tmp_path / "o1", vocab_size=300, verbose=False, val_fraction=0.2, seed=3)
    tok = load_tokenizer(tmp_path / "o1" / "tokenizer.json")
    train, val = _read(tmp_path / "o1", "train"), _read(tmp_path / "o1", "val")
    assert meta["train_documents"] + meta["val_documents"] == 20 and meta["val_documents"] >= 1
    assert meta["split_mode"] == "hash" and meta["duplicates_dropped"] == 0
    assert train[-1] == tok.eot_id and val[-1] == tok.eot_id
    got = [d for d in (tok.decode(train.tolist()) + tok.decode(val.tolist())).split(EOT) if d]
    assert sorted(got) == sorted(texts.values())
    assert len(meta["sources"]) == 20
    # deterministic: same seed, same bytes; another seed, another split
    prepare_dataset(docs, tmp_path / "o2", vocab_size=300, verbose=False, val_fraction=0.2, seed=3)
    assert (tmp_path / "o1" / "val_00000.bin").read_bytes() == (tmp_path / "o2" / "val_00000.bin").read_bytes()
    prepare_dataset(docs, tmp_path / "o3", vocab_size=300, verbose=False, val_fraction=0.2, seed=4,
                    tokenizer=tmp_path / "o1" / "tokenizer.json")
    assert (tmp_path / "o1" / "val_00000.bin").read_bytes() != (tmp_path / "o3" / "val_00000.bin").read_bytes()


def test_jsonl_and_bad_lines(tmp_path):
    src = tmp_path / "d.jsonl"
    rows = [json.dumps({"text": f"record {i} hello"}) for i in range(10)]
    src.write_text("\n".join(rows[:4] + ["{broken", ""] + rows[4:] + ['{"txt": 1}']) + "\n")
    with pytest.raises(UserError, match=r"d\.jsonl:5: malformed JSONL"):
        prepare_dataset(src, tmp_path / "out", vocab_size=280, verbose=False)
    assert not (tmp_path / "out").exists()
    meta = prepare_dataset(src, tmp_path / "out", vocab_size=280, verbose=False, skip_bad_lines=True)
    assert meta["skipped_bad_lines"] == 2 and meta["train_documents"] + meta["val_documents"] == 10
    assert meta["val_documents"] >= 1


def test_bad_utf8_replace_and_error(tmp_path):
    src = tmp_path / "bad.txt"
    src.write_bytes(b"good text\n" * 5 + b"bad \xff\xfe byte\n" + b"more\n" * 5)
    with pytest.raises(UserError, match=r"bad\.txt: invalid UTF-8 at byte offset 54"):
        prepare_dataset(src, tmp_path / "out", tokenizer_kind="char", on_bad_utf8="error", verbose=False)
    meta = prepare_dataset(src, tmp_path / "out", tokenizer_kind="char", verbose=False)
    assert meta["bad_utf8_replaced"] == 2
    tok = load_tokenizer(tmp_path / "out" / "tokenizer.json")
    assert "\ufffd\ufffd" in tok.decode(_read(tmp_path / "out", "train").tolist())


def test_user_errors(tmp_path):
    with pytest.raises(UserError, match="input not found"):
        prepare_dataset(tmp_path / "nope.txt", tmp_path / "out", verbose=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(UserError, match="corpus is empty"):
        prepare_dataset(empty, tmp_path / "out", verbose=False)
    src = tmp_path / "in.txt"
    src.write_text(TEXT)
    with pytest.raises(UserError, match="too small"):
        prepare_dataset(src, tmp_path / "out", vocab_size=100, verbose=False)
    with pytest.raises(UserError, match="val_fraction"):
        prepare_dataset(src, tmp_path / "out", val_fraction=1.5, verbose=False)
    with pytest.raises(UserError, match="no files match"):
        prepare_dataset(str(tmp_path / "*.nomatch"), tmp_path / "out", verbose=False)
    with pytest.raises(UserError, match="not a prepared dataset"):
        load_split(tmp_path, "train")
    assert not (tmp_path / "out").exists()


def test_uint32_for_large_vocab(tmp_path):
    chars = [chr(c) for c in range(0x100, 0x100 + 70000) if not 0xD800 <= c < 0xE000]
    src = tmp_path / "wide.txt"
    src.write_text("".join(chars), encoding="utf-8")
    meta = prepare_dataset(src, tmp_path / "out", tokenizer_kind="char", verbose=False)
    assert meta["vocab_size"] == len(chars) > 65536 and meta["dtype"] == "uint32"
    data = np.concatenate([_read(tmp_path / "out", "train"), _read(tmp_path / "out", "val")])
    assert data.dtype == np.uint32 and data.max() == len(chars) - 1
    assert (tmp_path / "out" / "train_00000.bin").stat().st_size == 4 * meta["train_tokens"]


def test_interrupted_run_is_visibly_unfinished_and_resumes(tmp_path, monkeypatch):
    src = tmp_path / "in.txt"
    src.write_text(TEXT)
    prepare_dataset(src, tmp_path / "clean", tokenizer_kind="char", verbose=False)
    real = encode_mod.JobEncoder.__call__

    def boom(self, job):
        raise KeyboardInterrupt

    monkeypatch.setattr(encode_mod.JobEncoder, "__call__", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(src, tmp_path / "out", tokenizer_kind="char", verbose=False)
    assert not (tmp_path / "out" / "meta.json").exists()  # no manifest: not a dataset yet
    with pytest.raises(UserError, match="unfinished prepare"):
        load_split(tmp_path / "out", "train")
    monkeypatch.setattr(encode_mod.JobEncoder, "__call__", real)
    prepare_dataset(src, tmp_path / "out", tokenizer_kind="char", verbose=False)
    for split in ("train", "val"):
        assert _read(tmp_path / "out", split).tolist() == _read(tmp_path / "clean", split).tolist()
    hidden = sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith("."))
    assert hidden == [".diyllm-verified.json"]  # the record of verified checksums; no leftovers of the killed run


def test_parallel_encoding_equals_serial(tmp_path, monkeypatch):
    src = tmp_path / "in.txt"
    src.write_text(TEXT * 4)
    monkeypatch.setattr(encode_mod, "JOB_CHARS", 4096)  # many jobs, long document cut safely
    prepare_dataset(src, tmp_path / "s", vocab_size=300, verbose=False, num_workers=1, shard_tokens=1000)
    monkeypatch.setattr(prepare_mod, "PARALLEL_MIN_BYTES", 0)
    prepare_dataset(src, tmp_path / "p", vocab_size=300, verbose=False, num_workers=2, shard_tokens=1000)
    names = sorted(p.name for p in (tmp_path / "s").glob("*_*.*"))
    assert len(names) > 4 and names == sorted(p.name for p in (tmp_path / "p").glob("*_*.*"))
    for name in names:
        assert (tmp_path / "s" / name).read_bytes() == (tmp_path / "p" / name).read_bytes()
    tok = load_tokenizer(tmp_path / "s" / "tokenizer.json")
    train = _read(tmp_path / "s", "train").tolist()
    assert train == tok.encode(TEXT * 4)[: len(train) - 1] + [tok.eot_id]


def test_cli_prepare_and_inspect(tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text(TEXT)
    assert main(["prepare", str(src), "--out", str(tmp_path / "out"), "--vocab_size", "300", "--quiet"]) == 0
    assert read_meta(tmp_path / "out")["vocab_size"] == 300
    assert main(["inspect-data", str(tmp_path / "out"), "--context", "8"]) == 0
    out = capsys.readouterr().out
    assert "ln(V)       5.7038" in out and "y is x shifted by one" in out and "uint16" in out
    assert main(["prepare", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "error: input not found" in capsys.readouterr().err


def test_recipes(tmp_path, monkeypatch, capsys, shared_data):
    files = pystdlib_files()
    assert files == sorted(files) and len(files) > 500
    assert not any("site-packages" in f or "/test/" in f for f in files)

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("DIYLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("urllib.request.urlopen", offline)
    assert main(["prepare", "shakespeare_char", "--out", str(tmp_path / "sc")]) == 2
    assert "--input PATH" in capsys.readouterr().err
    local = shared_data / "tinyshakespeare.txt"
    assert main(["prepare", "shakespeare_char", "--out", str(tmp_path / "sc"), "--input", str(local), "--quiet"]) == 0
    meta = read_meta(tmp_path / "sc")
    assert meta["vocab_size"] == 65 and meta["tokenizer_kind"] == "char"
    assert meta["train_tokens"] + meta["val_tokens"] == len(local.read_text())


def test_a_lopsided_hash_split_is_warned_about(tmp_path, capsys):
    """Documents go to val whole: with a few documents and one large one, the seed decides whether val
    holds ~10% of the tokens or most of them. The second case is warned about, the first is not."""
    docs = [" ".join(f"w{i}x{j % 7}" for j in range(n)) for i, n in enumerate([60, 900, 80, 6000, 200, 40, 700, 150])]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    shares = {}
    for seed in range(40):
        meta = prepare_dataset(src, tmp_path / f"s{seed}", tokenizer_kind="char", verbose=True, seed=seed)
        share = meta["val_tokens"] / (meta["val_tokens"] + meta["train_tokens"])
        shares[seed] = (share, "warning: the validation split holds" in capsys.readouterr().err)
        if any(s > 0.5 for s, _ in shares.values()) and any(0 < s < 0.2 for s, _ in shares.values()):
            break
    lopsided = [w for s, w in shares.values() if s > 0.5]
    fine = [w for s, w in shares.values() if s <= 0.2]
    assert lopsided and fine, shares
    assert all(lopsided) and not any(fine)


def test_a_missing_data_dir_names_the_prepare_command(tmp_path):
    """The hint names the recipe of the folder's name (the default --out of `diyllm prepare RECIPE`), so the
    speedrun's data/shakespeare_bpe512 is not told to prepare characters."""
    from diyllm.data.recipes import RECIPES

    assert RECIPES["shakespeare_bpe512"].defaults == {"tokenizer_kind": "bpe", "vocab_size": 512}
    with pytest.raises(UserError, match=r"`diyllm prepare shakespeare_bpe512 --out .*shakespeare_bpe512`"):
        read_meta(tmp_path / "shakespeare_bpe512")
    with pytest.raises(UserError, match=r"`diyllm prepare SOURCE --out .*mine`"):
        read_meta(tmp_path / "mine")
