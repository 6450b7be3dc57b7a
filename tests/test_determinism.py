"""Same seed, same result: at the shipped CPU recipe's size and on torch's default thread count.

Every test here trains the real `shakespeare_char_cpu` shape (4 layers x 128, context 64, batch 12, a
65-character vocabulary) with `num_threads=0`, i.e. as many threads as torch picks (2 on the CI machine).
Small tensors never take torch's multi-threaded paths, and neither does one thread, so a test at either
would pass while real runs drift apart (as they did through the embedding's backward). Compared: the
final weights, every optimizer tensor, and the logged loss of every iteration, exactly.
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from diyllm.training.checkpoint import read_checkpoint
from diyllm.training.config import load_config
from diyllm.training.metrics import read_metrics
from diyllm.training.trainer import train

ALPHABET = string.ascii_letters + " \n.,;:!?'-&$3"  # 65 characters, as in tinyshakespeare


@pytest.fixture(autouse=True)
def _default_threads():
    """Undo any earlier test's thread pinning: these tests are about the default thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(os.cpu_count() or 1, 4)))
    yield
    torch.set_num_threads(before)


def write_char_dataset(path: Path, n_chars: int = 60_000) -> Path:
    """A prepared char folder (train.bin, val.bin, meta.json, tokenizer.json) over a 65-char alphabet."""
    from diyllm.tokenizers import CharTokenizer

    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list(ALPHABET[:52]), size=rng.integers(2, 8))) for _ in range(300)]
    pieces = []
    while sum(map(len, pieces)) < n_chars:
        pieces.append(words[rng.integers(len(words))] + ALPHABET[52 + rng.integers(13)])
    text = ALPHABET + "".join(pieces)  # every character occurs at least once
    tok = CharTokenizer.train(text)
    assert tok.vocab_size == 65
    ids = np.array(tok.encode(text), dtype=np.uint16)
    cut = int(0.9 * len(ids))
    path.mkdir(parents=True)
    ids[:cut].tofile(path / "train.bin")
    ids[cut:].tofile(path / "val.bin")
    tok.save(path / "tokenizer.json")
    (path / "meta.json").write_text(json.dumps({"vocab_size": 65, "dtype": "uint16", "tokenizer_kind": "char"}))
    return path


@pytest.fixture(scope="module")
def char_data(tmp_path_factory) -> Path:
    return write_char_dataset(tmp_path_factory.mktemp("determinism") / "chars")


def recipe(data, out, iters: int, **overrides):
    """shakespeare_char_cpu as shipped, shortened to `iters` iterations (the schedule spans `iters`, so a
    run stopped halfway and resumed follows the same learning rates), evaluating every quarter."""
    opts = dict(data_dir=data, out_dir=out, max_iters=iters, warmup_iters=iters // 4, lr_decay_iters=iters,
                eval_interval=iters // 4, eval_iters=2, checkpoint_interval=iters // 2, log_interval=1,
                progress="false", num_threads=0)
    opts.update(overrides)
    return load_config("shakespeare_char_cpu", [f"--{k}={v}" for k, v in opts.items()])


