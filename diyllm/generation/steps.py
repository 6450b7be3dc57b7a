"""What a decoding loop yields, and the parts of the loop shared by the eager decoder (generate.py) and the
compiled one (compiled.py): the left-padded batch and the token loop."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch


class ContextFullWarning(RuntimeWarning):
    """Generation stopped early because the next token would not fit in the model's context window."""


@dataclass
class DecodeStep:
    """What one decoding step produced, for every row of the batch.

    tokens: (B,) the sampled ids. logits: (B, V) the model's raw logits they were sampled from (before
    repetition penalty / temperature / filtering). finished: (B,) True for rows that had already hit a
    stop token before this step (their token is filler and must be ignored).
    """

    tokens: torch.Tensor
    logits: torch.Tensor
    finished: torch.Tensor


def left_padded_prompts(prompts: list[list[int]], max_new_tokens: int, ctx: int, context: str,
                        device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(seq, real, L): the whole sequence to be (B, L + max_new_tokens), prompts left-padded to the longest
    (L) so every row's next token lands in the same column, and which columns hold real tokens.
    With context="stop" a prompt longer than the context window is refused here."""
    B, L = len(prompts), max(len(p) for p in prompts)
    if context == "stop" and ctx < L:
        raise ValueError(f"prompt of {L} tokens exceeds the model's context_length={ctx}; shorten it or use "
                         "context='slide' to keep only its last tokens")
    seq = torch.zeros(B, L + max_new_tokens, dtype=torch.long)
    real = torch.zeros(B, L + max_new_tokens, dtype=torch.bool)
    for b, p in enumerate(prompts):
        seq[b, L - len(p) : L] = torch.tensor(p)
        real[b, L - len(p) : L] = True
    return seq.to(device), real.to(device), L


def decode_steps(picker: Any, seq: torch.Tensor, real: torch.Tensor, n: int, logits: torch.Tensor,
                 max_new_tokens: int, context: str, ctx: int,
                 next_logits: Callable[[int, torch.Tensor], torch.Tensor]) -> Iterator[DecodeStep]:
    """The token loop both decoders share: pick a token from `logits`, write it at column `n`, yield it,
    stop on stop ids / the token budget / a full window with context="stop", else ask the decoder for the
    next logits: `next_logits(n, tok)` with n the number of columns now filled (the eager KV cache or the
    compiled static one; each keeps its own cache bookkeeping)."""
    for step in range(max_new_tokens):
        tok = picker.pick(logits)
        seq[:, n] = tok
        real[:, n] = True
        n += 1
        yield DecodeStep(tok, logits, picker.finished)
        if picker.stopped(tok) or step == max_new_tokens - 1:
            return
        if context == "stop" and n > ctx:
            warnings.warn(ContextFullWarning(
                f"stopped after {step + 1} new tokens: the sequence reached the context window of {ctx} tokens "
                "(use context='slide' to keep going with the most recent tokens)"), stacklevel=3)
            return
        logits = next_logits(n, tok)
