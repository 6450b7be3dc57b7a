"""The body of `prepare`: tokenizer, document stream -> ordered encoding -> shard writers -> manifest.

Progress is checkpointed to `.diyllm-prepare.json` whenever a shard is finished (and every minute):
how many jobs of the (deterministic) job stream are written, and each split's finished shards and partial
shard length. A rerun re-reads the corpus up to that job without encoding it (which also rebuilds the
duplicate filter exactly), truncates the partial shards to their checkpoint and continues.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diyllm.atomic import atomic_write
from diyllm.data import encode as encode_mod
from diyllm.data.checksums import checksum_problem, record_verified
from diyllm.data.dataset import checksummed_shards, manifest_shards, verify_sizes
from diyllm.data.documents import DocumentStream
from diyllm.data.encode import encode_in_order, iter_jobs
from diyllm.data.outdir import PROGRESS_NAME, remove_dataset_files
from diyllm.data.readers import estimated_text_bytes, file_kind
from diyllm.data.shard_writer import ShardWriter, file_sha256
from diyllm.data.sources import tail_split_offset
from diyllm.errors import UserError

EOT = "<|endoftext|>"
CHECKPOINT_SECONDS = 60.0
SPLITS = ("train", "val")
__all__ = ["Plan", "run", "verify_sizes", "checksum_problem", "checksummed_shards", "describe_difference",
           "manifest_shards"]


@dataclass
class Plan:
    """Everything that decides the output bytes (the fingerprint), plus the corpus files."""

    files: list[Path]
    tokenizer_kind: str
    vocab_size: int
    given_tokenizer: Any
    val_fraction: float
    val_tokens: int | None
    seed: int
    sample_bytes: int
    on_bad_utf8: str
    skip_bad_lines: bool
    max_bytes: int | None
    shard_tokens: int
    text_field: str
    min_chars: int
    dedup: bool
    extra_meta: dict[str, Any] = field(default_factory=dict)
    job_chars: int | None = None  # characters per encoding job (resume granularity; never changes the output)

    def __post_init__(self) -> None:
        self.tail_split: tuple[int, int] | None = None
        sizes = [f.stat().st_size for f in self.files]
        if len(self.files) == 1 and file_kind(self.files[0]) == "text":
            f = self.files[0]
            end = sizes[0] if self.max_bytes is None else min(self.max_bytes, sizes[0])
            cut = tail_split_offset(f, self.val_fraction, end) if self.val_fraction > 0 else end
            self.tail_split = (cut, end)
            self.total_bytes = end
        else:
            self.total_bytes = sum(sizes) if self.max_bytes is None else min(sum(sizes), self.max_bytes)

    def fingerprint(self) -> dict[str, Any]:
        if self.given_tokenizer is not None:
            blob = json.dumps(self.given_tokenizer.to_dict(), sort_keys=True).encode()
            tok: dict[str, Any] = {"given_sha256": hashlib.sha256(blob).hexdigest()}
        else:
            tok = {"kind": self.tokenizer_kind, "vocab_size": self.vocab_size if self.tokenizer_kind == "bpe" else None,
                   "sample_bytes": self.sample_bytes}
        inputs = []
        for f in self.files:
            st = f.stat()
            inputs.append([os.path.realpath(f), st.st_size, st.st_mtime_ns])
        fp = {"format": 2, "inputs": inputs, "tokenizer": tok, "val_fraction": self.val_fraction,
              "val_tokens": self.val_tokens, "seed": self.seed, "on_bad_utf8": self.on_bad_utf8,
              "skip_bad_lines": self.skip_bad_lines, "max_bytes": self.max_bytes, "shard_tokens": self.shard_tokens,
              "text_field": self.text_field, "min_chars": self.min_chars, "dedup": self.dedup, "extra": self.extra_meta}
        return json.loads(json.dumps(fp))

    def stream(self, sample_fraction: float = 1.0, progress: Any = lambda n: None) -> DocumentStream:
        return DocumentStream(
            self.files, text_field=self.text_field, on_bad_utf8=self.on_bad_utf8, skip_bad_lines=self.skip_bad_lines,
            min_chars=self.min_chars, dedup=self.dedup, val_fraction=self.val_fraction, seed=self.seed,
            max_bytes=self.max_bytes, tail_split=self.tail_split, sample_fraction=sample_fraction, progress=progress,
        )


def describe_difference(old: dict | None, new: dict) -> str:
    if not isinstance(old, dict):
        return "it records no fingerprint of how it was made"
    diffs = []
    for key in new:
        if old.get(key) != new[key]:
            if key == "inputs":
                a = {p: (s, m) for p, s, m in old.get("inputs") or []}
                b = {p: (s, m) for p, s, m in new["inputs"]}
                changed = sorted(set(a) ^ set(b)) or sorted(p for p in b if a.get(p) != b[p])
                more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
                diffs.append(f"input changed: {changed[0]}{more}")
            else:
                diffs.append(f"{key}: {old.get(key)!r} then, {new[key]!r} now")
    return "; ".join(diffs) or "unknown difference"


def _make_tokenizer(plan: Plan, out: Path, verbose: bool) -> Any:
    from diyllm.tokenizers import BPETokenizer, CharTokenizer, train_bpe

    if plan.given_tokenizer is not None:
        return plan.given_tokenizer
    t0 = time.perf_counter()
    if plan.tokenizer_kind == "char":
        # Every character of every split must be encodable, so the vocabulary comes from the whole corpus.
        tok = CharTokenizer.train(piece for doc in plan.stream() for piece in doc.pieces)
    else:
        estimate = sum(estimated_text_bytes(f, plan.text_field) for f in plan.files)
        fraction = min(1.0, plan.sample_bytes / max(estimate * (1 - plan.val_fraction), 1))
        sample = out / ".tokenizer-sample.prepare.tmp"
        written = 0
        with open(sample, "w", encoding="utf-8", errors="surrogatepass") as f:
            for doc in plan.stream(sample_fraction=fraction):
                if doc.want != "train" or not doc.sampled:
                    continue  # the tokenizer never sees validation text
                for piece in doc.pieces:
                    f.write(piece[: plan.sample_bytes - written])
                    written += min(len(piece), plan.sample_bytes - written)
                    if written >= plan.sample_bytes:
                        break
                f.write(EOT)
                if written >= plan.sample_bytes:
                    break
        if written == 0:
            sample.unlink()
            raise UserError("the training split is empty: nothing to train the tokenizer on")
        vocab, merges = train_bpe(sample, plan.vocab_size, [EOT], progress=verbose and plan.vocab_size >= 20000)
        sample.unlink()
        tok = BPETokenizer(vocab, merges, [EOT])
    if verbose:
        print(f"trained {tok.kind} tokenizer: vocab_size={tok.vocab_size} in {time.perf_counter() - t0:.1f}s",
              flush=True)
    return tok


class _Assembler:
    """Routes encoded items to the split writers; decides each document's split at its first piece."""

    def __init__(self, writers: dict[str, ShardWriter], val_budget: int | None, current: str | None) -> None:
        self.writers, self.val_budget, self.current = writers, val_budget, current
        self.jobs_done = 0
        self.job_chars = 0

    def write(self, meta: list, result: tuple[np.ndarray, list[int]]) -> None:
        tokens, lengths = result
        pos = 0
        for (_text, _ends, want, _where, first), n in zip(meta, lengths):
            if first:
                self.current = want
                if want == "val?":
                    room = self.val_budget is None or self.writers["val"].total_tokens < self.val_budget
                    self.current = "val" if room else "train"
            self.writers[self.current].append(tokens[pos : pos + n], first)
            pos += n
        self.jobs_done += 1


