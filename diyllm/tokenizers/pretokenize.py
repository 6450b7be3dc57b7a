"""Pre-tokenization: the regex split that runs before BPE, plus the rules for cutting text safely.

BPE merges never cross a pre-token boundary, so everything that splits text (special tokens, parallel
chunks, streaming buffers) must cut only where the GPT-2 pattern would cut anyway; otherwise encoding a
text in pieces would give different ids than encoding it whole. The helpers here encode those rules.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Sequence

import regex

# The GPT-2 pre-tokenizer pattern (contractions, letters, numbers, other symbols, whitespace).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# A non-whitespace character followed by a whitespace character. No alternative of the GPT-2 pattern can
# match across such a pair, and the pattern has no look-behind, so the text on either side pre-tokenizes
# the same whether it is split there or not. `(?r)` searches from the end (regex-module feature).
_LAST_SAFE_CUT = regex.compile(r"(?r)\S(?=\s)")

# ASCII whitespace bytes: a byte-level cut is safe right before b"\n" when the previous byte is ASCII
# and not one of these (a byte >= 0x80 might be the tail of a multi-byte Unicode space).
_ASCII_SPACE = frozenset(b" \t\n\r\x0b\x0c")


def special_split_regex(special_tokens: Sequence[str]) -> regex.Pattern | None:
    """A regex that finds special tokens, trying longer ones first so overlapping ones resolve greedily.

    Alternation is leftmost-first, so "<|endoftext|><|endoftext|>" must be listed before "<|endoftext|>"
    for the doubled token to win; sorting by length (descending) guarantees that.
    """
    if not special_tokens:
        return None
    ordered = sorted(set(special_tokens), key=lambda s: (-len(s), s))
    return regex.compile("(" + "|".join(regex.escape(s) for s in ordered) + ")")


def count_pretokens(text: str, special_tokens: Sequence[str], pattern: str = GPT2_PATTERN) -> Counter[str]:
    """Frequency of each distinct pre-token in `text`; special tokens are removed (they are never merged)."""
    pat = regex.compile(pattern)
    counts: Counter[str] = Counter()
    if special_tokens:
        # Non-capturing split: the special tokens themselves are dropped, so no merge can cross them.
        splitter = regex.compile("|".join(regex.escape(s) for s in sorted(set(special_tokens), key=len, reverse=True)))
        for segment in splitter.split(text):
            if segment:
                counts.update(pat.findall(segment))
    else:
        counts.update(pat.findall(text))
    return counts


def count_file_range(args: tuple[str, int, int, tuple[str, ...], str]) -> Counter[str]:
    """Worker entry point: pre-token counts for bytes [start, end) of a file (cut at safe boundaries)."""
    path, start, end, special_tokens, pattern = args
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    return count_pretokens(data.decode("utf-8", errors="replace"), special_tokens, pattern)


def chunk_boundaries(path: str | os.PathLike, n_chunks: int, special_tokens: Sequence[str]) -> list[int]:
    """Byte offsets that cut a file into about `n_chunks` pieces that can be pre-tokenized independently.

    With special tokens, a cut goes right before an occurrence of the first special token (the text is
    split on special tokens anyway). Without, it goes right before a b"\\n" preceded by a printable ASCII
    byte (a non-space/space pair, see `_LAST_SAFE_CUT`). A guess that finds no such place merges with the
    next chunk, so the result may have fewer pieces but every cut is exact.
    """
    size = os.path.getsize(path)
    if n_chunks <= 1 or size == 0:
        return [0, size]
    marker = special_tokens[0].encode("utf-8") if special_tokens else None
    bounds = [0]
    window = 1 << 16
    with open(path, "rb") as f:
        for i in range(1, n_chunks):
            pos = max(size * i // n_chunks, bounds[-1] + 1)
            cut = None
            while pos < size and cut is None:
                f.seek(pos)
                buf = f.read(window + (len(marker) if marker else 1))
                if not buf:
                    break
                cut = _find_cut(buf, marker, pos)
                pos += window
            if cut is not None and bounds[-1] < cut < size:
                bounds.append(cut)
    bounds.append(size)
    return bounds


def _find_cut(buf: bytes, marker: bytes | None, base: int) -> int | None:
    if marker is not None:
        j = buf.find(marker)
        return base + j if j >= 0 else None
    j = buf.find(b"\n", 1)
    while j > 0:
        prev = buf[j - 1]
        if prev < 0x80 and prev not in _ASCII_SPACE:
            return base + j
        j = buf.find(b"\n", j + 1)
    return None


def last_safe_cut(text: str, special_tokens: Iterable[str] = ()) -> int:
    """Largest index i > 0 such that text[:i] and text[i:] encode exactly like text (0 if none found).

    The cut is between a non-whitespace and a whitespace character, and never inside a special token.
    """
    specials = [s for s in special_tokens if s]
    end = len(text)
    while True:
        m = _LAST_SAFE_CUT.search(text, 0, end)
        if m is None:
            return 0
        cut = m.end()
        spanning = _spanning_special_start(text, cut, specials)
        if spanning is None:
            return cut
        end = spanning  # try again before the special token that straddles the cut


def _spanning_special_start(text: str, cut: int, specials: list[str]) -> int | None:
    """Start of a special-token occurrence that contains both text[cut-1] and text[cut], if any."""
    best = None
    for s in specials:
        lo = max(0, cut - len(s) + 1)
        j = text.find(s, lo, cut + len(s) - 1)
        while j != -1 and j < cut:
            if j + len(s) > cut:
                best = j if best is None else min(best, j)
                break
            j = text.find(s, j + 1, cut + len(s) - 1)
    return best
