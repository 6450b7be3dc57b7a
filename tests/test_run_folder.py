"""Run-folder safety: refusal to overwrite, lock, stale temps, checksums, previous.pt fallback, carried tokenizer."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diyllm.errors import UserError
from diyllm.integrity import CheckpointCorrupted, seal, state_digest, verify
from diyllm.training.checkpoint import read_checkpoint
from diyllm.training.config import TrainConfig
from diyllm.training.run_folder import history_names, write_with_history
from diyllm.training.trainer import train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def char_data(tmp_path_factory) -> Path:
    from diyllm.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("rf")
    corpus = root / "corpus.txt"
    corpus.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(600)))
    prepare_dataset([corpus], root / "data", tokenizer_kind="char", val_fraction=0.1, verbose=False)
    return root / "data"


def cfg(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data_dir=str(data), out_dir=str(out), d_model=32, num_layers=1, num_heads=2, d_ff=64,
                context_length=16, batch_size=4, max_iters=6, warmup_iters=0, eval_interval=3, eval_iters=1,
                checkpoint_interval=2, progress=False, log_interval=1, device="cpu", dtype="float32")
    return TrainConfig(**{**base, **kw}).validate()


# ---- integrity ------------------------------------------------------------------------------------------


def test_digest_changes_with_any_value_and_seal_verifies():
    state = {"model": {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.zeros(0)},
             "iteration": 3, "rng": {"python": (3, (1, 2), None)}, "x": 1.5, "bf": torch.ones(2, dtype=torch.bfloat16)}
    seal(state)
    assert verify(state, "ck.pt") is True
    for change in (lambda s: s["model"]["w"].__setitem__((0, 0), 1e-7), lambda s: s.__setitem__("iteration", 4),
                   lambda s: s.__setitem__("x", 1.5000001), lambda s: s["bf"].__setitem__(0, 2.0)):
        copy = {**state, "model": {k: v.clone() for k, v in state["model"].items()}, "bf": state["bf"].clone()}
        change(copy)
        with pytest.raises(CheckpointCorrupted, match=r"ck\.pt is corrupted"):
            verify(copy, "ck.pt")
    assert state_digest({"a": 1}) != state_digest({"a": 1.0}) != state_digest({"a": "1"})
    assert verify({"model": {}}, "old.pt") is False  # a checkpoint from before checksums loads unverified


def test_flipped_bytes_in_a_checkpoint_file_are_refused(tmp_path, tiny_config):
    from diyllm.model import DIYForCausalLM
    from diyllm.training.checkpoint import save_checkpoint

    path = tmp_path / "latest.pt"
    save_checkpoint(DIYForCausalLM(tiny_config), None, 5, path)
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 400] = bytes(b ^ 0x5A for b in data[mid:mid + 400])
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=str(path)):
        read_checkpoint(path)


def test_history_rotation_keeps_k_files(tmp_path):
    path = tmp_path / "latest.pt"
    for i in range(4):
        with write_with_history(path, keep=3) as f:
            f.write(f"gen{i}".encode())
    assert history_names(3) == ["previous.pt", "previous.2.pt"] and history_names(1) == []
    got = {p.name: p.read_text() for p in tmp_path.iterdir()}
    assert got == {"latest.pt": "gen3", "previous.pt": "gen2", "previous.2.pt": "gen1"}
    with pytest.raises(OSError), write_with_history(path, keep=3) as f:
        f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == got  # nothing rotated, no temp left


# ---- the trainer's run-folder rules ---------------------------------------------------------------------


def test_fresh_run_refuses_a_run_folder_and_user_files(char_data, tmp_path):
    out = tmp_path / "run"
    train(cfg(char_data, out))
    before = (out / "best.pt").read_bytes(), (out / "metrics.jsonl").read_text()
    with pytest.raises(UserError, match=r"already holds a previous run .*--init_from=resume.*--out_dir.*--overwrite"):
        train(cfg(char_data, out))
    assert ((out / "best.pt").read_bytes(), (out / "metrics.jsonl").read_text()) == before
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "config.json", "latest.pt", "metrics.jsonl",
                                                     "previous.pt", "tokenizer.json"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match=r"files diyllm did not write \(notes\.txt\)"):
        train(cfg(char_data, mine))
    train(cfg(char_data, mine, overwrite=True))  # --overwrite replaces only a run's files
    assert (mine / "notes.txt").read_text() == "keep me" and (mine / "latest.pt").exists()
    r = train(cfg(char_data, out, overwrite=True, max_iters=2))
    assert r.iterations == 2 and read_checkpoint(out / "latest.pt")["iteration"] == 2


def test_failed_setup_leaves_no_new_folder(char_data, tmp_path):
    out = tmp_path / "new"
    with pytest.raises(UserError, match="smaller than the data"):
        train(cfg(char_data, out, vocab_size=3))
    assert not out.exists()


def test_corrupted_latest_falls_back_to_previous_with_a_warning(char_data, tmp_path, capsys):
    out = tmp_path / "run"
    train(cfg(char_data, out, max_iters=4, eval_interval=0))
    assert read_checkpoint(out / "previous.pt")["iteration"] == 2
    data = bytearray((out / "latest.pt").read_bytes())
    data[len(data) // 2:len(data) // 2 + 400] = b"\0" * 400
    (out / "latest.pt").write_bytes(bytes(data))
    capsys.readouterr()
    r = train(cfg(char_data, out, max_iters=6, eval_interval=0, init_from="resume"))
    text = capsys.readouterr().out
    assert "latest.pt" in text and "resuming from" in text and "previous.pt (iteration 2)" in text
    assert r.iterations == 6
    # both damaged: a clear error naming each file
    for name in ("latest.pt", "previous.pt"):
        (out / name).write_bytes(b"garbage")
    with pytest.raises(UserError, match=r"no usable checkpoint(.|\n)*latest\.pt(.|\n)*previous\.pt"):
        train(cfg(char_data, out, max_iters=8, init_from="resume"))


def test_stale_temps_removed_and_tokenizer_carried_on_resume(char_data, tmp_path, capsys):
    out = tmp_path / "run"
    train(cfg(char_data, out, max_iters=4))
    (out / ".latest.pt.x1y2z3.tmp").write_bytes(b"\0" * 1000)  # what a write killed half-way leaves
    (out / "loss.png").write_bytes(b"png")  # not ours to remove
    bare = tmp_path / "bare"  # the same data without tokenizer.json
    bare.mkdir()
    for path in char_data.iterdir():
        if path.is_file() and path.name != "tokenizer.json":
            (bare / path.name).write_bytes(path.read_bytes())
    capsys.readouterr()
    train(cfg(bare, out, max_iters=6, init_from="resume"))
    assert "removed 1 temp file" in capsys.readouterr().out
    assert not (out / ".latest.pt.x1y2z3.tmp").exists() and (out / "loss.png").exists()
    assert read_checkpoint(out / "latest.pt")["tokenizer"] == (char_data / "tokenizer.json").read_text()


def test_resume_schedule_messages(char_data, tmp_path, capsys):
    out = tmp_path / "run"
    train(cfg(char_data, out, max_iters=4, eval_interval=0))
    capsys.readouterr()
    train(cfg(char_data, out, max_iters=6, eval_interval=0, init_from="resume"))
    text = capsys.readouterr().out
    assert "max_iters changed from 4 to 6" in text and "decays to min_lr at iteration 6 (was 4)" in text
    with pytest.raises(UserError, match=r"iteration 6, beyond max_iters=5"):
        train(cfg(char_data, out, max_iters=5, init_from="resume"))


@pytest.mark.parametrize("key,value", [("seed", -1), ("init_std", -1.0), ("rope_theta", 0.0), ("norm_eps", -1.0),
                                       ("keep_checkpoints", 0)])
def test_config_values_that_would_train_nan_are_refused(key, value, tmp_path):
    with pytest.raises(UserError, match=rf"{key}={value}"):
        TrainConfig(**{key: value}).validate()


def test_second_training_on_the_same_folder_is_refused_while_the_first_runs(char_data, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "diyllm", "train", f"--data_dir={char_data}", f"--out_dir={out}",
           "--max_iters=100000", "--eval_interval=0", "--checkpoint_interval=0", "--d_model=32", "--num_layers=1",
           "--num_heads=2", "--d_ff=64", "--context_length=16", "--batch_size=2", "--progress=false",
           "--device=cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.time() + 60
        while not (out / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.1)
        second = subprocess.run([*cmd, "--init_from=resume"], cwd=REPO, capture_output=True, text=True, env=env,
                                timeout=120)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert f"in use by PID {first.pid}" in second.stderr and "diyllm train" in second.stderr
        assert json.loads((out / ".diyllm.lock").read_text())["pid"] == first.pid
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=60)
    assert first.returncode == 143 and not (out / ".diyllm.lock").exists()
