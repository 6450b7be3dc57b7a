"""What a decoding loop yields, shared by the eager loop (generate.py) and the compiled one (compiled.py)."""

from __future__ import annotations

from dataclasses import dataclass

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
