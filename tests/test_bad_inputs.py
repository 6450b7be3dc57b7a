"""Bad inputs through the real CLI: one `error:` line naming the file/key, exit code 2, no traceback, no
partial output, the user's files untouched.

Most cases run in-process through `diyllm.cli.main` (what `python -m diyllm` calls; a subprocess costs
seconds of imports on a busy CI machine); a few representative ones run in a real subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from diyllm.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = ["--d_model=32", "--num_layers=1", "--num_heads=2", "--d_ff=64", "--context_length=16", "--batch_size=2",
        "--max_iters=2", "--warmup_iters=0", "--eval_interval=0", "--eval_iters=1", "--progress=false",
        "--device=cpu"]
SFT_TINY = [a for a in TINY if not a.startswith("--context_length")]  # sft takes the shape from the checkpoint


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A char dataset, a trained char run, a byte-BPE checkpoint, and JSONL files good and bad."""
    from diyllm.data.prepare import prepare_dataset
    from diyllm.model import DIYConfig, DIYForCausalLM
    from diyllm.tokenizers import BPETokenizer
    from diyllm.training.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("bad")
    (root / "corpus.txt").write_text("".join(f"line {i}: the quick brown fox jumps.\n" for i in range(400)))
    prepare_dataset([root / "corpus.txt"], root / "data", tokenizer_kind="char", val_fraction=0.1, verbose=False)
    assert main(["train", f"--data_dir={root / 'data'}", f"--out_dir={root / 'run'}", *TINY]) == 0
    tok = BPETokenizer({i: bytes([i]) for i in range(256)}, [], special_tokens=["<|endoftext|>"])
    tok.save(root / "bpe.json")
    model = DIYForCausalLM(DIYConfig(vocab_size=257, context_length=64, d_model=32, num_layers=1, num_heads=2))
    save_checkpoint(model, None, 0, root / "bpe.pt", model_config=model.config.to_dict(),
                    tokenizer=(root / "bpe.json").read_text())
    good = "".join(json.dumps({"text": f"document {i} with some words"}) + "\n" for i in range(60))
    (root / "non_utf8.jsonl").write_bytes(good.encode() + b'{"text": "caf\xe9"}\n')
    (root / "number.jsonl").write_text(good + '{"text": 123}\n')
    conv = json.dumps({"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    (root / "conv.jsonl").write_text((conv + "\n") * 20)
    (root / "conv_non_utf8.jsonl").write_bytes(((conv + "\n") * 20).encode() + b'{"conversations": "\xff\xfe"}\n')
    (root / "euro.txt").write_text("line 1: the fox.\nline 2: costs 5 \u20ac.\n")
    return {"root": root, "data": root / "data", "run": root / "run", "bpe": root / "bpe.pt",
            "non_utf8": root / "non_utf8.jsonl", "number": root / "number.jsonl",
            "conv_non_utf8": root / "conv_non_utf8.jsonl", "conv": root / "conv.jsonl", "euro": root / "euro.txt",
            **damaged_datasets(root, root / "data")}


def damaged_datasets(root: Path, data: Path) -> dict[str, Path]:
    """Copies of the prepared dataset, each damaged one way (what `open_dataset` must catch for the trainer)."""
    from diyllm.data.checksums import record_verified
    from diyllm.data.dataset import checksummed_shards

    meta = json.loads((data / "meta.json").read_text())
    shard = data / meta["shards"]["train"][0]["file"]
    assert shard.name == "train_00000.bin" and meta["dtype"] == "uint16"

    def meta_with(**changes):
        return lambda d: (d / "meta.json").write_text(json.dumps({**meta, **changes}))

    def flip(d):  # one token id changed, the size kept: only the checksum sees it
        with open(d / shard.name, "r+b") as f:
            f.seek(10)
            low = f.read(1)[0]
            f.seek(10)
            f.write(bytes([low ^ 1]))

    damages = {
        "dtype_float32": meta_with(dtype="float32"),
        "dtype_int64": meta_with(dtype="int64"),
        "meta_list": lambda d: (d / "meta.json").write_text("[1, 2]"),
        "meta_vocab": meta_with(vocab_size=5),
        "truncated": lambda d: os.truncate(d / shard.name, shard.stat().st_size // 4 * 2),
        "odd_size": lambda d: os.truncate(d / shard.name, shard.stat().st_size - 1),
        "val_empty": meta_with(val_tokens=0, shards={"train": meta["shards"]["train"], "val": []}),
        "flipped": flip,
    }
    out = {}
    for name, damage in damages.items():
        d = out[f"data_{name}"] = root / f"data_{name}"
        shutil.copytree(data, d)
        record_verified(d, checksummed_shards(d, meta))  # as verified by an earlier run of this copy
        damage(d)
    return out


def _train_on(key: str):
    return lambda w, o: ["train", f"--data_dir={w[key]}", f"--out_dir={o}", *TINY]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_error(rc: int, err: str, *names: str, code: int = 2) -> None:
    assert rc == code, err
    assert "Traceback" not in err, err
    assert len([line for line in err.splitlines() if line.startswith("error: ")]) == 1, err
    for name in names:
        assert name in err, (name, err)


# (case id, argv from the world and a fresh out folder, strings the error must contain)
CASES = [
    ("jsonl-non-utf8", lambda w, o: ["train", "--data_format=jsonl", f"--data_dir={w['non_utf8']}",
                                     f"--tokenizer_path={w['data'] / 'tokenizer.json'}", f"--out_dir={o}", *TINY],
     ["non_utf8.jsonl:61", "not UTF-8", "byte offset"]),
    ("jsonl-non-utf8-streaming", lambda w, o: ["train", "--data_format=jsonl", "--streaming=true",
                                               f"--data_dir={w['non_utf8']}", f"--out_dir={o}",
                                               f"--tokenizer_path={w['data'] / 'tokenizer.json'}", *TINY],
     ["non_utf8.jsonl:61", "not UTF-8"]),
    ("jsonl-non-utf8-streaming-worker", lambda w, o: ["train", "--data_format=jsonl", "--streaming=true",
                                                      "--num_workers=1", f"--data_dir={w['non_utf8']}",
                                                      f"--out_dir={o}",
                                                      f"--tokenizer_path={w['data'] / 'tokenizer.json'}", *TINY],
     ["non_utf8.jsonl:61", "not UTF-8"]),
    ("jsonl-text-not-a-string", lambda w, o: ["train", "--data_format=jsonl", f"--data_dir={w['number']}",
                                              f"--tokenizer_path={w['data'] / 'tokenizer.json'}", f"--out_dir={o}",
                                              *TINY],
     ["number.jsonl:61", '"text" must be a string']),
    ("sft-non-utf8", lambda w, o: ["sft", f"--data_dir={w['conv_non_utf8']}", f"--val_data={w['conv_non_utf8']}",
                                   f"--init_from={w['bpe']}", f"--out_dir={o}", *SFT_TINY],
     ["conv_non_utf8.jsonl:21", "not UTF-8"]),
    ("show-sft-sample-non-utf8", lambda w, o: ["show-sft-sample", str(w["conv_non_utf8"]), "--index=20"],
     ["conv_non_utf8.jsonl:21", "not UTF-8"]),
    ("seed", lambda w, o: ["train", f"--data_dir={w['data']}", f"--out_dir={o}", "--seed=-1", *TINY], ["seed=-1"]),
    ("init_std", lambda w, o: ["train", f"--data_dir={w['data']}", f"--out_dir={o}", "--init_std=-1", *TINY],
     ["init_std=-1"]),
    ("rope_theta", lambda w, o: ["train", f"--data_dir={w['data']}", f"--out_dir={o}", "--rope_theta=0", *TINY],
     ["rope_theta=0"]),
    ("norm_eps", lambda w, o: ["train", f"--data_dir={w['data']}", f"--out_dir={o}", "--norm_eps=-1", *TINY],
     ["norm_eps=-1"]),
    ("vocab-below-data", lambda w, o: ["train", f"--data_dir={w['data']}", f"--out_dir={o}", "--vocab_size=3",
                                       *TINY], ["vocab_size=3", "smaller than the data"]),
    ("sample-char-outside-vocab", lambda w, o: ["sample", f"--ckpt={w['run']}", "--prompt=€uro", "--max_new_tokens=2"],
     ["--prompt", "'€'", "not in the vocabulary"]),
    ("sample-prompt-longer-than-context", lambda w, o: ["sample", f"--ckpt={w['run']}", "--prompt=" + "the " * 10,
                                                        "--context=stop", "--max_new_tokens=2"],
     ["40 tokens", "context of 16", "--context slide"]),
    ("chat-char-checkpoint", lambda w, o: ["chat", f"--ckpt={w['run']}", "--prompt=hi"], ["BPE tokenizer"]),
    ("lr-find-init-from-resume", lambda w, o: ["lr-find", "shakespeare_char_cpu", f"--data_dir={w['data']}",
                                               "--init_from=resume", f"--out={o / 'lr.png'}", *TINY[:5]],
     ["init_from=resume", "--init_from=RUN_DIR"]),
    ("resume-below-iteration", lambda w, o: ["train", f"--data_dir={w['data']}", f"--out_dir={w['run']}",
                                             "--init_from=resume", *TINY[:-6], "--max_iters=1", "--progress=false",
                                             "--device=cpu", "--warmup_iters=0", "--eval_interval=0"],
     ["iteration 2, beyond max_iters=1"]),
    # a dataset damaged after prepare: caught when training opens it, before any run file is written
    ("meta-wrong-dtype", _train_on("data_dtype_float32"), ["data_dtype_float32/meta.json", "dtype 'float32'"]),
    ("meta-dtype-int64", _train_on("data_dtype_int64"), ["data_dtype_int64/train_00000.bin", "int64"]),
    ("meta-json-list", _train_on("data_meta_list"), ["data_meta_list/meta.json", "JSON list"]),
    ("meta-vocab-below-data", _train_on("data_meta_vocab"), ["data_meta_vocab/train_00000.bin",
                                                             "outside the vocabulary of 5"]),
    ("shard-truncated", _train_on("data_truncated"), ["data_truncated/train_00000.bin", "but meta.json says"]),
    ("shard-odd-byte-count", _train_on("data_odd_size"), ["data_odd_size/train_00000.bin", "not a multiple of 2"]),
    ("val-split-empty", _train_on("data_val_empty"), ["the val split of", "data_val_empty is empty"]),
    ("shard-damaged-same-size", _train_on("data_flipped"), ["data_flipped/train_00000.bin",
                                                            "does not match its SHA-256", "diyllm prepare"]),
    ("prepare-char-outside-given-tokenizer", lambda w, o: ["prepare", str(w["euro"]), "--out", str(o), "--tokenizer",
                                                           str(w["data"] / "tokenizer.json"), "--quiet"],
     ["euro.txt", "'€'", "not in the vocabulary", "omit --tokenizer"]),
    # prepare never writes over what is there (the snapshot below also shows nothing renamed aside)
    ("prepare-out-is-a-file", lambda w, o: ["prepare", str(w["root"] / "corpus.txt"), "--out", str(w["euro"]),
                                            "--tokenizer_kind=char", "--quiet"], ["euro.txt is a file"]),
    ("prepare-out-inside-the-input", lambda w, o: ["prepare", str(w["root"]), "--out", str(w["root"] / "ds"),
                                                   "--tokenizer_kind=char", "--quiet"], ["inside the input folder"]),
    ("prepare-out-holds-the-input", lambda w, o: ["prepare", str(w["root"] / "corpus.txt"), "--out", str(w["root"]),
                                                  "--tokenizer_kind=char", "--overwrite", "--quiet"],
     ["contains the input file", "corpus.txt"]),
    ("fresh-run-in-a-run-folder", lambda w, o: ["train", f"--data_dir={w['data']}", f"--out_dir={w['run']}", *TINY],
     ["already holds a previous run", "--init_from=resume", "--out_dir", "--overwrite"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_error(case, world, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, argv, must = case
    out = tmp_path / "out"
    before = snapshot(world["root"])
    capsys.readouterr()
    rc = main(argv(world, out))
    assert_one_error(rc, capsys.readouterr().err, *must)
    assert not out.exists(), sorted(os.listdir(out))  # no partial output
    assert snapshot(world["root"]) == before  # the user's files untouched
    assert sorted(os.listdir(tmp_path)) == ["out"] * 0  # nothing written in the working folder either


def test_diagnose_accepts_a_run_folder(world, tmp_path, capsys):
    assert main(["diagnose", f"--ckpt={world['run']}", f"--out={tmp_path / 'd.png'}", "--batch_size=2"]) == 0
    assert (tmp_path / "d.png").exists() and (tmp_path / "d.json").exists()


def test_sample_many_samples_are_generated_in_batches(world, capsys, monkeypatch):
    import importlib

    from diyllm.generation import cli as sample_cli

    sizes = []
    real = sample_cli.__dict__.get("generate")
    gen_module = importlib.import_module("diyllm.generation.generate")
    original = gen_module.generate

    def counting(model, prompts, *a, **k):
        sizes.append(len(prompts))
        return original(model, prompts, *a, **k)

    monkeypatch.setattr(gen_module, "generate", counting)
    monkeypatch.setattr(sample_cli, "SAMPLE_BATCH", 4)
    assert real is None  # imported inside run(), so patching the module is enough
    assert main(["sample", f"--ckpt={world['run']}", "--num_samples=10", "--max_new_tokens=2", "--seed=1"]) == 0
    assert sizes == [4, 4, 2] and "--- sample 10/10 ---" in capsys.readouterr().out


# ---- a few in real subprocesses (what a user sees, exit code included) ------------------------------


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "diyllm", *args], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=300)


def _read_only_parent() -> Path | None:
    """A folder nobody (not even root, as in CI) may create entries in: /sys on Linux."""
    probe = Path("/sys")
    if not probe.is_dir():
        return None
    try:
        (probe / "diyllm_probe").mkdir()
    except OSError:
        return probe
    (probe / "diyllm_probe").rmdir()
    return None


def test_subprocess_errors(world, tmp_path):
    p = _cli("train", "--data_format=jsonl", f"--data_dir={world['non_utf8']}",
             f"--tokenizer_path={world['data'] / 'tokenizer.json'}", f"--out_dir={tmp_path / 'o'}", *TINY, cwd=tmp_path)
    assert_one_error(p.returncode, p.stderr, "non_utf8.jsonl:61")
    p = _cli("sample", f"--ckpt={world['run']}", "--prompt=€", cwd=tmp_path)
    assert_one_error(p.returncode, p.stderr, "not in the vocabulary")
    assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.parametrize("command", ["train", "prepare", "sft", "export", "lr-find", "plot", "diagnose"])
def test_read_only_destination_is_one_clear_error(command, world, tmp_path, capsys):
    ro = _read_only_parent()
    if ro is None:
        pytest.skip("no folder here that is read-only even for this user")
    dest = ro / "diyllm_run"
    argv = {
        "train": ["train", f"--data_dir={world['data']}", f"--out_dir={dest}", *TINY],
        "prepare": ["prepare", str(world["root"] / "corpus.txt"), "--out", str(dest), "--tokenizer_kind=char",
                    "--quiet"],
        "sft": ["sft", f"--data_dir={world['conv']}", f"--init_from={world['bpe']}", f"--out_dir={dest}",
                *SFT_TINY],
        "export": ["export", f"--ckpt={world['run']}", f"--out={dest}"],
        "lr-find": ["lr-find", "shakespeare_char_cpu", f"--data_dir={world['data']}", f"--out={ro / 'lr.png'}",
                    "--num_iters=3", *TINY[:5], "--progress=false"],
        "plot": ["plot", str(world["run"]), f"--out={ro / 'loss.png'}"],
        "diagnose": ["diagnose", f"--ckpt={world['run']}", f"--out={ro / 'd.png'}", "--batch_size=2"],
    }[command]
    if command == "export":
        pytest.importorskip("safetensors")
    rc = main(argv)
    assert_one_error(rc, capsys.readouterr().err, str(ro))


def test_lr_find_honours_init_from_a_run_folder(world, tmp_path, capsys):
    assert main(["lr-find", "shakespeare_char_cpu", f"--data_dir={world['data']}", f"--init_from={world['run']}",
                 "--num_iters=3", f"--out={tmp_path / 'lr.png'}", *TINY[:6], "--progress=false"]) == 0
    assert f"starting from the weights of {world['run']}" in capsys.readouterr().out
    assert (tmp_path / "lr.png").exists()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="flock holders are POSIX")
def test_prepare_into_a_folder_another_prepare_holds_is_refused(world, tmp_path, capsys):
    """Two prepares on one --out: the second is refused with the first's PID, and writes nothing."""
    holder = ("import sys\nfrom diyllm.locks import hold_folder_lock\n"
              "with hold_folder_lock(sys.argv[1], purpose='diyllm prepare'):\n"
              "    print('held', flush=True)\n    sys.stdin.readline()\n")
    out = tmp_path / "ds"
    proc = subprocess.Popen([sys.executable, "-c", holder, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout.readline().strip() == "held"
        before = snapshot(out)
        capsys.readouterr()
        rc = main(["prepare", str(world["root"] / "corpus.txt"), "--out", str(out), "--tokenizer_kind=char", "--quiet"])
        assert_one_error(rc, capsys.readouterr().err, str(out), f"PID {proc.pid}", "diyllm prepare")
        assert snapshot(out) == before
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def test_output_piped_into_a_reader_that_leaves_ends_quietly(world, tmp_path):
    """`diyllm inspect-data ... | head -1`: the closed pipe ends the command with 141, without a traceback."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "diyllm", "inspect-data", str(world["data"]), "--context=5000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    assert proc.stdout.readline().startswith("dataset")
    proc.stdout.close()  # 5000 window lines do not fit in the pipe's buffer: the next writes fail
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
