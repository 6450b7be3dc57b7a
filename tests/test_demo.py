"""`diyllm demo --quick` end to end: in tiny mode (every step, shrunken model and corpus) and for real."""

from __future__ import annotations

import json

import pytest

from diyllm.cli import main


def test_demo_quick_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DIYLLM_TINY", "1")
    assert main(["demo", "--quick"]) == 0
    out = capsys.readouterr().out
    png = tmp_path / "runs" / "demo" / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert out.count("[prompt ") == 3 and "---- samples" in out  # three samples printed
    assert "---- summary ----" in out and "ln(V) = 8.318" in out  # BPE 4096: ln(4096) = 8.318
    assert (tmp_path / "data" / "pystdlib_tiny" / "meta.json").is_file()
    events = [json.loads(line) for line in (tmp_path / "runs" / "demo" / "metrics.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "start" and events[-1]["event"] == "end"
    # a second demo reuses the prepared data and refuses to overwrite the finished run
    assert main(["demo", "--quick"]) == 2
    assert main(["demo", "--quick", "--out_dir", "runs/demo2", "--max_iters=3"]) == 0
    assert "data: reusing data/pystdlib_tiny" in capsys.readouterr().out


def test_quick_settings_are_small():
    """--quick must stay a smoke test: few steps and a capped corpus (the real timing is in the report)."""
    from diyllm.lab import demo

    iters = next(int(w.split("=")[1]) for w in demo.QUICK_OVERRIDES if w.startswith("--max_iters="))
    assert iters <= 200 and demo.QUICK_MAX_BYTES <= 2_000_000


def test_demo_rejects_bad_override(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--quick", "--max_iter=5"]) == 2
    assert "max_iters" in capsys.readouterr().err  # "did you mean 'max_iters'?"


@pytest.mark.slow
def test_demo_quick_real_settings(tmp_path, monkeypatch, capsys):
    """The actual --quick run, unshrunk (under a minute on 2 free cores): the CI smoke test of the README's
    main job. The model must learn: the final val loss ends far below a uniform guess (ln 4096 = 8.3)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DIYLLM_TINY", raising=False)
    assert main(["demo", "--quick"]) == 0
    assert "---- summary ----" in capsys.readouterr().out
    assert (tmp_path / "runs" / "demo" / "loss.png").stat().st_size > 5000
    events = [json.loads(line) for line in (tmp_path / "runs" / "demo" / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in events if e["event"] == "eval"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 2.0 and evals[-1]["val_loss"] < 6.0
