"""A character-level tokenizer: one id per distinct character of the corpus (nanoGPT's shakespeare_char).

Useful as the simplest possible baseline: no merges, ids are the sorted distinct characters, so the
vocabulary is tiny (65 for Shakespeare) and every token is exactly one character.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from diyllm.atomic import atomic_write
from diyllm.errors import UserError


class CharTokenizer:
    """Ids are positions in `chars`, the corpus's distinct characters sorted by code point."""

    kind = "char"

    def __init__(self, chars: Iterable[str]) -> None:
        self.chars: list[str] = sorted(set(chars))
        if any(len(c) != 1 for c in self.chars):
            raise ValueError("CharTokenizer entries must be single characters")
        self._stoi = {c: i for i, c in enumerate(self.chars)}
        # Sorted code points allow vectorised encoding with np.searchsorted.
        self._codepoints = np.fromiter((ord(c) for c in self.chars), dtype=np.uint32, count=len(self.chars))
        self.special_tokens: list[str] = []
        self.eot_id: int | None = None  # documents are concatenated without a separator

    @classmethod
    def train(cls, texts: str | Iterable[str]) -> CharTokenizer:
        """Vocabulary = distinct characters of `texts` (a string or an iterable of strings, streamed)."""
        if isinstance(texts, str):
            texts = [texts]
        seen: set[str] = set()
        for t in texts:
            seen.update(t)
        if not seen:
            raise UserError("cannot build a character vocabulary from an empty corpus")
        return cls(seen)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    @property
    def vocab(self) -> dict[int, bytes]:
        """id -> UTF-8 bytes of the character (same shape as BPETokenizer.vocab)."""
        return {i: c.encode("utf-8") for i, c in enumerate(self.chars)}

    def encode(self, text: str, allowed_special: Any = "all") -> list[int]:
        """Text -> ids; a character outside the vocabulary is an error naming it and its position."""
        return self.encode_to_array(text).tolist()

    def encode_to_array(self, text: str, allowed_special: Any = "all") -> np.ndarray:
        """Vectorised encode: UTF-32 code points looked up in the sorted code point table."""
        cps = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
        if len(self._codepoints) == 0:
            idx = np.zeros(len(cps), dtype=np.int64)
        else:
            idx = np.searchsorted(self._codepoints, cps).astype(np.int64)
        bad = (idx >= len(self._codepoints)) | (self._codepoints[np.minimum(idx, len(self._codepoints) - 1)] != cps)
        if len(cps) and bad.any():
            pos = int(np.argmax(bad))
            ch = text[pos]
            raise ValueError(f"character {ch!r} (U+{ord(ch):04X}) at position {pos} is not in the vocabulary")
        return idx

    def encode_iterable(self, iterable: Iterable[str], allowed_special: Any = "all"):  # noqa: ANN201
        """Lazily encode a stream of strings (characters never interact, so chunks encode independently)."""
        for chunk in iterable:
            yield from self.encode(chunk)

    def decode(self, ids: Iterable[int]) -> str:
        try:
            return "".join([self.chars[int(i)] for i in ids])
        except IndexError:
            raise ValueError(f"token id out of range for a vocabulary of {self.vocab_size}") from None

    def token_bytes(self, token_id: int) -> bytes:
        return self.chars[token_id].encode("utf-8")

    def token_byte_lengths(self, special_as_zero: bool = True) -> np.ndarray:
        return np.asarray([len(c.encode("utf-8")) for c in self.chars], dtype=np.int64)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "version": 1, "chars": "".join(self.chars)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CharTokenizer:
        return cls(d["chars"])

    def save(self, path: str | os.PathLike) -> None:
        with atomic_write(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, ensure_ascii=False)

    @classmethod
    def load(cls, path: str | os.PathLike) -> CharTokenizer:
        from diyllm.tokenizers import load_tokenizer

        tok = load_tokenizer(path)
        if not isinstance(tok, cls):
            raise UserError(f"{path} holds a {tok.kind!r} tokenizer, not a char one")
        return tok

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"
