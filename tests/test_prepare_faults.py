"""Faults injected into a real `diyllm prepare` process: SIGKILL mid-run and Ctrl-C (SIGINT to the whole
process group, as a terminal sends it, workers included). The rerun must give the byte-identical dataset,
keep the shards finished before the kill, and leave no temp files behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from diyllm.data import prepare_dataset
from diyllm.data.outdir import VERIFIED_NAME

WORDS = ["the", "a", "fox", "dog", "runs", "jumps", "over", "under", "lazy", "quick", "brown", "river", "stone",
         "tree", "cloud", "sings"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """~2.5 MB of JSONL and a small BPE tokenizer."""
    root = tmp_path_factory.mktemp("faults")
    rng = np.random.default_rng(0)
    words = np.array(WORDS)[rng.integers(0, len(WORDS), size=500_000)]
    lengths = rng.integers(20, 400, size=2600)
    docs, pos = [], 0
    for n in lengths:
        docs.append(" ".join(words[pos : pos + n]) + f" {pos}.")
        pos = (pos + n) % (len(words) - 400)
    path = root / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (root / "small.txt").write_text(" ".join(docs[:300]))
    prepare_dataset(root / "small.txt", root / "tok", vocab_size=400, verbose=False)
    return path, root / "tok" / "tokenizer.json"


def _cmd(src, tok, out):
    return [sys.executable, "-m", "diyllm", "prepare", str(src), "--out", str(out), "--tokenizer", str(tok),
            "--shard_tokens", "20000", "--workers", "2", "--job_chars", "50000", "--quiet"]


def _files(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name not in ("meta.json", VERIFIED_NAME)}


def _wait_for(predicate, proc, timeout=120.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_sigkill_then_rerun_gives_the_identical_dataset(corpus, tmp_path):
    src, tok = corpus
    prepare_dataset(src, tmp_path / "clean", tokenizer=tok, shard_tokens=20000, num_workers=1, verbose=False)
    clean = _files(tmp_path / "clean")
    assert len([n for n in clean if n.startswith("train_")]) > 10
    out = tmp_path / "out"
    kept: dict[str, int] = {}
    kills = 0
    for wanted in (1, 4):  # kill when this many more shards are finished, then let the rerun continue
        proc = subprocess.Popen(_cmd(src, tok, out))
        target = wanted + len(kept)
        try:
            caught = _wait_for(lambda t=target: len(list(out.glob("train_*.bin"))) >= t, proc)
        finally:
            proc.kill()
            proc.wait()
        kills += caught
        progress = out / ".diyllm-prepare.json"
        if progress.exists():  # shards the checkpoint records as finished must survive untouched
            state = json.loads(progress.read_text())["splits"]
            kept = {s["file"]: (out / s["file"]).stat().st_mtime_ns for sp in state.values() for s in sp["finished"]}
    assert kills >= 1 and not (out / "meta.json").exists()
    r = subprocess.run(_cmd(src, tok, out), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert _files(out) == clean
    assert "starting again" not in r.stderr, r.stderr
    assert all((out / n).stat().st_mtime_ns == t for n, t in kept.items()) and kept
    hidden = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert hidden == [VERIFIED_NAME]  # the record of verified checksums; no temp, partial or lock file
    assert [p.name for p in tmp_path.iterdir()] and not list(tmp_path.glob(".*"))


def test_ctrl_c_is_one_line_and_the_rerun_continues(corpus, tmp_path):
    src, tok = corpus
    out = tmp_path / "out"
    proc = subprocess.Popen(_cmd(src, tok, out), stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        started = _wait_for(lambda: len(list(out.glob("train_*.bin"))) >= 2, proc)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal does: the parent and every worker get it
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert started
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert err.strip().splitlines() == [
        f"interrupted: the finished shards in {out} are kept; run the same command again to continue"]
    r = subprocess.run(_cmd(src, tok, out), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "meta.json").read_text())["train_tokens"] > 0
