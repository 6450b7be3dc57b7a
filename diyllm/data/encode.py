"""Turning the document stream into tokens: jobs of ~1M characters, encoded in order by worker processes.

The job boundaries depend only on the document stream (never on timing or the number of workers), and
results are consumed in job order, so the token stream is the same for 1 or 32 workers. At most two jobs
per worker are in flight, which bounds memory whatever the corpus size.
"""

from __future__ import annotations

import collections
import signal
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from diyllm.data.documents import Doc
from diyllm.errors import UserError

JOB_CHARS = 1 << 20  # characters of text per encoding job

# One job item: (text, ends_document, want ("train" | "val" | "val?"), where, first_piece_of_document)
Item = tuple[str, bool, str, str, bool]


def iter_jobs(docs: Iterator[Doc], tokenizer: Any, job_chars: int | None = None) -> Iterator[list[Item]]:
    """Group documents into jobs; a long document is cut where the cut cannot change its encoding."""
    from diyllm.tokenizers.pretokenize import last_safe_cut

    job_chars = job_chars or JOB_CHARS
    specials = list(getattr(tokenizer, "special_tokens", []))
    is_char = getattr(tokenizer, "kind", "") == "char"
    job: list[Item] = []
    size = 0
    for doc in docs:
        buf, first = "", True
        for piece in doc.pieces:
            buf += piece
            while len(buf) >= job_chars:
                cut = len(buf) if is_char else last_safe_cut(buf, specials)
                if cut == 0:
                    if len(buf) < 64 * job_chars:
                        break  # no safe cut yet (e.g. one huge word): keep reading
                    cut = len(buf)  # pathological input: accept a cut rather than unbounded memory
                job.append((buf[:cut], False, doc.want, doc.where, first))
                buf, first = buf[cut:], False
                yield job
                job, size = [], 0
        job.append((buf, True, doc.want, doc.where, first))
        size += len(buf) + 1
        if size >= job_chars:
            yield job
            job, size = [], 0
    if job:
        yield job


class JobEncoder:
    """Encodes one job -> (all its tokens concatenated, tokens per item); documents end with EOT."""

    def __init__(self, tokenizer: Any, dtype: str, tokenizer_file: str = "the tokenizer") -> None:
        self.tok = tokenizer
        self.dtype = np.dtype(dtype)
        self.eot = getattr(tokenizer, "eot_id", None)
        self.tokenizer_file = tokenizer_file
        if hasattr(tokenizer, "fast_encoding"):
            tokenizer.fast_encoding()

    def __call__(self, job: list[Item]) -> tuple[np.ndarray, list[int]]:
        parts, lengths = [], []
        for text, ends, _want, where, _first in job:
            n = 0
            if text:
                try:
                    ids = self.tok.encode_to_array(text)
                except ValueError as exc:  # e.g. a character outside a char tokenizer's vocabulary
                    raise UserError(f"{where}: {exc} of {self.tokenizer_file}; use a tokenizer that covers the "
                                    "corpus, or let prepare train one (omit --tokenizer)") from None
                parts.append(ids.astype(self.dtype))
                n += len(ids)
            if ends and self.eot is not None:
                parts.append(np.asarray([self.eot], dtype=self.dtype))
                n += 1
            lengths.append(n)
        tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=self.dtype)
        return tokens, lengths


_WORKER: JobEncoder | None = None


def _worker_init(tokenizer_file: str, dtype: str) -> None:
    """Runs in each worker: Ctrl-C is the parent's to handle (one message, not one traceback per worker)."""
    global _WORKER
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from diyllm.tokenizers import load_tokenizer

    _WORKER = JobEncoder(load_tokenizer(tokenizer_file), dtype, tokenizer_file)


def _worker_run(job: list[Item]) -> tuple[np.ndarray, list[int]]:
    assert _WORKER is not None
    return _WORKER(job)


def encode_in_order(
    jobs: Iterator[list[Item]], workers: int, tokenizer: Any, tokenizer_file: str, dtype: str,
    write: Callable[[list[Item], tuple[np.ndarray, list[int]]], None],
) -> None:
    """Encode every job and hand (job, result) to `write` in job order; in-process when workers <= 1.

    Workers are spawned (not forked): safe when the caller already runs threads (torch, tqdm).
    """
    if workers <= 1:
        enc = JobEncoder(tokenizer, dtype, tokenizer_file)
        for job in jobs:
            write(job, enc(job))
        return
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    # Workers start with SIGINT ignored (a spawned Python keeps an inherited SIG_IGN): a Ctrl-C that arrives
    # while one is still importing would otherwise print its traceback before _worker_init could ignore it.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        pool = ctx.Pool(workers, initializer=_worker_init, initargs=(tokenizer_file, dtype))
    finally:
        signal.signal(signal.SIGINT, previous)
    with pool:
        pending: collections.deque = collections.deque()
        for job in jobs:
            meta = [(b"", ends, want, where, first) for _t, ends, want, where, first in job]  # text not kept
            pending.append((meta, pool.apply_async(_worker_run, (job,))))
            if len(pending) >= 2 * workers:
                meta, res = pending.popleft()
                write(meta, res.get())
        while pending:
            meta, res = pending.popleft()
            write(meta, res.get())
