"""Tokenizer + data-prep benchmark: diyllm vs Hugging Face `tokenizers` and raw `tiktoken`.

Prints times and ratios measured in the same run (not a timed test):
  * BPE training time vs tokenizers' BpeTrainer (ByteLevel pre-tokenizer), same vocab size;
  * encoding throughput (MB/s): our fast backend and pure-Python encoder vs raw tiktoken encode_ordinary
    on the very same ranks and pattern;
  * with --memory: peak RSS of `prepare` on a 20 MB and a 200 MB synthetic corpus (should be flat).

usage: python benchmarks/bench_tokenizer.py [--repeat 3] [--memory]
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
EOT = "<|endoftext|>"


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_training(repeat: int) -> None:
    from diyllm.tokenizers import train_bpe

    try:
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    except ImportError:
        Tokenizer = None  # noqa: N806
    print(f"== BPE training (best of {repeat}) ==")
    for name, vocab in [("corpus.en", 500), ("tinyshakespeare.txt", 4096)]:
        path = DATA / name
        if not path.is_file():
            print(f"{name}: not found under {DATA}, skipped")
            continue
        ours = best_of(lambda p=path, v=vocab: train_bpe(p, v, [EOT]), repeat)
        line = f"{name:<22} vocab {vocab:>5}: diyllm {ours:.3f}s"
        if Tokenizer is not None:

            def hf(p=path, v=vocab):
                tok = Tokenizer(models.BPE())
                tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
                trainer = trainers.BpeTrainer(
                    vocab_size=v, special_tokens=[EOT], show_progress=False,
                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                )
                tok.train([str(p)], trainer)

            theirs = best_of(hf, repeat)
            line += f" | tokenizers {theirs:.3f}s | ratio diyllm/tokenizers {ours / theirs:.2f}x"
        print(line)


def bench_encoding(repeat: int) -> None:
    import tiktoken

    from diyllm.tokenizers import BPETokenizer, train_bpe

    path = DATA / "tinyshakespeare.txt"
    if not path.is_file():
        print("encoding: tinyshakespeare.txt not found, skipped")
        return
    vocab, merges = train_bpe(path, 4096, [EOT])
    tok = BPETokenizer(vocab, merges, [EOT])
    text = path.read_text(encoding="utf-8")
    mb = len(text.encode()) / 1e6
    ranks = {b: i for i, b in vocab.items() if i != tok.eot_id}
    raw = tiktoken.Encoding("raw", pat_str=tok.pattern, mergeable_ranks=ranks, special_tokens={})
    assert raw.encode_ordinary(text) == tok.encode(text)
    t_raw = best_of(lambda: raw.encode_ordinary(text), repeat)
    t_fast = best_of(lambda: tok.encode(text), repeat)
    t_py = best_of(lambda: BPETokenizer(vocab, merges, [EOT]).encode(text, backend="python"), 1)  # cold cache
    print(f"== encoding {mb:.2f} MB of tinyshakespeare, vocab 4096 (best of {repeat}) ==")
    print(f"raw tiktoken encode_ordinary : {mb / t_raw:7.2f} MB/s")
    print(f"diyllm encode (fast backend) : {mb / t_fast:7.2f} MB/s  = {t_raw / t_fast:.2f}x tiktoken")
    print(f"diyllm encode (pure Python)  : {mb / t_py:7.2f} MB/s  = {t_raw / t_py:.2f}x tiktoken (cold cache)")


_CHILD = """
import resource, sys, time
from diyllm.data import prepare_dataset
t0 = time.perf_counter()
meta = prepare_dataset(sys.argv[1], sys.argv[2], vocab_size=1024, tokenizer_sample_bytes=5_000_000, verbose=False)
dt = time.perf_counter() - t0
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
      meta["train_tokens"] + meta["val_tokens"], dt)
"""


def bench_memory() -> None:
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 9))) for _ in range(5000)]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 15))) + ".\n" for _ in range(20000)]
    block = "".join(lines)
    print("== prepare peak memory (maxrss, KB) ==")
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        for mb in (20, 200):
            src = Path(tmp) / f"corpus_{mb}.txt"
            with open(src, "w") as f:
                written = 0
                while written < mb * 1_000_000:
                    f.write(block)
                    written += len(block)
            out = subprocess.run(
                [sys.executable, "-c", _CHILD, str(src), str(Path(tmp) / f"out_{mb}")],
                capture_output=True, text=True, check=True,
            ).stdout.split()
            main_kb, child_kb, n_tok, dt = int(out[0]), int(out[1]), int(out[2]), float(out[3])
            print(f"{mb:>4} MB corpus: main process {main_kb / 1024:.0f} MB, largest worker {child_kb / 1024:.0f} MB, "
                  f"{n_tok:,} tokens in {dt:.1f}s ({mb / dt:.1f} MB/s end to end incl. tokenizer training)")
            src.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--memory", action="store_true", help="also run the (slow) 20 MB vs 200 MB prepare test")
    args = ap.parse_args()
    bench_training(args.repeat)
    bench_encoding(args.repeat)
    if args.memory:
        bench_memory()


if __name__ == "__main__":
    main()
