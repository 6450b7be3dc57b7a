"""Dataset shard checksums verified when training opens a dataset (diyllm.data.checksums).

A damaged shard of the same size is refused by `diyllm train` with one error naming it, before any run
file is written; an unchanged shard is hashed once (prepare records it), and again only after it changes.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from diyllm.cli import main
from diyllm.data import checksums, prepare_dataset
from diyllm.data.dataset import open_dataset
from diyllm.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TINY = ["--d_model=32", "--num_layers=1", "--num_heads=2", "--d_ff=64", "--context_length=16", "--batch_size=2",
        "--max_iters=1", "--warmup_iters=0", "--eval_interval=0", "--eval_iters=1", "--progress=false",
        "--device=cpu"]
STAMP = checksums.STAMP_NAME


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A char dataset of several train shards (prepared once; each test works on a copy)."""
    root = tmp_path_factory.mktemp("sums")
    (root / "c.txt").write_text("".join(f"line {i}: the quick brown fox jumps over {i % 13}.\n" for i in range(400)))
    prepare_dataset([root / "c.txt"], root / "data", tokenizer_kind="char", val_fraction=0.1, shard_tokens=4000,
                    verbose=False)
    return root / "data"


@pytest.fixture
def data(prepared, tmp_path) -> Path:
    """A fresh copy, with its record of verified checksums made for the copy (a copy has new ctimes)."""
    d = tmp_path / "data"
    shutil.copytree(prepared, d)
    meta = json.loads((d / "meta.json").read_text())
    checksums.record_verified(d, [(d / s["file"], s["sha256"]) for sp in meta["shards"].values() for s in sp])
    return d


@pytest.fixture
def hashes(monkeypatch) -> list[str]:
    """The name of every shard file the checksum check reads."""
    seen: list[str] = []
    real = checksums.file_sha256

    def counting(path, *a, **k):
        seen.append(Path(path).name)
        return real(path, *a, **k)

    monkeypatch.setattr(checksums, "file_sha256", counting)
    return seen


def flip_byte(path: Path, keep_mtime: bool = False) -> None:
    """Change one token id in place (the size stays; the id stays below vocab_size)."""
    before = path.stat()
    time.sleep(0.02)  # beyond the file system's timestamp granularity, so the write shows in ctime
    with open(path, "r+b") as f:
        f.seek(10)
        low = f.read(1)[0]
        f.seek(10)
        f.write(bytes([low ^ 1]))
    if keep_mtime:  # set mtime back: only ctime (which user space cannot set) still shows the change
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size


def test_prepare_records_its_shards_and_an_unchanged_dataset_is_not_hashed_again(data, hashes):
    shards = sorted(p.name for p in data.glob("*_*.bin"))
    assert len([s for s in shards if s.startswith("train_")]) >= 3
    open_dataset(data, verify_checksums=True)
    assert hashes == []  # prepare hashed what it wrote and recorded it
    (data / STAMP).unlink()
    open_dataset(data, verify_checksums=True)
    assert sorted(hashes) == shards  # no record: every shard hashed once ...
    hashes.clear()
    open_dataset(data, verify_checksums=True)
    assert hashes == []  # ... and not again while unchanged
    assert sorted(json.loads((data / STAMP).read_text())["shards"]) == shards
    stale = data / f".{STAMP}.k1ll3d.tmp"  # what a process killed while writing the record leaves
    stale.write_text("{")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    (data / STAMP).unlink()
    open_dataset(data, verify_checksums=True)
    assert not stale.exists() and (data / STAMP).exists()


def test_a_changed_shard_is_hashed_again_and_refused(data, hashes):
    recorded = (data / STAMP).read_bytes()
    flip_byte(data / "train_00001.bin")
    with pytest.raises(UserError, match=r"train_00001\.bin does not match its SHA-256 in meta\.json.*diyllm prepare"):
        open_dataset(data, verify_checksums=True)
    assert hashes == ["train_00001.bin"]  # only the shard whose stat changed
    assert (data / STAMP).read_bytes() == recorded  # a refused dataset is left as it was
    flip_byte(data / "train_00001.bin")  # flipped back: the contents match again
    open_dataset(data, verify_checksums=True)
    flip_byte(data / "train_00002.bin", keep_mtime=True)
    with pytest.raises(UserError, match=r"train_00002\.bin does not match its SHA-256"):
        open_dataset(data, verify_checksums=True)
    open_dataset(data, verify_checksums=False)  # verify_data=false: not checked


