"""Tokenize a corpus into a sharded dataset: train_00000.bin ... val_00000.bin ..., offsets, a manifest.

SOURCE is a text file, a folder (its .txt/.md/.rst/.py/.jsonl/.parquet/.jsonl.gz/.jsonl.zst files), a
glob, a JSONL/Parquet file (column --text_field, default "text"), hf:OWNER/DATASET[/PATH-GLOB] (files
downloaded from the Hugging Face Hub into its cache), or a recipe: pystdlib, shakespeare, shakespeare_bpe512,
shakespeare_char, tinystories, fineweb_edu, minimind.

Output folder: shards of --shard_tokens token ids (raw little-endian uint16, or uint32 above 65536
ids), their document offsets (.idx), tokenizer.json, and meta.json (the manifest, written last: a folder
without it is an unfinished prepare). Rerunning the same command continues an interrupted run and does
nothing on a finished one. The output is byte-identical for any --workers.

examples:
  diyllm prepare pystdlib --out data/pystdlib
  diyllm prepare shakespeare_char --out data/shakespeare_char
  diyllm prepare my_corpus.txt --out data/mine --vocab_size 8192
  diyllm prepare 'books/**/*.txt' --out data/books --tokenizer data/mine/tokenizer.json
  diyllm prepare 'web/*.parquet' --out data/web --text_field content --workers 32
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diyllm.data import build
from diyllm.data.outdir import PROGRESS_NAME, check_out_dir, read_json_dict, remove_dataset_files
from diyllm.data.sources import resolve_inputs
from diyllm.errors import UserError

DEFAULT_VAL_FRACTION = 0.1
DEFAULT_SEED = 1337
DEFAULT_VOCAB_SIZE = 4096
DEFAULT_SAMPLE_BYTES = 100_000_000
DEFAULT_SHARD_TOKENS = 100_000_000
EOT = build.EOT
PARALLEL_MIN_BYTES = 8 << 20  # smaller corpora are encoded in-process (no worker start-up)


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _roots(inputs: list[str]) -> list[Path]:
    """The folders a user named, directly or as the fixed part of a glob."""
    roots = []
    for item in inputs:
        if any(ch in item for ch in "*?["):
            fixed = []
            for part in Path(item).parts:
                if any(ch in part for ch in "*?["):
                    break
                fixed.append(part)
            roots.append(Path(*fixed) if fixed else Path("."))
        elif Path(item).is_dir():
            roots.append(Path(item))
    return roots


def prepare_dataset(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    tokenizer_kind: str = "bpe",
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    tokenizer: str | os.PathLike | Any | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    val_tokens: int | None = None,
    seed: int = DEFAULT_SEED,
    tokenizer_sample_bytes: int = DEFAULT_SAMPLE_BYTES,
    on_bad_utf8: str = "replace",
    skip_bad_lines: bool = False,
    max_bytes: int | None = None,
    num_workers: int | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    text_field: str = "text",
    min_chars: int = 0,
    dedup: bool = True,
    overwrite: bool = False,
    job_chars: int | None = None,
    verbose: bool = True,
    extra_meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Tokenize `inputs` into the sharded dataset folder `out_dir`; returns the manifest (meta.json).

    `tokenizer` may be a tokenizer file or object to reuse instead of training one. A rerun of the same
    call continues where an interrupted one stopped (finished shards are checksum-verified and kept) and
    returns at once when the dataset is complete; other inputs or options are refused unless `overwrite`.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = [os.fspath(i) for i in inputs]
    files = resolve_inputs(inputs)
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_tokens is not None and val_tokens < 0:
        raise UserError(f"val_tokens must be >= 0, got {val_tokens}")
    if on_bad_utf8 not in ("replace", "error"):
        raise UserError(f"on_bad_utf8 must be 'replace' or 'error', not {on_bad_utf8!r}")
    if shard_tokens < 1:
        raise UserError(f"shard_tokens must be >= 1, got {shard_tokens}")
    if tokenizer_kind not in ("bpe", "char"):
        raise UserError(f"tokenizer_kind must be 'bpe' or 'char', not {tokenizer_kind!r}")
    if tokenizer is None and tokenizer_kind == "bpe" and vocab_size < 257:
        raise UserError(f"vocab_size={vocab_size} is too small for BPE: 256 byte tokens + {EOT} need 257")
    if sum(f.stat().st_size for f in files) == 0:
        raise UserError(f"the corpus is empty: {', '.join(map(str, files))} contain no bytes")
    given = None
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        given = tokenizer
    elif tokenizer is not None:
        from diyllm.tokenizers import load_tokenizer

        given = load_tokenizer(tokenizer)
    out = Path(out_dir)
    state = check_out_dir(out, files, _roots(inputs))
    plan = build.Plan(
        files=files, tokenizer_kind=tokenizer_kind, vocab_size=vocab_size, given_tokenizer=given,
        val_fraction=val_fraction, val_tokens=val_tokens, seed=seed, sample_bytes=tokenizer_sample_bytes,
        on_bad_utf8=on_bad_utf8, skip_bad_lines=skip_bad_lines, max_bytes=max_bytes, shard_tokens=shard_tokens,
        text_field=text_field, min_chars=min_chars, dedup=dedup, extra_meta=dict(extra_meta or {}), job_chars=job_chars,
    )
    log = print if verbose else (lambda *a, **k: None)
    from diyllm.locks import hold_folder_lock, remove_stale_temps

    try:
        with hold_folder_lock(out, purpose="diyllm prepare"):
            from diyllm.data.outdir import remove_stale_siblings

            removed = remove_stale_temps(out) + remove_stale_siblings(out)
            if removed:
                log(f"removed {len(removed)} temp file(s) left by a killed earlier run", file=sys.stderr)
            action, found = _decide(out, state, plan, overwrite, log)
            if action == "done":
                return found
            workers = num_workers if num_workers is not None else default_workers()
            if num_workers is None and plan.total_bytes < PARALLEL_MIN_BYTES:
                workers = 1  # not worth starting processes (an explicit --workers is obeyed)
            meta = build.run(out, plan, found, workers, verbose)
    except UserError:
        if state == "absent" and not any(out.glob("train_*.bin")):
            _discard(out)
        raise
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            n = len(list(out.glob("*_*.bin")))
            raise UserError(f"disk full while writing {exc.filename or out}: the {n} finished shard(s) in {out} are "
                            "kept; free some space and run the same command again to continue") from None
        if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise UserError(f"cannot write {exc.filename or out}: {exc.strerror}; choose a writable --out") from None
        raise
    log(f"wrote {out}: train {meta['train_tokens']:,} tokens in {len(meta['shards']['train'])} shard(s), "
        f"val {meta['val_tokens']:,} tokens ({meta['dtype']})")
    return meta


def _decide(out: Path, state: str, plan: build.Plan, overwrite: bool, log: Any) -> tuple[str, dict | None]:
    """("fresh", None), ("resume", progress) or ("done", manifest) for the folder `out` as found."""
    if state != "dataset":
        return "fresh", None
    fp = plan.fingerprint()
    meta = read_json_dict(out / "meta.json")
    progress = read_json_dict(out / PROGRESS_NAME)
    if overwrite:
        remove_dataset_files(out)
        return "fresh", None
    if progress is None and meta is not None and meta.get("fingerprint") == fp:
        problems = build.verify_sizes(out, meta)
        if not problems:  # the sizes match: a shard damaged in place is found by its checksum
            problem = build.checksum_problem(out, build.checksummed_shards(out, meta))
            problems = [problem] if problem else []
        if not problems:
            log(f"{out} is already prepared from these inputs with these options: nothing to do")
            return "done", meta
        log(f"warning: {problems[0]}; rebuilding", file=sys.stderr)
        remove_dataset_files(out)
        return "fresh", None
    if progress is not None and progress.get("fingerprint") == fp:
        return "resume", progress
    other = progress or meta or {}
    diff = build.describe_difference(other.get("fingerprint"), fp)
    what = "an unfinished prepare" if progress is not None else "a dataset"
    raise UserError(f"{out} holds {what} made from other inputs or options ({diff}); pass --overwrite to "
                    "replace it, or choose another --out")


def _discard(out: Path) -> None:
    """Remove what a failed first run made (the folder did not exist before it)."""
    if out.is_dir():
        remove_dataset_files(out)
        if not any(out.iterdir()):
            shutil.rmtree(out, ignore_errors=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", nargs="*",
                        help="file(s), folder, glob, .jsonl/.parquet, hf:OWNER/NAME[/GLOB], or a recipe")
    parser.add_argument("--out", help="output folder (default for recipes: data/<recipe>)")
    parser.add_argument("--input", help="recipes only: a local copy of the recipe's source file(s) or folder")
    parser.add_argument("--tokenizer", help="reuse this tokenizer.json instead of training one "
                        "('gpt2': GPT-2's, from the Hugging Face cache or Hub)")
    parser.add_argument("--tokenizer_kind", "--tokenizer-kind", choices=["bpe", "char"], default=None,
                        help="tokenizer to train (default: bpe, or the recipe's)")
    parser.add_argument("--vocab_size", "--vocab-size", type=int, default=None,
                        help=f"BPE vocabulary size (default {DEFAULT_VOCAB_SIZE}, or the recipe's)")
    parser.add_argument("--tokenizer_sample_bytes", "--tokenizer-sample-bytes", type=int, default=DEFAULT_SAMPLE_BYTES,
                        help="train BPE on a seeded sample of at most this many characters of the training split")
    parser.add_argument("--val_fraction", "--val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
                        help="share of documents (by hash) held out for validation (default %(default)s)")
    parser.add_argument("--val_tokens", "--val-tokens", type=int, default=None,
                        help="cap the validation split at about this many tokens (the rest goes to train)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the split and tokenizer sample")
    parser.add_argument("--shard_tokens", "--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                        help="tokens per shard file (default %(default)s)")
    parser.add_argument("--text_field", "--text-field", default="text", help="JSONL field / Parquet column of the text")
    parser.add_argument("--min_chars", "--min-chars", type=int, default=0,
                        help="drop documents shorter than this many characters (counted in the manifest)")
    parser.add_argument("--no_dedup", "--no-dedup", action="store_true", help="keep exact-duplicate documents")
    parser.add_argument("--max_shards", "--max-shards", type=int, default=None,
                        help="hf: sources and recipes: use only the first N input files")
    parser.add_argument("--on_bad_utf8", "--on-bad-utf8", choices=["replace", "error"], default="replace",
                        help="invalid UTF-8: replace with U+FFFD and count (default), or stop naming file+offset")
    parser.add_argument("--skip_bad_lines", "--skip-bad-lines", action="store_true",
                        help="skip (and count) malformed JSONL lines instead of stopping at the first")
    parser.add_argument("--max_bytes", "--max-bytes", type=int, default=None,
                        help="use only about this many bytes of input (quick runs)")
    parser.add_argument("--workers", type=int, default=None, help="encoding processes (default: all cores)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    parser.add_argument("--job_chars", "--job-chars", type=int, default=None,
                        help="characters per encoding job (default 1M; smaller: finer resume points, same output)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def run(args: argparse.Namespace) -> int:
    from diyllm.data.hub import is_hub_source, resolve_hub_sources
    from diyllm.data.recipes import RECIPES, resolve_recipe

    sources = list(args.source)
    if not sources:
        raise UserError("give a SOURCE: a file, folder, glob, .jsonl, hf:OWNER/NAME or one of the recipes "
                        f"{sorted(RECIPES)}")
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
            raise UserError("--out is required (the folder to write the dataset into)")
    if any(is_hub_source(s) for s in inputs):
        inputs = resolve_hub_sources(inputs, max_files=args.max_shards)
    elif args.max_shards is not None and not kwargs:
        raise UserError("--max_shards is for hf: sources and recipes")
    if args.tokenizer_kind is not None:
        kwargs["tokenizer_kind"] = args.tokenizer_kind
    if args.vocab_size is not None:
        kwargs["vocab_size"] = args.vocab_size
    if args.text_field != "text" or "text_field" not in kwargs:
        kwargs["text_field"] = args.text_field  # an explicit --text_field beats the recipe's
    tokenizer = args.tokenizer or kwargs.pop("tokenizer", None)
    kwargs.pop("tokenizer", None)
    if tokenizer == "gpt2-if-cached" and (args.tokenizer_kind or args.vocab_size):
        tokenizer = None  # the user chose what to train
    if tokenizer in ("gpt2", "gpt2-if-cached"):
        from diyllm.data.hub import gpt2_tokenizer

        found = gpt2_tokenizer(cached_only=tokenizer == "gpt2-if-cached")
        if found is None and not args.quiet:
            print("GPT-2's tokenizer files are not in the Hugging Face cache: training a BPE tokenizer instead",
                  file=sys.stderr)
        tokenizer = found
    try:
        prepare_dataset(
            inputs, out, tokenizer=tokenizer, val_fraction=args.val_fraction, val_tokens=args.val_tokens,
            seed=args.seed, tokenizer_sample_bytes=args.tokenizer_sample_bytes, on_bad_utf8=args.on_bad_utf8,
            skip_bad_lines=args.skip_bad_lines, max_bytes=args.max_bytes, num_workers=args.workers,
            shard_tokens=args.shard_tokens, min_chars=args.min_chars, dedup=not args.no_dedup,
            overwrite=args.overwrite, job_chars=args.job_chars, verbose=not args.quiet, **kwargs,
        )
    except KeyboardInterrupt:
        print(f"interrupted: the finished shards in {out} are kept; run the same command again to continue",
              file=sys.stderr)
        return 130
    return 0
