"""Tokenize a corpus into train.bin / val.bin, ready for memory-mapped training.

SOURCE is a text file, a folder (its .txt/.md/.rst/.py/.jsonl files), a glob, a JSONL file with one
{"text": ...} per line, or a built-in recipe name: pystdlib, shakespeare, shakespeare_char.

Output folder: train.bin and val.bin (raw little-endian uint16, or uint32 when the vocabulary has more
than 65536 ids), tokenizer.json and meta.json. With BPE every document ends with <|endoftext|>; with the
char tokenizer documents are simply concatenated. One plain text file is split by its tail (the last
--val_fraction of its bytes, from a line start); several documents are split by document (an exact,
seeded choice of round(val_fraction * documents) documents).

examples:
  diyllm prepare pystdlib --out data/pystdlib
  diyllm prepare shakespeare_char --out data/shakespeare_char
  diyllm prepare my_corpus.txt --out data/mine --vocab_size 8192
  diyllm prepare 'books/**/*.txt' --out data/books --tokenizer data/mine/tokenizer.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diyllm.atomic import atomic_dir
from diyllm.data.sources import (
    ReadStats,
    count_lines,
    is_jsonl,
    iter_jsonl,
    iter_text_file,
    resolve_inputs,
    tail_split_offset,
)
from diyllm.errors import UserError

DEFAULT_VAL_FRACTION = 0.1
DEFAULT_SEED = 1337
DEFAULT_VOCAB_SIZE = 4096
DEFAULT_SAMPLE_BYTES = 100_000_000
EOT = "<|endoftext|>"
JOB_CHARS = 1 << 20  # characters of text per encoding job
PARALLEL_MIN_BYTES = 8 << 20  # smaller corpora are encoded in-process (no worker start-up)


@dataclass
class _Doc:
    split: str
    source: str
    pieces: Iterator[str]


def _plan(
    files: list[Path], val_fraction: float, seed: int, max_bytes: int | None
) -> tuple[str, list[tuple[Path, Any]]]:
    """Decide the split: ("tail", [(file, (cut, end))]) or ("document", [(file, val_mask)]).

    The document split picks exactly round(val_fraction * n) documents (at least 1 when there are two or
    more and val_fraction > 0) with a seeded permutation, so it is reproducible and independent of timing.
    """
    if len(files) == 1 and not is_jsonl(files[0]):
        f = files[0]
        end = f.stat().st_size if max_bytes is None else min(max_bytes, f.stat().st_size)
        cut = tail_split_offset(f, val_fraction, end) if val_fraction > 0 else end
        return "tail", [(f, (cut, end))]
    if max_bytes is not None:  # whole files, in order, until the budget is reached
        kept, total = [], 0
        for f in files:
            if kept and total >= max_bytes:
                break
            kept.append(f)
            total += f.stat().st_size
        files = kept
    slots = [count_lines(f) if is_jsonl(f) else 1 for f in files]
    n = sum(slots)
    k = round(val_fraction * n)
    if val_fraction > 0 and n >= 2:
        k = min(max(k, 1), n - 1)
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(seed).permutation(n)[:k]] = True
    plan, start = [], 0
    for f, s in zip(files, slots):
        plan.append((f, mask[start : start + s]))
        start += s
    return "document", plan


def _iter_docs(
    mode: str, plan: list[tuple[Path, Any]], on_bad_utf8: str, skip_bad_lines: bool, stats: ReadStats
) -> Iterator[_Doc]:
    """Stream the documents of the plan, each as an iterator over its text pieces."""
    if mode == "tail":
        f, (cut, end) = plan[0]
        yield _Doc("train", str(f), iter_text_file(f, on_bad_utf8, stats, 0, cut))
        if end > cut:
            yield _Doc("val", str(f), iter_text_file(f, on_bad_utf8, stats, cut, end))
        return
    for f, mask in plan:
        if is_jsonl(f):
            for lineno, text in iter_jsonl(f, on_bad_utf8, skip_bad_lines, stats):
                split = "val" if lineno <= len(mask) and mask[lineno - 1] else "train"
                yield _Doc(split, f"{f}:{lineno}", iter([text]))
        else:
            yield _Doc("val" if mask[0] else "train", str(f), iter_text_file(f, on_bad_utf8, stats))


def _make_tokenizer(
    kind: str, vocab_size: int, plan_docs: Iterator[_Doc], sample_bytes: int, tmp: Path, verbose: bool
) -> Any:
    from diyllm.tokenizers import BPETokenizer, CharTokenizer, train_bpe

    t0 = time.perf_counter()
    if kind == "char":
        # Every character of every split must be encodable, so the vocabulary comes from the whole corpus.
        tok = CharTokenizer.train(piece for doc in plan_docs for piece in doc.pieces)
    elif kind == "bpe":
        if vocab_size < 257:
            raise UserError(f"vocab_size={vocab_size} is too small for BPE: 256 byte tokens + {EOT} need 257")
        sample = tmp / "_tokenizer_sample.txt"
        written = 0
        with open(sample, "w", encoding="utf-8") as f:
            for doc in plan_docs:
                if doc.split != "train":
                    continue  # the tokenizer never sees validation text
                for piece in doc.pieces:
                    f.write(piece)
                    written += len(piece)
                    if written >= sample_bytes:
                        break
                f.write(EOT)
                if written >= sample_bytes:
                    break
        if written == 0:
            raise UserError("the training split is empty: nothing to train the tokenizer on")
        vocab, merges = train_bpe(sample, vocab_size, [EOT], progress=verbose and vocab_size >= 20000)
        sample.unlink()
        tok = BPETokenizer(vocab, merges, [EOT])
    else:
        raise UserError(f"tokenizer_kind must be 'bpe' or 'char', not {kind!r}")
    if verbose:
        print(f"trained {kind} tokenizer: vocab_size={tok.vocab_size} in {time.perf_counter() - t0:.1f}s", flush=True)
    return tok


class _JobEncoder:
    """Encodes one job: a list of (split, text, ends_document) -> token arrays per split."""

    def __init__(self, tokenizer: Any, dtype: str) -> None:
        self.tok = tokenizer
        self.dtype = np.dtype(dtype)
        self.eot = getattr(tokenizer, "eot_id", None)
        if hasattr(tokenizer, "fast_encoding"):
            tokenizer.fast_encoding()

    def __call__(self, job: list[tuple[str, str, bool]]) -> dict[str, tuple[np.ndarray, int]]:
        parts: dict[str, list[np.ndarray]] = {"train": [], "val": []}
        docs = {"train": 0, "val": 0}
        for split, text, ends in job:
            if text:
                parts[split].append(self.tok.encode_to_array(text).astype(self.dtype))
            if ends:
                docs[split] += 1
                if self.eot is not None:
                    parts[split].append(np.asarray([self.eot], dtype=self.dtype))
        return {
            s: (np.concatenate(p) if p else np.zeros(0, dtype=self.dtype), docs[s]) for s, p in parts.items()
        }


_WORKER: _JobEncoder | None = None


def _worker_init(tokenizer_file: str, dtype: str) -> None:
    global _WORKER
    from diyllm.tokenizers import load_tokenizer

    _WORKER = _JobEncoder(load_tokenizer(tokenizer_file), dtype)


def _worker_run(job: list[tuple[str, str, bool]]) -> dict[str, tuple[np.ndarray, int]]:
    assert _WORKER is not None
    return _WORKER(job)


def _jobs(docs: Iterator[_Doc], tokenizer: Any) -> Iterator[list[tuple[str, str, bool]]]:
    """Group documents into ~JOB_CHARS jobs; long documents are cut where encoding is unaffected."""
    from diyllm.tokenizers.pretokenize import last_safe_cut

    specials = list(getattr(tokenizer, "special_tokens", []))
    is_char = getattr(tokenizer, "kind", "") == "char"
    job: list[tuple[str, str, bool]] = []
    size = 0
    for doc in docs:
        buf = ""
        for piece in doc.pieces:
            buf += piece
            while len(buf) >= JOB_CHARS:
                cut = len(buf) if is_char else last_safe_cut(buf, specials)
                if cut == 0:
                    if len(buf) < 64 * JOB_CHARS:
                        break  # no safe cut yet (e.g. one huge word): keep reading
                    cut = len(buf)  # pathological input: accept a cut rather than unbounded memory
                job.append((doc.split, buf[:cut], False))
                buf = buf[cut:]
                yield job
                job, size = [], 0
        job.append((doc.split, buf, True))
        size += len(buf) + 1
        if size >= JOB_CHARS:
            yield job
            job, size = [], 0
    if job:
        yield job


def prepare_dataset(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    tokenizer_kind: str = "bpe",
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    tokenizer: str | os.PathLike | Any | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = DEFAULT_SEED,
    tokenizer_sample_bytes: int = DEFAULT_SAMPLE_BYTES,
    on_bad_utf8: str = "replace",
    skip_bad_lines: bool = False,
    max_bytes: int | None = None,
    num_workers: int | None = None,
    verbose: bool = True,
    extra_meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Tokenize `inputs` into `out_dir` (train.bin, val.bin, tokenizer.json, meta.json); returns meta.

    `tokenizer` may be a tokenizer file or object to reuse instead of training one. The folder is built
    under a temporary name and renamed at the end, so an interrupted run leaves nothing that looks valid.
    Memory stays flat in the corpus size: documents stream through ~1 MB jobs and tokens are appended to
    the output files as they come back from the workers.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files = resolve_inputs([os.fspath(i) for i in inputs])
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if on_bad_utf8 not in ("replace", "error"):
        raise UserError(f"on_bad_utf8 must be 'replace' or 'error', not {on_bad_utf8!r}")
    total_bytes = sum(f.stat().st_size for f in files)
    if max_bytes is not None:
        total_bytes = min(total_bytes, max_bytes)
    if total_bytes == 0:
        raise UserError(f"the corpus is empty: {', '.join(map(str, files))} contain no bytes")
    mode, plan = _plan(files, val_fraction, seed, max_bytes)
    total_bytes = plan[0][1][1] if mode == "tail" else sum(f.stat().st_size for f, _ in plan)
    log = print if verbose else (lambda *a, **k: None)

    with atomic_dir(out_dir) as tmp:
        stats = ReadStats()
        if tokenizer is None:
            tok = _make_tokenizer(
                tokenizer_kind, vocab_size, _iter_docs(mode, plan, on_bad_utf8, skip_bad_lines, ReadStats()),
                tokenizer_sample_bytes, tmp, verbose,
            )
        elif isinstance(tokenizer, (str, os.PathLike)):
            from diyllm.tokenizers import load_tokenizer

            tok = load_tokenizer(tokenizer)
        else:
            tok = tokenizer
        dtype = "uint16" if tok.vocab_size <= 65536 else "uint32"
        tok_file = tmp / "tokenizer.json"
        tok.save(tok_file)

        counts = {"train": 0, "val": 0}
        ndocs = {"train": 0, "val": 0}
        t0 = time.perf_counter()
        workers = num_workers if num_workers is not None else min(os.cpu_count() or 1, 8)
        jobs = _jobs(_iter_docs(mode, plan, on_bad_utf8, skip_bad_lines, stats), tok)
        from tqdm import tqdm

        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="encoding", disable=not verbose, file=sys.stderr)
        with open(tmp / "train.bin", "wb") as ftrain, open(tmp / "val.bin", "wb") as fval:
            out = {"train": ftrain, "val": fval}
            seen_bytes = 0

            def write(result: dict[str, tuple[np.ndarray, int]]) -> None:
                nonlocal seen_bytes
                for s, (arr, nd) in result.items():
                    out[s].write(arr.astype(dtype, copy=False).tobytes())  # native is little-endian here
                    counts[s] += len(arr)
                    ndocs[s] += nd
                bar.update(stats.bytes_read - seen_bytes)
                seen_bytes = stats.bytes_read

            if workers <= 1 or total_bytes < PARALLEL_MIN_BYTES:
                enc = _JobEncoder(tok, dtype)
                for job in jobs:
                    write(enc(job))
            else:
                _encode_parallel(jobs, workers, str(tok_file), dtype, write)
        bar.close()
        elapsed = time.perf_counter() - t0
        if counts["train"] == 0:
            raise UserError("the corpus produced no training tokens (is it empty or only blank/skipped lines?)")
        if stats.bad_utf8:
            log(f"warning: replaced {stats.bad_utf8} invalid UTF-8 sequence(s) with U+FFFD", file=sys.stderr)
        if stats.skipped_lines:
            log(f"warning: skipped {stats.skipped_lines} malformed JSONL line(s), e.g. {stats.skipped_examples[0]}",
                file=sys.stderr)
        if counts["val"] == 0 and val_fraction > 0:
            log("warning: the validation split is empty (only one document?)", file=sys.stderr)
        n_tok = counts["train"] + counts["val"]
        log(f"encoded {n_tok:,} tokens from {stats.bytes_read / 1e6:.1f} MB in {elapsed:.1f}s "
            f"({stats.bytes_read / 1e6 / max(elapsed, 1e-9):.1f} MB/s, {n_tok / max(elapsed, 1e-9) / 1e6:.2f} M tok/s)")
        meta = {
            "format_version": 1,
            "tokenizer_kind": tok.kind,
            "tokenizer_file": "tokenizer.json",
            "vocab_size": tok.vocab_size,
            "dtype": dtype,
            "byte_order": "little",
            "eot_id": getattr(tok, "eot_id", None),
            "train_tokens": counts["train"],
            "val_tokens": counts["val"],
            "train_documents": ndocs["train"],
            "val_documents": ndocs["val"],
            "split_mode": mode,
            "val_fraction": val_fraction,
            "seed": seed,
            "sources": [str(f) for f in (plan_files(mode, plan))],
            "bytes": stats.bytes_read,
            "bad_utf8_replaced": stats.bad_utf8,
            "skipped_bad_lines": stats.skipped_lines,
            **(extra_meta or {}),
        }
        with open(tmp / "meta.json", "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
    log(f"wrote {out_dir}: train {counts['train']:,} tokens, val {counts['val']:,} tokens ({dtype})")
    return meta


def plan_files(mode: str, plan: list[tuple[Path, Any]]) -> list[Path]:
    return [f for f, _ in plan]


def _encode_parallel(jobs: Iterator[list], workers: int, tok_file: str, dtype: str, write: Any) -> None:
    """Encode jobs in worker processes, keeping at most 2 per worker in flight (flat memory), in order.

    Workers are spawned (not forked): safe even when the caller already runs threads (torch, tqdm).
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_worker_init, initargs=(tok_file, dtype)) as pool:
        pending: collections.deque = collections.deque()
        for job in jobs:
            pending.append(pool.apply_async(_worker_run, (job,)))
            if len(pending) >= 2 * workers:
                write(pending.popleft().get())
        while pending:
            write(pending.popleft().get())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", nargs="*", help="file(s), folder, glob, .jsonl, or a recipe name")
    parser.add_argument("--out", help="output folder (default for recipes: data/<recipe>)")
    parser.add_argument("--input", help="recipes only: a local copy of the recipe's source file")
    parser.add_argument("--tokenizer", help="reuse this tokenizer.json instead of training one")
    parser.add_argument("--tokenizer_kind", "--tokenizer-kind", choices=["bpe", "char"], default=None,
                        help="tokenizer to train (default: bpe, or the recipe's)")
    parser.add_argument("--vocab_size", "--vocab-size", type=int, default=None,
                        help=f"BPE vocabulary size (default {DEFAULT_VOCAB_SIZE}, or the recipe's)")
    parser.add_argument("--tokenizer_sample_bytes", "--tokenizer-sample-bytes", type=int, default=DEFAULT_SAMPLE_BYTES,
                        help="train BPE on at most this many characters of the training split")
    parser.add_argument("--val_fraction", "--val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
                        help="fraction held out for validation (default %(default)s)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the document split")
    parser.add_argument("--on_bad_utf8", "--on-bad-utf8", choices=["replace", "error"], default="replace",
                        help="invalid UTF-8: replace with U+FFFD and count (default), or stop naming file+offset")
    parser.add_argument("--skip_bad_lines", "--skip-bad-lines", action="store_true",
                        help="skip (and count) malformed JSONL lines instead of stopping at the first")
    parser.add_argument("--max_bytes", "--max-bytes", type=int, default=None,
                        help="use only about this many bytes of input (quick runs)")
    parser.add_argument("--workers", type=int, default=None, help="encoding processes (default: CPU count)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def run(args: argparse.Namespace) -> int:
    from diyllm.data.recipes import RECIPES, resolve_recipe

    sources = list(args.source)
    if not sources:
        raise UserError(f"give a SOURCE: a file, folder, glob, .jsonl or one of the recipes {sorted(RECIPES)}")
    kwargs: dict[str, Any] = {}
    if len(sources) == 1 and sources[0] in RECIPES and not Path(sources[0]).exists():
        recipe = RECIPES[sources[0]]
        inputs, kwargs = resolve_recipe(recipe, args)
        out = args.out or os.path.join("data", recipe.name)
    else:
        if args.input:
            raise UserError("--input is only for recipes; pass the file as SOURCE")
        inputs, out = sources, args.out
        if not out:
            raise UserError("--out is required (the folder to write train.bin/val.bin into)")
    if args.tokenizer_kind is not None:
        kwargs["tokenizer_kind"] = args.tokenizer_kind
    if args.vocab_size is not None:
        kwargs["vocab_size"] = args.vocab_size
    prepare_dataset(
        inputs, out, tokenizer=args.tokenizer, val_fraction=args.val_fraction, seed=args.seed,
        tokenizer_sample_bytes=args.tokenizer_sample_bytes, on_bad_utf8=args.on_bad_utf8,
        skip_bad_lines=args.skip_bad_lines, max_bytes=args.max_bytes, num_workers=args.workers,
        verbose=not args.quiet, **kwargs,
    )
    return 0
