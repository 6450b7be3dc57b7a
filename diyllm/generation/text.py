"""Text in, text out: generation with a tokenizer, stop strings and streamed text pieces.

Token ids do not map one-to-one to characters: a byte-level BPE token can hold half of a UTF-8
character, and a stop string can span several tokens. `stream_text` therefore decodes the whole reply
so far after each token and emits only the new, settled part: text ending in an incomplete character
(decoded as U+FFFD) or in a possible beginning of a stop string is held back until the next token
decides it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from torch import nn

from diyllm.generation.generate import stream
from diyllm.generation.sampling import SamplingParams

REPLACEMENT_CHAR = "\ufffd"


def _held_back(text: str, stop_strings: Sequence[str]) -> int:
    """How many trailing characters of `text` could still grow into a stop string (or a full character)."""
    hold = 0
    for s in stop_strings:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    if text.endswith(REPLACEMENT_CHAR):
        hold = max(hold, len(text) - len(text.rstrip(REPLACEMENT_CHAR)))
    return hold


def stream_text(
    model: nn.Module,
    tokenizer: Any,
    prompt: str | Sequence[int],
    max_new_tokens: int = 256,
    stop_strings: Sequence[str] = (),
    stop_at_eot: bool = True,
    stats: dict | None = None,
    params: SamplingParams | None = None,
    **options: Any,
) -> Iterator[str]:
    """Yield the reply to `prompt` piece by piece, as text.

    `prompt` is a string (encoded with `tokenizer`) or already-encoded ids. Generation ends at a stop
    string (not included), at one of the sampling stop_ids, at the tokenizer's end-of-text token when
    `stop_at_eot`, or after `max_new_tokens`. Sampling: `params` (SamplingParams) and/or its fields as
    keywords (temperature, top_k, top_p, repetition_penalty, seed, use_cache, context). A `stats` dict,
    when given, receives "num_tokens" (new tokens generated, for throughput prints).
    """
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    params = SamplingParams.from_options(params, **options)
    stop_ids = list(params.stop_ids)
    eot = getattr(tokenizer, "eot_id", None)
    if stop_at_eot and eot is not None and eot not in stop_ids:
        stop_ids.append(eot)
    limit = params.vocab_limit
    if limit is None and getattr(tokenizer, "vocab_size", None):
        limit = tokenizer.vocab_size  # never sample an id the tokenizer cannot decode
    params = SamplingParams.from_options(params, stop_ids=stop_ids, vocab_limit=limit)
    new_ids: list[int] = []
    emitted = 0
    tokens = stream(model, ids, max_new_tokens, params)
    try:
        for tok in tokens:
            new_ids.append(tok)
            if stats is not None:
                stats["num_tokens"] = len(new_ids)
            text = tokenizer.decode(new_ids)
            hit = min((i for i in (text.find(s, max(0, emitted - len(s))) for s in stop_strings) if i >= 0),
                      default=-1)
            if hit >= 0:
                if hit > emitted:
                    yield text[emitted:hit]
                return
            settled = len(text) - _held_back(text, stop_strings)
            if settled > emitted:
                yield text[emitted:settled]
                emitted = settled
        text = tokenizer.decode(new_ids)
        if len(text) > emitted:  # the end: flush what was held back (it did not become a stop string)
            yield text[emitted:]
    finally:
        tokens.close()


def generate_text(
    model: nn.Module,
    tokenizer: Any,
    prompt: str | Sequence[int],
    max_new_tokens: int = 256,
    stop_strings: Sequence[str] = (),
    stop_at_eot: bool = True,
    params: SamplingParams | None = None,
    **options: Any,
) -> str:
    """The reply to `prompt` as one string (see `stream_text` for the stopping rules and options)."""
    return "".join(stream_text(model, tokenizer, prompt, max_new_tokens, stop_strings, stop_at_eot,
                               params=params, **options))
