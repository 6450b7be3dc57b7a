"""Byte-level BPE training (CS336 assignment 1 semantics), fast enough for real corpora in pure Python.

Speed comes from three choices:
  * each distinct pre-token is stored once with its frequency (a corpus has far fewer distinct words
    than words), and pre-tokenization runs in worker processes for large files;
  * after a merge, only the words that contain the merged pair are rewritten and only their pair counts
    change (an index pair -> set of word ids finds them), instead of recounting every pair;
  * the best pair comes from a heap with lazy invalidation: stale entries are skipped or re-pushed when
    popped, so each step costs O(log n) instead of a scan over all pairs.
"""

from __future__ import annotations

import heapq
import multiprocessing as mp
import os
from collections import Counter, defaultdict
from collections.abc import Sequence

from diyllm.errors import UserError
from diyllm.tokenizers.pretokenize import GPT2_PATTERN, chunk_boundaries, count_file_range, count_pretokens

# Below this size a worker pool costs more (process start-up, pickling counts back) than it saves.
PARALLEL_MIN_BYTES = 4 << 20


def train_bpe(
    input_path: str | os.PathLike,
    vocab_size: int,
    special_tokens: Sequence[str] = (),
    *,
    pattern: str = GPT2_PATTERN,
    num_workers: int | None = None,
    progress: bool | None = None,
) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """Train a byte-level BPE on a UTF-8 text file.

    Returns (vocab, merges): ids 0..255 are the single bytes, then the special tokens in the given order,
    then one id per merge in creation order. Ties between equally frequent pairs go to the
    lexicographically greater (bytes, bytes) pair, so the result is fully deterministic.
    `num_workers` (default: CPU count, 1 for small files) sets pre-tokenization parallelism; `progress`
    (default: only for long runs) shows a tqdm bar over merges.
    """
    special_tokens = list(dict.fromkeys(special_tokens))
    min_size = 256 + len(special_tokens)
    if vocab_size < min_size:
        raise UserError(
            f"vocab_size={vocab_size} is too small: the 256 byte tokens plus {len(special_tokens)} special "
            f"token(s) already need {min_size}"
        )
    path = os.fspath(input_path)
    if not os.path.isfile(path):
        raise UserError(f"BPE training input not found: {path}")
    counts = _pretoken_counts(path, special_tokens, pattern, num_workers)
    return train_bpe_from_counts(counts, vocab_size, special_tokens, progress=progress)


def _pretoken_counts(path: str, special_tokens: list[str], pattern: str, num_workers: int | None) -> Counter[str]:
    size = os.path.getsize(path)
    workers = num_workers if num_workers is not None else (os.cpu_count() or 1)
    if workers <= 1 or size < PARALLEL_MIN_BYTES:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", errors="replace")
        return count_pretokens(text, special_tokens, pattern)
    bounds = chunk_boundaries(path, workers * 4, special_tokens)
    jobs = [(path, a, b, tuple(special_tokens), pattern) for a, b in zip(bounds, bounds[1:])]
    total: Counter[str] = Counter()
    with _pool(min(workers, len(jobs))) as pool:
        for part in pool.imap_unordered(count_file_range, jobs):
            total.update(part)
    return total


def _pool(n: int):  # noqa: ANN202 - a multiprocessing Pool
    """A worker pool; fork where available (instant start, workers only run regex), else spawn."""
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    return mp.get_context(method).Pool(n)


def _reverse_key(token: bytes) -> bytes:
    """A bytes key whose ascending order is the *descending* order of `token`.

    Each byte x becomes the two bytes (0, 255 - x) and a terminator (1, 0) is appended, which sorts after
    every encoded byte, so a proper prefix sorts after its extensions (as it must, reversed). This lets a
    min-heap break count ties toward the lexicographically greater pair with plain C comparisons.
    """
    out = bytearray(2 * len(token) + 2)
    out[1 : 2 * len(token) : 2] = bytes(255 - x for x in token)
    out[-2] = 1
    return bytes(out)


def train_bpe_from_counts(
    counts: Counter[str] | dict[str, int],
    vocab_size: int,
    special_tokens: Sequence[str] = (),
    *,
    progress: bool | None = None,
) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """The merge loop, given pre-token frequencies (see `train_bpe` for the vocabulary layout)."""
    special_tokens = list(dict.fromkeys(special_tokens))
    vocab: dict[int, bytes] = {i: bytes([i]) for i in range(256)}
    for s in special_tokens:
        vocab[len(vocab)] = s.encode("utf-8")
    n_merges = max(0, vocab_size - len(vocab))

    # Words as lists of token ids, each distinct pre-token once, with its frequency.
    words: list[list[int]] = []
    freqs: list[int] = []
    for tok, c in counts.items():
        b = tok.encode("utf-8")
        if len(b) > 1:  # single-byte words contain no pair
            words.append(list(b))
            freqs.append(c)

    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)
    for wi, w in enumerate(words):
        f = freqs[wi]
        for p in zip(w, w[1:]):
            pair_counts[p] += f
            where[p].add(wi)

    rkey: dict[int, bytes] = {i: _reverse_key(b) for i, b in vocab.items()}
    heap = [(-c, rkey[a], rkey[b], a, b) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)

    show = progress if progress is not None else n_merges >= 20000
    bar = None
    if show:
        from tqdm import tqdm

        bar = tqdm(total=n_merges, desc="bpe merges", unit="merge")

    merges: list[tuple[bytes, bytes]] = []
    heappush, heappop = heapq.heappush, heapq.heappop
    while len(merges) < n_merges and heap:
        negc, _, _, a, b = heappop(heap)
        pair = (a, b)
        current = pair_counts.get(pair, 0)
        if current != -negc:  # stale entry: the count went down since it was pushed
            if current > 0:
                heappush(heap, (-current, rkey[a], rkey[b], a, b))
            continue
        new_id = len(vocab)
        vocab[new_id] = vocab[a] + vocab[b]
        rkey[new_id] = _reverse_key(vocab[new_id])
        merges.append((vocab[a], vocab[b]))
        touched: set[tuple[int, int]] = set()
        for wi in where.pop(pair):
            w = words[wi]
            f = freqs[wi]
            # Rewrite the word, merging every (a, b) occurrence left to right. Only the pairs next to an
            # occurrence change: (prev, a) -> (prev, new) and (b, next) -> (new, next). Using the already
            # rewritten previous token as `prev` makes back-to-back occurrences (a b a b) come out right.
            # `where` may keep stale word ids (pairs that left a word); they only cost a rescan.
            new: list[int] = []
            i, n = 0, len(w)
            while i < n:
                if w[i] == a and i + 1 < n and w[i + 1] == b:
                    if new:
                        prev = new[-1]
                        pair_counts[(prev, a)] -= f
                        p = (prev, new_id)
                        pair_counts[p] += f
                        where[p].add(wi)
                        touched.add(p)
                    if i + 2 < n:
                        nxt = w[i + 2]
                        pair_counts[(b, nxt)] -= f
                        p = (new_id, nxt)
                        pair_counts[p] += f
                        where[p].add(wi)
                        touched.add(p)
                    new.append(new_id)
                    i += 2
                else:
                    new.append(w[i])
                    i += 1
            words[wi] = new
        del pair_counts[pair]
        for p in touched:
            c = pair_counts[p]
            if c > 0:
                heappush(heap, (-c, rkey[p[0]], rkey[p[1]], p[0], p[1]))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return vocab, merges
