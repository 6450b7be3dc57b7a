"""Fault injection (training side): SIGKILL at random moments, a full disk, corrupted checkpoints.

The kill campaign is benchmarks/fault_injection.py run with 10 kills (100 by default there); kills of
`prepare` are in the data tests. Read-only destinations are in tests/test_bad_inputs.py.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diyllm.cli import main
from diyllm.training.checkpoint import read_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY = ["--d_model=32", "--num_layers=1", "--num_heads=2", "--d_ff=64", "--context_length=16", "--batch_size=2",
        "--warmup_iters=0", "--eval_interval=0", "--eval_iters=1", "--checkpoint_interval=2", "--progress=false",
        "--device=cpu"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill campaign forks training runs (POSIX)")
def test_sigkill_at_random_moments_every_checkpoint_verifies_and_resumes_exactly(tmp_path):
    """10 kills, half of them the instant a checkpoint write begins, each followed by a resume from what
    survived: every checkpoint left loads and passes its checksum, and the completed runs end with the
    uninterrupted run's final weights bit for bit."""
    report = tmp_path / "faults.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "fault_injection.py"), "--kills", "10",
                           "--seed", "13", "--json", str(report), "--quiet"], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stats = json.loads(report.read_text())
    assert stats["failures"] == []
    assert stats["kills"] == 10 and stats["during_checkpoint_write"] >= 3
    assert stats["loadable"] == stats["checkpoints_left"] > 0
    assert stats["resumes"] >= 5 and stats["runs"] == stats["runs_exact"] >= 1
    assert stats["temp_files_after_kill"] >= 1 and stats["leftovers_after_completion"] == 0


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from diyllm.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("faults")
    (root / "c.txt").write_text("".join(f"line {i}: the quick brown fox jumps.\n" for i in range(300)))
    prepare_dataset([root / "c.txt"], root / "data", tokenizer_kind="char", val_fraction=0.1, verbose=False)
    return root / "data"


def _disk_full_after(monkeypatch, n_ok: int) -> None:
    """torch.save writes some bytes then fails with ENOSPC, from the (n_ok + 1)-th call on."""
    real_save, calls = torch.save, {"n": 0}

    def save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] <= n_ok:
            return real_save(obj, f, *a, **k)
        f.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save)


def test_disk_full_during_a_checkpoint_write_is_one_error_and_keeps_the_previous_one(data, tmp_path, capsys,
                                                                                       monkeypatch):
    run = tmp_path / "run"
    assert main(["train", f"--data_dir={data}", f"--out_dir={run}", "--max_iters=4", *TINY]) == 0
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    _disk_full_after(monkeypatch, 0)
    capsys.readouterr()
    assert main(["train", f"--data_dir={data}", f"--out_dir={run}", "--max_iters=8", "--init_from=resume",
                 *TINY]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error: ") == 1
    assert f"disk full while writing {run / 'latest.pt'}; the previous latest.pt is intact" in err
    monkeypatch.undo()
    assert read_checkpoint(run / "latest.pt")["iteration"] == 4
    assert read_checkpoint(run / "previous.pt")["iteration"] == 2
    after = {p.name: p.read_bytes() for p in run.iterdir()}
    checkpoints = lambda files: {k: v for k, v in files.items() if k.endswith(".pt")}  # noqa: E731
    assert checkpoints(after) == checkpoints(before)
    assert not [n for n in after if n.endswith(".tmp") or n == ".diyllm.lock"]


def test_disk_full_during_export_and_import_leaves_nothing(data, tmp_path, capsys, monkeypatch):
    pytest.importorskip("safetensors")
    import safetensors.torch

    run = tmp_path / "run"
    assert main(["train", f"--data_dir={data}", f"--out_dir={run}", "--max_iters=2", *TINY]) == 0
    assert main(["export", f"--ckpt={run}", f"--out={tmp_path / 'hf'}"]) == 0

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(safetensors.torch, "save_file", full)
        capsys.readouterr()
        assert main(["export", f"--ckpt={run}", f"--out={tmp_path / 'hf2'}"]) == 2
        err = capsys.readouterr().err
        assert "disk full" in err and "Traceback" not in err
    _disk_full_after(monkeypatch, 0)
    assert main(["import", f"--hf={tmp_path / 'hf'}", f"--out={tmp_path / 'imported.pt'}"]) == 2
    err = capsys.readouterr().err
    assert "disk full" in err and "imported.pt" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]  # no partial folder or file


def test_corrupted_checkpoint_is_refused_by_sample_and_resume_falls_back(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", f"--data_dir={data}", f"--out_dir={run}", "--max_iters=4", *TINY]) == 0
    raw = bytearray((run / "latest.pt").read_bytes())
    raw[len(raw) // 2:len(raw) // 2 + 400] = bytes(400)
    (run / "latest.pt").write_bytes(bytes(raw))
    capsys.readouterr()
    assert main(["sample", f"--ckpt={run / 'latest.pt'}", "--max_new_tokens=2"]) == 2
    err = capsys.readouterr().err
    assert str(run / "latest.pt") in err and "Traceback" not in err
    assert main(["train", f"--data_dir={data}", f"--out_dir={run}", "--max_iters=6", "--init_from=resume",
                 *TINY]) == 0
    out = capsys.readouterr().out
    assert "resuming from" in out and "previous.pt (iteration 2)" in out
    assert read_checkpoint(run / "latest.pt")["iteration"] == 6