def test_train_refuses_a_damaged_shard_with_one_error_and_leaves_no_run(data, tmp_path, capsys):
    flip_byte(data / "train_00001.bin")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-m", "diyllm", "train", f"--data_dir={data}", f"--out_dir={tmp_path / 'run'}",
                        *TINY], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"{data / 'train_00001.bin'} does not match its SHA-256" in errors[0], p.stderr
    assert not (tmp_path / "run").exists()
    flip_byte(data / "train_00001.bin")  # repaired ...
    open_dataset(data, verify_checksums=True)  # ... and recorded as verified
    flip_byte(data / "train_00001.bin", keep_mtime=True)  # damaged again, its mtime set back
    capsys.readouterr()
    assert main(["train", f"--data_dir={data}", f"--out_dir={tmp_path / 'run'}", *TINY]) == 2
    err = capsys.readouterr().err
    assert "train_00001.bin does not match its SHA-256" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
    assert main(["train", f"--data_dir={data}", f"--out_dir={tmp_path / 'run'}", "--verify_data=false", *TINY]) == 0


def test_rerunning_prepare_rebuilds_a_damaged_dataset(tmp_path):
    (tmp_path / "c.txt").write_text("".join(f"row {i} of the corpus.\n" for i in range(300)))
    kw = dict(tokenizer_kind="char", shard_tokens=2000, verbose=False)
    prepare_dataset([tmp_path / "c.txt"], tmp_path / "d", **kw)
    good = (tmp_path / "d" / "train_00001.bin").read_bytes()
    flip_byte(tmp_path / "d" / "train_00001.bin")
    prepare_dataset([tmp_path / "c.txt"], tmp_path / "d", **kw)  # the same command: finds the damage, rebuilds
    assert (tmp_path / "d" / "train_00001.bin").read_bytes() == good
    open_dataset(tmp_path / "d", verify_checksums=True)


def test_inspect_data_verify_rehashes_everything(data, hashes, capsys):
    assert main(["inspect-data", str(data), "--verify", "--context=4"]) == 0
    assert sorted(hashes) == sorted(p.name for p in data.glob("*_*.bin"))


def test_read_only_folder_is_hashed_every_time_with_a_note(data, hashes, monkeypatch, capsys):
    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    (data / STAMP).unlink()
    monkeypatch.setattr(checksums, "atomic_write", read_only)
    monkeypatch.setattr(checksums, "PROGRESS_BYTES", 0)  # as if the dataset were large
    n = len(list(data.glob("*_*.bin")))
    for _ in range(2):
        open_dataset(data, verify_checksums=True)
    assert len(hashes) == 2 * n and not (data / STAMP).exists()
    err = capsys.readouterr().err
    assert err.count(f"note: cannot record the verified checksums in {data / STAMP}") == 2


def test_single_file_dataset_without_checksums_still_trains(tmp_path):
    ids = (np.arange(3000) % 40).astype(np.uint16)
    ids[:2500].tofile(tmp_path / "train.bin")
    ids[2500:].tofile(tmp_path / "val.bin")
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 40, "dtype": "uint16", "train_tokens": 2500,
                                                    "val_tokens": 500}))
    assert main(["train", f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'run'}", *TINY]) == 0
    assert not (tmp_path / STAMP).exists()  # nothing to verify, nothing recorded


def test_lr_find_and_diagnose_refuse_a_damaged_shard_too(data, tmp_path, capsys):
    from diyllm.model import DIYConfig, DIYForCausalLM
    from diyllm.training.checkpoint import save_checkpoint

    flip_byte(data / "train_00001.bin")
    assert main(["lr-find", "shakespeare_char_cpu", f"--data_dir={data}", f"--out={tmp_path / 'lr.png'}",
                 "--num_iters=3", *TINY[:5], "--progress=false", "--device=cpu"]) == 2
    err = capsys.readouterr().err
    assert "train_00001.bin does not match its SHA-256" in err and not (tmp_path / "lr.png").exists()
    vocab = json.loads((data / "meta.json").read_text())["vocab_size"]
    model = DIYForCausalLM(DIYConfig(vocab_size=vocab, context_length=16, d_model=32, num_layers=1, num_heads=2,
                                     d_ff=64))
    save_checkpoint(model, None, 0, tmp_path / "m.pt", model_config=model.config.to_dict())
    assert main(["diagnose", f"--ckpt={tmp_path / 'm.pt'}", f"--data_dir={data}", f"--out={tmp_path / 'd.png'}",
                 "--batch_size=2"]) == 2
    assert "train_00001.bin does not match its SHA-256" in capsys.readouterr().err
    assert not (tmp_path / "d.png").exists()