def run_full_and_resumed(data, tmp_path, iters: int, twice: bool = False, **overrides) -> None:
    """Train `iters` iterations (twice if asked), and `iters // 2` + resume to `iters`: all must agree
    exactly. Any thread-order drift shows in the resumed run too, so the variants skip the second run."""
    train(recipe(data, tmp_path / "a", iters, **overrides))
    if twice:
        train(recipe(data, tmp_path / "b", iters, **overrides))
        assert_same_run(tmp_path / "a", tmp_path / "b", iters)
    train(recipe(data, tmp_path / "r", iters, **{**overrides, "max_iters": iters // 2}))
    train(recipe(data, tmp_path / "r", iters, **{**overrides, "init_from": "resume"}))
    assert_same_run(tmp_path / "a", tmp_path / "r", iters)


def assert_same_run(run_a: Path, run_b: Path, iters: int) -> None:
    a, b = read_checkpoint(run_a / "latest.pt"), read_checkpoint(run_b / "latest.pt")
    assert a["iteration"] == b["iteration"] == iters
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), f"weights differ: {key}"
    assert_equal_nested(a["optimizer"], b["optimizer"], "optimizer")
    assert a["best_val_loss"] == b["best_val_loss"]
    la, lb = (train_losses(r) for r in (run_a, run_b))
    assert sorted(la) == list(range(1, iters + 1))
    assert la == lb  # every iteration's loss, exactly


def assert_equal_nested(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_equal_nested(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_nested(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def train_losses(run: Path) -> dict[int, float]:
    return {r["iter"]: r["loss"] for r in read_metrics(run) if r["event"] == "train"}


def test_the_default_thread_count_is_really_parallel():
    """Guards the point of this file: on a machine with 2+ cores the runs below use 2+ threads."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("a one-core machine has no thread-order nondeterminism to test")
    assert torch.get_num_threads() >= 2


def test_recipe_runs_are_identical_and_resume_exactly(char_data, tmp_path):
    run_full_and_resumed(char_data, tmp_path, 40, twice=True)
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert (cfg["num_layers"], cfg["d_model"], cfg["context_length"], cfg["batch_size"]) == (4, 128, 64, 12)


@pytest.mark.parametrize("choice", ["onednn", "blas"])
def test_on_each_cpu_matmul_backend(char_data, tmp_path, choice):
    """Both of model/cpu_matmul.py's kernels, whichever this CPU's `auto` picks: a host that picks the
    other one (a Zen 5 or an AVX2 machine) must resume exactly too."""
    from diyllm.model import cpu_matmul

    if choice == "onednn" and not cpu_matmul.onednn_available():
        pytest.skip("this torch build cannot run oneDNN's matmul")
    with cpu_matmul.cpu_matmul_choice(choice):
        assert cpu_matmul.onednn_enabled() is (choice == "onednn")
        run_full_and_resumed(char_data, tmp_path, 20, twice=True)


def test_with_dropout(char_data, tmp_path):
    run_full_and_resumed(char_data, tmp_path, 20, dropout=0.1)


def test_with_gradient_accumulation(char_data, tmp_path):
    run_full_and_resumed(char_data, tmp_path, 20, batch_size=6, gradient_accumulation_steps=2)


def test_with_the_jsonl_source(tmp_path):
    from diyllm.tokenizers import CharTokenizer

    rng = np.random.default_rng(1)
    docs = ["".join(rng.choice(list(ALPHABET), size=rng.integers(40, 400))) for _ in range(300)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    CharTokenizer.train(ALPHABET).save(tmp_path / "tokenizer.json")
    run_full_and_resumed(tmp_path / "docs.jsonl", tmp_path, 20, data_format="jsonl",
                          tokenizer_path=tmp_path / "tokenizer.json")


def test_with_the_sft_source(tmp_path):
    from diyllm.data.chat_template import add_chat_tokens
    from diyllm.tokenizers import BPETokenizer

    tok = BPETokenizer({i: bytes([i]) for i in range(256)}, [], special_tokens=["<|endoftext|>"])
    add_chat_tokens(tok)
    tok.save(tmp_path / "tokenizer.json")
    rng = np.random.default_rng(2)

    def chat() -> str:
        q, a = ("".join(rng.choice(list(ALPHABET[:52]), size=rng.integers(3, 20))) for _ in range(2))
        return json.dumps({"conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})

    (tmp_path / "train.jsonl").write_text("".join(chat() + "\n" for _ in range(200)))
    (tmp_path / "val.jsonl").write_text("".join(chat() + "\n" for _ in range(20)))
    run_full_and_resumed(tmp_path / "train.jsonl", tmp_path, 20, data_format="sft",
                          val_data=tmp_path / "val.jsonl", tokenizer_path=tmp_path / "tokenizer.json")


def test_deterministic_key_turns_on_torch_deterministic_mode(char_data, tmp_path, monkeypatch):
    """deterministic=true (for CUDA) switches torch's deterministic algorithms on for the run, sets cuBLAS's
    workspace, and puts the process-wide switch back afterwards."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    calls = []
    real = torch.use_deterministic_algorithms
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda mode, **kw: (calls.append(mode), real(mode)))
    seen = {}

    def during(*args, **kwargs):
        seen["on"] = torch.are_deterministic_algorithms_enabled()
        seen["env"] = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
        return {"train_loss": 1.0, "val_loss": 1.0, "val_bpb": None}

    from diyllm.training.trainer import Trainer

    monkeypatch.setattr(Trainer, "evaluate", during)
    train(recipe(char_data, tmp_path, 4, deterministic="true"))
    assert seen == {"on": True, "env": ":4096:8"}
    assert calls == [True, False] and not torch.are_deterministic_algorithms_enabled()


# ---- gloo DDP, 2 ranks ------------------------------------------------------------------------------------


def _ddp_worker(rank: int, world: int, port: int, data: str, root: str) -> None:
    from diyllm.training.distributed import finish_worker

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        root_ = Path(root)
        accum = {"gradient_accumulation_steps": world}  # one micro-step per rank, as a single process of 12
        train(recipe(data, root_ / "a", 20, **accum))
        train(recipe(data, root_ / "r", 20, **accum, max_iters=10))
        train(recipe(data, root_ / "r", 20, **accum, init_from="resume"))
    finally:
        dist.destroy_process_group()
    finish_worker(0)  # skip interpreter teardown, which can abort a gloo worker (see finish_worker)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")
def test_with_gloo_ddp_two_ranks(char_data, tmp_path):
    from test_ddp import free_port

    mp.spawn(_ddp_worker, args=(2, free_port(), str(char_data), str(tmp_path)), nprocs=2, join=True)
    assert_same_run(tmp_path / "a", tmp_path / "r", 20)
    ckpt = read_checkpoint(tmp_path / "r" / "latest.pt")
    assert ckpt["trainer"]["world_size"] == 2 and len(ckpt["rank_states"]) == 2