def _checkpoint(out: Path, fp: dict, tok_sha: str, writers: dict[str, ShardWriter], asm: _Assembler) -> None:
    state = {"fingerprint": fp, "tokenizer_sha256": tok_sha, "jobs_done": asm.jobs_done, "job_chars": asm.job_chars,
             "open_document_split": asm.current, "splits": {s: w.checkpoint() for s, w in writers.items()}}
    with atomic_write(out / PROGRESS_NAME, "w", encoding="utf-8") as f:
        json.dump(state, f)


def run(out: Path, plan: Plan, progress: dict | None, workers: int, verbose: bool) -> dict[str, Any]:
    """Build (or continue building) the dataset in the locked folder `out`; returns the manifest."""
    from tqdm import tqdm

    from diyllm.tokenizers import load_tokenizer

    fp = plan.fingerprint()
    tok_path = out / "tokenizer.json"
    writers: dict[str, ShardWriter] = {}
    if progress is not None:
        try:
            if not tok_path.is_file() or file_sha256(tok_path) != progress["tokenizer_sha256"]:
                raise ValueError(f"{tok_path} changed")
            tok = load_tokenizer(tok_path)
            dtype = "uint16" if tok.vocab_size <= 65536 else "uint32"
            writers = {s: ShardWriter.resume(out, s, dtype, plan.shard_tokens, progress["splits"][s]) for s in SPLITS}
        except (ValueError, KeyError, UserError) as exc:
            print(f"warning: cannot continue the earlier run ({exc}); starting again", file=sys.stderr)
            remove_dataset_files(out)
            progress, writers = None, {}
    if progress is None:
        tok = _make_tokenizer(plan, out, verbose)
        tmp = out / ".tokenizer.json.prepare.tmp"
        tok.save(tmp)
        os.replace(tmp, tok_path)
        dtype = "uint16" if tok.vocab_size <= 65536 else "uint32"
        writers = {s: ShardWriter(out, s, dtype, plan.shard_tokens) for s in SPLITS}
    tok_sha = file_sha256(tok_path)
    asm = _Assembler(writers, plan.val_tokens, progress.get("open_document_split") if progress else None)
    skip = int(progress["jobs_done"]) if progress else 0
    asm.job_chars = int(progress.get("job_chars") or 0) if progress else 0  # resume: the same job boundaries
    asm.job_chars = asm.job_chars or plan.job_chars or encode_mod.JOB_CHARS
    if progress is None:
        _checkpoint(out, fp, tok_sha, writers, asm)  # from here on, a rerun resumes (and reuses the tokenizer)

    bar = tqdm(total=plan.total_bytes, unit="B", unit_scale=True, desc="encoding", disable=not verbose,
               file=sys.stderr, mininterval=0.5)
    stream = plan.stream(progress=bar.update)
    jobs = iter_jobs(stream, tok, asm.job_chars)
    if skip:
        bar.set_description(f"resuming: skipping {skip} encoded jobs")
        for _ in itertools.islice(jobs, skip):
            pass
        bar.set_description("encoding")
    asm.jobs_done = skip
    t0, last = time.perf_counter(), time.perf_counter()
    start_tokens = sum(w.total_tokens for w in writers.values())

    def write(meta: list, result: tuple[np.ndarray, list[int]]) -> None:
        nonlocal last
        before = sum(len(w.finished) for w in writers.values())
        asm.write(meta, result)
        now = time.perf_counter()
        if sum(len(w.finished) for w in writers.values()) != before or now - last > CHECKPOINT_SECONDS:
            _checkpoint(out, fp, tok_sha, writers, asm)
            last = now
        if asm.jobs_done % 8 == 0:
            done = sum(w.total_tokens for w in writers.values()) - start_tokens
            bar.set_postfix_str(f"{done / max(now - t0, 1e-9) / 1e6:.2f} M tok/s", refresh=False)

    try:
        encode_in_order(jobs, workers, tok, str(tok_path), dtype, write)
        if writers["val"].total_tokens == 0 and plan.val_fraction > 0 and plan.tail_split is None:
            moved = writers["train"].pop_last_document()  # a tiny corpus: keep the val split non-empty
            if moved is not None:
                writers["val"].append(moved, True)
        for w in writers.values():
            w.close()
        _checkpoint(out, fp, tok_sha, writers, asm)
    finally:
        bar.close()
        for w in writers.values():
            w.drop_file_handle()
    elapsed = time.perf_counter() - t0
    st = stream.stats
    if writers["train"].total_tokens == 0:
        raise UserError("the corpus produced no training tokens (is it empty, or only blank/short/skipped records?)")
    log = print if verbose else (lambda *a, **k: None)
    if st.read.bad_utf8:
        log(f"warning: replaced {st.read.bad_utf8} invalid UTF-8 sequence(s) with U+FFFD", file=sys.stderr)
    if st.read.skipped_lines:
        log(f"warning: skipped {st.read.skipped_lines} malformed JSONL line(s), e.g. {st.read.skipped_examples[0]}",
            file=sys.stderr)
    if writers["val"].total_tokens == 0 and plan.val_fraction > 0:
        log("warning: the validation split is empty (only one document?)", file=sys.stderr)
    lopsided = lopsided_split_warning(writers["train"].total_tokens, writers["val"].total_tokens,
                                      writers["val"].total_documents, plan)
    if lopsided:
        log(lopsided, file=sys.stderr)
    n_tok = sum(w.total_tokens for w in writers.values())
    mb = st.read.bytes_read / 1e6
    log(f"encoded {n_tok:,} tokens from {mb:.1f} MB in {elapsed:.1f}s ({mb / max(elapsed, 1e-9):.1f} MB/s, "
        f"{(n_tok - start_tokens) / max(elapsed, 1e-9) / 1e6:.2f} M tok/s, {workers} worker(s))")
    meta = {
        "format_version": 2,
        "tokenizer_kind": tok.kind,
        "tokenizer_file": "tokenizer.json",
        "tokenizer_sha256": tok_sha,
        "vocab_size": tok.vocab_size,
        "dtype": dtype,
        "byte_order": "little",
        "eot_id": getattr(tok, "eot_id", None),
        "train_tokens": writers["train"].total_tokens,
        "val_tokens": writers["val"].total_tokens,
        "train_documents": writers["train"].total_documents,
        "val_documents": writers["val"].total_documents,
        "split_mode": "tail" if plan.tail_split is not None else "hash",
        "val_fraction": plan.val_fraction,
        "val_tokens_budget": plan.val_tokens,
        "seed": plan.seed,
        "shard_tokens": plan.shard_tokens,
        "sources": [str(f) for f in plan.files],
        "bytes": st.read.bytes_read,
        "bad_utf8_replaced": st.read.bad_utf8,
        "skipped_bad_lines": st.read.skipped_lines,
        "documents_seen": st.documents_seen,
        "duplicates_dropped": st.duplicates_dropped,
        "too_short_dropped": st.too_short_dropped,
        "min_chars": plan.min_chars,
        "dedup": plan.dedup,
        "shards": {s: w.finished for s, w in writers.items()},
        "fingerprint": fp,
        **plan.extra_meta,
    }
    with atomic_write(out / "meta.json", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    record_verified(out, checksummed_shards(out, meta))  # hashed as written: the first training need not re-read
    (out / PROGRESS_NAME).unlink(missing_ok=True)
    for p in out.glob(".*.idx.partial"):
        p.unlink(missing_ok=True)
    return meta


def lopsided_split_warning(train_tokens: int, val_tokens: int, val_documents: int, plan: Any) -> str | None:
    """A warning when the hash split put far more than val_fraction of the tokens in val: documents are
    assigned whole, so on a corpus of a few documents one large one decides the split (and training
    would see only what is left). None when the split is near its share."""
    total = train_tokens + val_tokens
    if plan.tail_split is not None or not total or plan.val_fraction <= 0:
        return None
    share = val_tokens / total
    if share <= max(2 * plan.val_fraction, plan.val_fraction + 0.1):
        return None
    return (f"warning: the validation split holds {share:.0%} of the tokens ({val_documents} document(s)): "
            f"--val_fraction {plan.val_fraction} is a share of documents, each kept whole, so with this few "
            "documents a large one decides the split; try another --seed or split the corpus into more documents")
