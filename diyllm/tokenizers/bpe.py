"""The byte-level BPE tokenizer: a readable pure-Python encoder plus a tiktoken-backed fast path.

Both paths give identical ids (a property test checks it); the Python one is the reference you can read
and step through, the tiktoken one runs the same algorithm in Rust for real corpora.

Vocabulary layout of a trained tokenizer: ids 0..255 are the single bytes, then the special tokens, then
one id per merge in creation order. A loaded GPT-2 vocabulary keeps GPT-2's own ids.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Iterable, Iterator, Sequence
from typing import Any, Literal

import numpy as np
import regex

from diyllm.atomic import atomic_write
from diyllm.errors import UserError
from diyllm.tokenizers.gpt2_bytes import decode_token, encode_token
from diyllm.tokenizers.pretokenize import GPT2_PATTERN, last_safe_cut, special_split_regex

EOT = "<|endoftext|>"
AllowedSpecial = Literal["all", "none"] | Collection[str]

# encode_iterable gathers at least this many characters before cutting, so tiny lines do not each pay
# for a tokenizer call; memory stays bounded by this plus one input chunk.
_STREAM_CHUNK_CHARS = 1 << 16


class BPETokenizer:
    """Byte-level BPE: `encode` text to ids and `decode` ids to text.

    Attributes: `vocab` (id -> bytes), `merges` (in priority order), `special_tokens` (strings, in id
    order), `pattern` (the pre-tokenizer regex).
    """

    kind = "bpe"

    def __init__(
        self,
        vocab: dict[int, bytes],
        merges: Sequence[tuple[bytes, bytes]],
        special_tokens: Sequence[str] | None = None,
        pattern: str = GPT2_PATTERN,
    ) -> None:
        self.vocab: dict[int, bytes] = dict(vocab)
        self.merges: list[tuple[bytes, bytes]] = [(bytes(a), bytes(b)) for a, b in merges]
        self.pattern = pattern
        self.special_tokens: list[str] = []
        self._special_ids: dict[str, int] = {}
        self._regular_ids: dict[bytes, int] = {}
        for i in sorted(self.vocab):
            self._regular_ids.setdefault(self.vocab[i], i)
        self._pat = regex.compile(pattern)
        self._ranks = {pair: r for r, pair in reversed(list(enumerate(self.merges)))}
        self._cache: dict[str, tuple[int, ...]] = {}
        self._fast: Any = None
        self._fast_built = False
        self._special_re: regex.Pattern | None = None
        self.add_special_tokens(list(special_tokens or []))

    # ------------------------------------------------------------------ vocabulary
    @property
    def vocab_size(self) -> int:
        """Number of embedding rows a model needs: the largest id + 1."""
        return max(self.vocab) + 1 if self.vocab else 0

    @property
    def eot_id(self) -> int | None:
        """Id of "<|endoftext|>", the document separator, or None when it is not a special token."""
        return self._special_ids.get(EOT)

    def special_token_id(self, token: str) -> int:
        """Id of a special token (KeyError with the known ones listed when it is not special)."""
        try:
            return self._special_ids[token]
        except KeyError:
            known = self.special_tokens
            raise KeyError(f"{token!r} is not a special token of this tokenizer; known: {known}") from None

    def add_special_tokens(self, tokens: Sequence[str]) -> list[int]:
        """Make `tokens` special (never split, never merged) and return their ids.

        A token whose bytes are already in the vocabulary keeps that id (GPT-2's "<|endoftext|>" is id
        50256 in vocab.json); otherwise it gets a fresh id at the end. Needed for SFT chat markers such as
        "<|im_start|>" / "<|im_end|>".
        """
        ids = []
        for tok in tokens:
            if tok in self._special_ids:
                ids.append(self._special_ids[tok])
                continue
            b = tok.encode("utf-8")
            existing = [i for i, v in self.vocab.items() if v == b]
            ids.append(self._register_special(tok, existing[0] if existing else self.vocab_size))
        return ids

    def _register_special(self, tok: str, i: int) -> int:
        b = tok.encode("utf-8")
        self.vocab[i] = b
        if self._regular_ids.get(b) == i:
            del self._regular_ids[b]
        self._special_ids[tok] = i
        self.special_tokens.append(tok)
        self._special_re = special_split_regex(self.special_tokens)
        self._fast, self._fast_built = None, False  # rebuilt lazily with the new specials
        return i

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (a special token: its UTF-8 text)."""
        return self.vocab[token_id]

    def token_byte_lengths(self, special_as_zero: bool = True) -> np.ndarray:
        """Bytes per id as an int64 array (for bits-per-byte); special tokens count 0 bytes by default."""
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for i, b in self.vocab.items():
            out[i] = len(b)
        if special_as_zero:
            for i in self._special_ids.values():
                out[i] = 0
        return out

    # ------------------------------------------------------------------ encoding
    def encode(self, text: str, allowed_special: AllowedSpecial = "all", backend: str = "auto") -> list[int]:
        """Text -> ids. Special tokens in `allowed_special` ("all", "none", or a set) become their ids;
        others are encoded as ordinary text. `backend`: "auto" (tiktoken when available), "fast", "python".
        """
        allowed = self._allowed(allowed_special)
        if backend != "python":
            fast = self.fast_encoding()
            if fast is not None:
                return self._encode_fast(fast, text, allowed)
            if backend == "fast":
                raise RuntimeError("the tiktoken fast backend is unavailable for this vocabulary")
        return self._encode_python(text, allowed)

    def encode_to_array(self, text: str, allowed_special: AllowedSpecial = "all") -> np.ndarray:
        """Like `encode` but returns an int64 numpy array (avoids a Python list for big texts)."""
        allowed = self._allowed(allowed_special)
        fast = self.fast_encoding()
        if fast is not None and self._id_map is None and not self._prefix_specials and hasattr(fast, "encode_to_numpy"):
            return fast.encode_to_numpy(_clean(text), allowed_special=allowed, disallowed_special=()).astype(np.int64)
        return np.asarray(self.encode(text, allowed_special), dtype=np.int64)

    def encode_iterable(self, iterable: Iterable[str], allowed_special: AllowedSpecial = "all") -> Iterator[int]:
        """Lazily encode a stream of strings (e.g. a file's lines) with bounded memory.

        Text is buffered until a cut that cannot change pre-tokenization (a non-space/space boundary outside
        any special token, see `last_safe_cut`), so the ids equal `encode("".join(iterable))` exactly.
        """
        pending: list[str] = []
        size = 0
        for chunk in iterable:
            pending.append(chunk)
            size += len(chunk)
            if size < _STREAM_CHUNK_CHARS:
                continue
            buf = "".join(pending)
            cut = last_safe_cut(buf, self.special_tokens)
            if cut > 0:
                yield from self.encode(buf[:cut], allowed_special)
                buf = buf[cut:]
            pending, size = [buf], len(buf)
        if pending:
            yield from self.encode("".join(pending), allowed_special)

    def _allowed(self, allowed_special: AllowedSpecial) -> frozenset[str]:
        if allowed_special == "all":
            return frozenset(self.special_tokens)
        if allowed_special == "none" or not allowed_special:
            return frozenset()
        unknown = set(allowed_special) - set(self.special_tokens)
        if unknown:
            raise ValueError(f"not special tokens of this tokenizer: {sorted(unknown)}")
        return frozenset(allowed_special)

    def _segments(self, text: str, allowed: frozenset[str]) -> Iterator[tuple[str, bool]]:
        """Split on allowed special tokens (longest first): yields (piece, is_special)."""
        if not allowed or self._special_re is None:
            yield text, False
            return
        pos = 0
        for m in self._special_re.finditer(text):
            if m.group() not in allowed:
                continue
            if m.start() > pos:
                yield text[pos : m.start()], False
            yield m.group(), True
            pos = m.end()
        if pos < len(text):
            yield text[pos:], False

    # The reference implementation: split, pre-tokenize, then apply merges by priority inside each word.
    def _encode_python(self, text: str, allowed: frozenset[str]) -> list[int]:
        text = _clean(text)
        ids: list[int] = []
        for piece, special in self._segments(text, allowed):
            if special:
                ids.append(self._special_ids[piece])
                continue
            for word in self._pat.findall(piece):
                cached = self._cache.get(word)
                if cached is None:
                    cached = self._bpe_word(word.encode("utf-8"))
                    if len(self._cache) < 100_000:
                        self._cache[word] = cached
                ids.extend(cached)
        return ids

    def _bpe_word(self, word: bytes) -> tuple[int, ...]:
        parts = [word[i : i + 1] for i in range(len(word))]
        ranks = self._ranks
        while len(parts) > 1:
            best_rank, best = None, None
            for pair in zip(parts, parts[1:]):
                r = ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best_rank, best = r, pair
            if best is None:
                break
            a, b = best
            merged, i, n = [], 0, len(parts)
            while i < n:
                if i + 1 < n and parts[i] == a and parts[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(self._regular_ids[p] for p in parts)

    # ------------------------------------------------------------------ fast backend
    def fast_encoding(self) -> Any:
        """The tiktoken.Encoding used by the fast path (None if tiktoken is missing or cannot express
        this vocabulary). Built once; tiktoken downloads nothing when given ranks directly."""
        if not self._fast_built:
            self._fast_built = True
            self._fast, self._id_map = _build_tiktoken(self)
            self._prefix_specials = any(
                a != b and b.startswith(a) for a in self.special_tokens for b in self.special_tokens
            )
        return self._fast

    def _encode_fast(self, fast: Any, text: str, allowed: frozenset[str]) -> list[int]:
        if self._prefix_specials and allowed:
            # tiktoken's special-token regex order is arbitrary, so overlapping specials are split here.
            ids: list[int] = []
            for piece, special in self._segments(text, allowed):
                if special:
                    ids.append(self._special_ids[piece])
                else:
                    ids.extend(self._map(fast.encode_ordinary(piece)))
            return ids
        return self._map(fast.encode(text, allowed_special=allowed, disallowed_special=()))

    def _map(self, ranks: list[int]) -> list[int]:
        if self._id_map is None:
            return ranks
        return self._id_map[np.asarray(ranks, dtype=np.int64)].tolist()

    # ------------------------------------------------------------------ decoding
    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text; byte sequences that are not valid UTF-8 become U+FFFD."""
        vocab = self.vocab
        try:
            data = b"".join([vocab[int(i)] for i in ids])
        except KeyError as exc:
            raise ValueError(f"token id {exc.args[0]} is outside the vocabulary (size {self.vocab_size})") from None
        return data.decode("utf-8", errors="replace")

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        """The JSON form: tokens written with GPT-2's byte-to-unicode mapping, so the file is readable."""
        return {
            "kind": self.kind,
            "version": 1,
            "pattern": self.pattern,
            "special_tokens": dict(self._special_ids),
            "vocab": {str(i): encode_token(b) for i, b in sorted(self.vocab.items())},
            "merges": [[encode_token(a), encode_token(b)] for a, b in self.merges],
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write one JSON file (atomically, so a crash never leaves a truncated tokenizer)."""
        with atomic_write(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BPETokenizer:
        vocab = {int(i): decode_token(t) for i, t in d["vocab"].items()}
        merges = [(decode_token(a), decode_token(b)) for a, b in d["merges"]]
        specials = d.get("special_tokens", {})
        for i in specials.values():
            vocab.pop(int(i), None)
        tok = cls(vocab, merges, None, d.get("pattern", GPT2_PATTERN))
        for s, i in specials.items():  # keep the saved ids exactly
            tok._register_special(s, int(i))
        return tok

    @classmethod
    def load(cls, path: str | os.PathLike) -> BPETokenizer:
        """Read a file written by `save` (see also `diyllm.tokenizers.load_tokenizer`)."""
        from diyllm.tokenizers import load_tokenizer

        tok = load_tokenizer(path)
        if not isinstance(tok, cls):
            raise UserError(f"{path} holds a {tok.kind!r} tokenizer, not a BPE one")
        return tok

    @classmethod
    def from_files(
        cls, vocab_path: str | os.PathLike, merges_path: str | os.PathLike, special_tokens: Sequence[str] | None = None
    ) -> BPETokenizer:
        """Load GPT-2-style files: vocab.json ({token: id}) and merges.txt ("a b" per line), both written
        with the byte-to-unicode mapping. GPT-2's own files give GPT-2's ids."""
        try:
            with open(vocab_path, encoding="utf-8") as f:
                raw = json.load(f)
            vocab = {int(i): decode_token(t) for t, i in raw.items()}
            merges = []
            with open(merges_path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    line = line.rstrip("\r\n")
                    if not line or (lineno == 1 and line.startswith("#version")):
                        continue
                    parts = line.split(" ")
                    if len(parts) != 2:
                        raise UserError(f"{merges_path}:{lineno}: expected two tokens separated by a space")
                    merges.append((decode_token(parts[0]), decode_token(parts[1])))
        except FileNotFoundError as exc:
            raise UserError(f"tokenizer file not found: {exc.filename}") from None
        except (json.JSONDecodeError, KeyError) as exc:
            raise UserError(f"cannot read GPT-2 style tokenizer files {vocab_path}, {merges_path}: {exc}") from None
        return cls(vocab, merges, special_tokens)

    def __repr__(self) -> str:
        n = len(self.merges)
        return f"BPETokenizer(vocab_size={self.vocab_size}, merges={n}, special_tokens={self.special_tokens})"


def _clean(text: str) -> str:
    """Lone surrogates cannot be UTF-8 encoded; turn them into U+FFFD the way tiktoken does."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def _build_tiktoken(tok: BPETokenizer) -> tuple[Any, np.ndarray | None]:
    """A tiktoken.Encoding equivalent to `tok`, plus a rank -> id table when ranks cannot equal ids.

    tiktoken merges, inside each pre-token, the adjacent pair whose concatenation has the lowest rank;
    that equals applying our merges in order when a merge's result ranks by merge position. Our trained
    ids already do (bytes 0..255, specials, then merges in order; gaps are fine for tiktoken), and so do
    GPT-2's, so ranks = ids and no translation is needed. Otherwise ranks are renumbered and mapped back.
    """
    try:
        import tiktoken
    except ImportError:
        return None, None
    single = {b: i for b, i in tok._regular_ids.items() if len(b) == 1}
    if len(single) != 256:
        return None, None  # tiktoken needs every byte to be a token
    merged: dict[bytes, int] = {}
    for a, b in tok.merges:
        m = a + b
        if m in tok._regular_ids and m not in merged:
            merged[m] = tok._regular_ids[m]
    order = list(merged.values())
    ids_ok = all(x < y for x, y in zip(order, order[1:])) and (not order or min(order) > max(single.values()))
    specials = dict(tok._special_ids)
    if ids_ok:
        ranks = {**single, **merged}
        id_map = None
    else:
        ranks = {bytes([i]): i for i in range(256)}
        for k, m in enumerate(merged):
            ranks[m] = 256 + k
        id_map_list = [single[bytes([i])] for i in range(256)] + list(merged.values())
        special_ranks = {}
        for s, i in specials.items():
            special_ranks[s] = len(id_map_list)
            id_map_list.append(i)
        specials = special_ranks
        id_map = np.asarray(id_map_list, dtype=np.int64)
    try:
        enc = tiktoken.Encoding(
            name=f"diyllm-bpe-{len(ranks)}", pat_str=tok.pattern, mergeable_ranks=ranks, special_tokens=specials
        )
    except Exception:  # noqa: BLE001 - any construction problem just means: use the Python path
        return None, None
    return enc, id_map
