"""GPT-2's byte <-> printable-character mapping, used by vocab.json / merges.txt files.

GPT-2 stores tokens as text, so every byte needs a visible, non-whitespace character: printable Latin-1
bytes map to themselves and the other 68 bytes (controls, space, ...) map to U+0100 onwards in byte order
(space -> 'Ġ' U+0120, newline -> 'Ċ' U+010A).
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """The 256-entry bijection byte value -> single printable character."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


@lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    """Inverse of `bytes_to_unicode`."""
    return {c: b for b, c in bytes_to_unicode().items()}


def encode_token(token: bytes) -> str:
    """Token bytes -> the GPT-2 file representation."""
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def decode_token(text: str) -> bytes:
    """GPT-2 file representation -> token bytes (KeyError on a character outside the mapping)."""
    table = unicode_to_bytes()
    return bytes(table[c] for c in text)
