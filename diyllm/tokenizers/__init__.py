"""Tokenizers: byte-level BPE (trainable, GPT-2 compatible, tiktoken-fast) and a character tokenizer.

Both are saved as one JSON file with a "kind" field; `load_tokenizer` reads either.
"""

from __future__ import annotations

import json
import os
from typing import Union

from diyllm.errors import UserError
from diyllm.tokenizers.bpe import BPETokenizer
from diyllm.tokenizers.char import CharTokenizer
from diyllm.tokenizers.pretokenize import GPT2_PATTERN
from diyllm.tokenizers.train import train_bpe

Tokenizer = Union[BPETokenizer, CharTokenizer]  # noqa: UP007 - also used at runtime on 3.10

_KINDS = {"bpe": BPETokenizer, "char": CharTokenizer}


def byte_tokenizer() -> BPETokenizer:
    """256 byte tokens + <|endoftext|>: no tokenizer training, and letters stay visible to the model."""
    return BPETokenizer({i: bytes([i]) for i in range(256)}, [], special_tokens=["<|endoftext|>"])


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer JSON file written by `.save()`, whatever its kind."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise UserError(f"tokenizer file not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a folder; pass the tokenizer JSON file (e.g. {path}/tokenizer.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not a valid tokenizer file (corrupt JSON: {exc})") from None
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind not in _KINDS:
        raise UserError(f"{path}: unknown tokenizer kind {kind!r}; expected one of {sorted(_KINDS)}")
    try:
        return _KINDS[kind].from_dict(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path}: malformed {kind} tokenizer file ({type(exc).__name__}: {exc})") from None


__all__ = ["BPETokenizer", "CharTokenizer", "GPT2_PATTERN", "Tokenizer", "byte_tokenizer", "load_tokenizer",
           "train_bpe"]
