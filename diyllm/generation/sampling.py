"""Turning next-token logits into a token: greedy, temperature, top-k, top-p and repetition penalty.

Every function works on a (batch, vocab) tensor on the model's device, so sampling never leaves the
GPU and never loops over the vocabulary in Python. Filters set the logits of excluded tokens to -inf;
the softmax then gives them probability exactly 0.

Order of operations (the common convention): repetition penalty -> temperature -> top-k -> top-p ->
sample. Temperature 0 means greedy (argmax after the repetition penalty).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from diyllm.model.quantize import QUANTIZE_CHOICES

CONTEXT_MODES = ("slide", "stop")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token, and when to stop: the options generate / stream / iter_steps share.

    temperature 0 is greedy; top_k / top_p restrict the candidates (None: off); repetition_penalty > 1
    discourages tokens already in the sequence; a row ends at its first id in stop_ids; seed makes
    sampling reproducible; use_cache=False takes the readable no-cache path; context "slide" drops the
    oldest tokens when the window is full, "stop" ends generation; vocab_limit forbids ids >= it (a model
    whose embedding is larger than its tokenizer must never emit an id without text).
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    stop_ids: tuple[int, ...] = ()
    seed: int | None = None
    use_cache: bool = True
    context: str = "slide"
    vocab_limit: int | None = None
    compile: bool = False  # issue 19: static KV cache + a torch.compile'd decode step (generation/compiled.py)
    quantize: str = "none"  # "int8": an int8-weight bfloat16 copy of the model; "w8a8": int8 activations too
    # (model/quantize.py)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))
        if self.context not in CONTEXT_MODES:
            raise ValueError(f"context={self.context!r} must be one of {CONTEXT_MODES}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.quantize not in QUANTIZE_CHOICES:
            raise ValueError(f"quantize={self.quantize!r} must be one of {QUANTIZE_CHOICES}")
        if self.compile and not self.use_cache:
            raise ValueError("compile=True decodes with a static KV cache; it cannot be combined with use_cache=False")

    @classmethod
    def from_options(cls, params: SamplingParams | None = None, **options: Any) -> SamplingParams:
        """`params` with keyword options laid over it (the keyword-style call sites: temperature=0, ...)."""
        unknown = set(options) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"unknown sampling option(s) {sorted(unknown)}; see SamplingParams")
        if "stop_ids" in options and isinstance(options["stop_ids"], Sequence):
            options["stop_ids"] = tuple(options["stop_ids"])
        return dataclasses.replace(params, **options) if params is not None else cls(**options)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make tokens already in the sequence less likely (the CTRL paper's rule).

    A positive logit is divided by `penalty`, a negative one multiplied by it, so penalty > 1 always
    lowers the score of a seen token whatever its sign. `seen` is a (batch, vocab) boolean tensor.
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the k highest logits of each row (ties broken by torch.topk), -inf elsewhere."""
    if k <= 0:
        raise ValueError(f"top_k must be positive, got {k}")
    if k >= logits.shape[-1]:
        return logits
    values, indices = torch.topk(logits, k, dim=-1)
    return torch.full_like(logits, float("-inf")).scatter_(-1, indices, values)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability sums to >= p.

    A token is dropped when the probability mass of the tokens ranked above it already reaches p; the
    most likely token is always kept, so the result is never empty.
    """
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop = mass_before >= p
    drop[..., 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def filter_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Scale by 1/temperature, then apply top-k and top-p: the logits `sample_next` draws from."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return logits


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token id per row of `logits` (batch, vocab) -> (batch,) int64, on the same device."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(filter_logits(logits, temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class TokenPicker:
    """Choosing each next token of a batch, the same way in the eager and the compiled decoder: repetition
    penalty over the ids each row has seen, ids past the tokenizer forbidden, then `sample_next` with a
    seeded generator; `stopped(tok)` marks rows that hit a stop id and says when every row has.

    `seq` / `real` are the (B, ·) left-padded prompt ids and their real-token mask (only read here);
    `finished` is the (B,) mask of rows that had stopped before the last picked token."""

    def __init__(self, params: SamplingParams, seq: torch.Tensor, real: torch.Tensor, vocab_size: int):
        device, batch = seq.device, seq.shape[0]
        self.params = params
        self.generator = torch.Generator(device=device).manual_seed(params.seed) if params.seed is not None else None
        self.seen = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(batch, vocab_size, dtype=torch.bool, device=device)
            self.seen.scatter_(1, seq, real)
        self.stop_t = torch.tensor(params.stop_ids, dtype=torch.long, device=device) if params.stop_ids else None
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.no_text = None  # ids beyond the tokenizer's vocabulary
        if params.vocab_limit is not None and params.vocab_limit < vocab_size:
            self.no_text = torch.arange(vocab_size, device=device) >= params.vocab_limit

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token of every row, (B,), from the model's raw logits (B, V)."""
        p = self.params
        scores = apply_repetition_penalty(logits, self.seen, p.repetition_penalty) if self.seen is not None else logits
        if self.no_text is not None:
            scores = scores.masked_fill(self.no_text, float("-inf"))
        tok = sample_next(scores, p.temperature, p.top_k, p.top_p, self.generator)
        if self.seen is not None:
            self.seen.scatter_(1, tok[:, None], True)
        return tok

    def stopped(self, tok: torch.Tensor) -> bool:
        """Record rows whose token `tok` is a stop id; True once every row has stopped."""
        if self.stop_t is None:
            return False
        self.finished = self.finished | torch.isin(tok, self.stop_t)  # a new tensor: yielded ones stay as they were
        return bool(self.finished.all())
