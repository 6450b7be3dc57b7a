"""Autoregressive generation, with and without a KV cache, from one model `forward`.

Two ways to produce token t+1, which give the same tokens (tests check the logits agree to float32
tolerance):

* without a cache (`use_cache=False`, the readable reference): run the whole sequence through the model
  at every step and keep the last position's logits. Cost per step grows with the sequence length.
* with a cache (`use_cache=True`, the default): run the prompt once ("prefill"), which stores every
  layer's keys/values in a preallocated `KVCache`; then feed only the newest token per step. RoPE gets the
  token's true position, so the cached keys and the new query line up exactly as in the full forward.

Batches of prompts of different lengths are left-padded: every row ends at the same column, so one
decode step appends one column for all rows. Padding is excluded by a boolean attention mask and each
row's positions count only its real tokens (position 0 = its first real token). A padding query attends
to itself only, so its softmax row is never empty (an all -inf row would give NaN).

Context window: the model never reads more than `context_length` tokens. With `context="slide"` (the
default) the oldest tokens are dropped: the no-cache path crops to the last `context_length` tokens
every step; the cached path, when the cache is full, re-prefills the last 3/4 of the window and goes on
(re-prefilling every step would cost as much as not caching). The two paths therefore agree exactly up
to the first overflow and only approximately after it. With `context="stop"` generation ends with a
`ContextFullWarning` instead.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from diyllm.generation.sampling import CONTEXT_MODES, SamplingParams, TokenPicker
from diyllm.generation.steps import (  # noqa: F401  (ContextFullWarning, DecodeStep re-exported here)
    ContextFullWarning,
    DecodeStep,
    decode_steps,
    left_padded_prompts,
)
from diyllm.model.kv_cache import KVCache
from diyllm.model.layers import frozen_fused_weights
from diyllm.model.quantize import quantized_for

__all__ = ["CONTEXT_MODES", "ContextFullWarning", "DecodeStep", "SamplingParams", "generate", "iter_steps", "stream"]


def _as_batch(prompt_ids: Sequence[int] | Sequence[Sequence[int]]) -> tuple[list[list[int]], bool]:
    """Normalise to a list of prompts; also say whether the caller passed a single prompt."""
    if len(prompt_ids) == 0:
        raise ValueError("empty prompt: give at least one token id (e.g. the tokenizer's end-of-text id)")
    single = not isinstance(prompt_ids[0], (list, tuple)) and not (
        isinstance(prompt_ids[0], torch.Tensor) and prompt_ids[0].dim() > 0
    )
    batch = [list(map(int, prompt_ids))] if single else [list(map(int, p)) for p in prompt_ids]
    for i, p in enumerate(batch):
        if not p:
            raise ValueError(f"prompt {i} is empty: give at least one token id (e.g. the end-of-text id)")
    return batch, single


def iter_steps(
    model: nn.Module,
    prompt_ids: Sequence[int] | Sequence[Sequence[int]],
    max_new_tokens: int,
    params: SamplingParams | None = None,
    **options: Any,
) -> Iterator[DecodeStep]:
    """The decoding loop itself: yields one `DecodeStep` per new token (for the whole batch).

    `params` (a SamplingParams) and/or its fields as keywords (temperature=0, stop_ids=[...], ...) say how
    to sample. `generate` and `stream` are thin wrappers; use this when you need the logits (tests,
    analysis). The model is put in eval mode for the duration and restored afterwards.
    """
    prompts, _ = _as_batch(prompt_ids)
    params = SamplingParams.from_options(params, **options)
    if max_new_tokens <= 0:
        return
    if params.quantize != "none":  # decode with the int8 copy (made once per weights' version)
        model = quantized_copy(model, params.quantize)
    was_training = model.training
    model.eval()
    try:
        with frozen_fused_weights(model):  # stack q|k|v and w1|w3 once, not at every step
            if params.compile:  # static KV cache + torch.compile'd step (generation/compiled.py)
                from diyllm.generation.compiled import decode_compiled

                yield from decode_compiled(model, prompts, max_new_tokens, params)
                return
            yield from _decode(model, prompts, max_new_tokens, params)
    finally:
        model.train(was_training)


# model -> {scheme: (the weights' versions when quantized, the quantized copy)}; weak: a dropped model
# frees its copies
_QUANTIZED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def quantized_copy(model: nn.Module, scheme: str = "int8") -> nn.Module:
    """The int8 ("int8" or "w8a8") copy of `model` for decoding, remade when its weights changed (an
    optimizer step or a load bumps every tensor's version counter) so that generation never runs stale
    weights."""
    versions = tuple(p._version for p in model.parameters())
    copies = _QUANTIZED.setdefault(model, {})
    cached = copies.get(scheme)
    if cached is None or cached[0] != versions:
        cached = copies[scheme] = (versions, quantized_for(model, scheme))
    return cached[1]


@torch.inference_mode()
def _decode(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, params: SamplingParams
            ) -> Iterator[DecodeStep]:
    context = params.context
    param = next(model.parameters())
    device, ctx = param.device, model.config.context_length
    B = len(prompts)
    # The whole sequence so far (prompt + generated), left-padded, and which columns are real tokens.
    seq, real, L = left_padded_prompts(prompts, max_new_tokens, ctx, context, device)
    padded = any(len(p) != L for p in prompts)
    n = L  # columns filled so far

    def window(start: int, end: int):
        """Inputs for a forward over columns start..end-1: ids, per-row positions and mask (None if unpadded)."""
        ids = seq[:, start:end]
        if not padded:
            return ids, None, None
        ok = real[:, start:end]
        positions = (ok.long().cumsum(dim=1) - 1).clamp_(min=0)
        T = end - start
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril_()
        mask = (causal & ok[:, None, :]) | torch.eye(T, dtype=torch.bool, device=device)
        return ids, positions, mask[:, None]  # mask (B, 1, T, T): broadcast over heads

    def full_forward(start: int, end: int, cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        ids, positions, mask = window(start, end)
        logits = model(ids, positions=positions, attn_mask=mask, kv_cache=cache, last_logits_only=True).logits
        return logits[:, -1], (positions[:, -1:] + 1 if positions is not None else None)

    cache = KVCache.for_model(model, B, ctx) if params.use_cache else None
    keep = max(1, ctx - ctx // 4)  # tokens kept when the cached path slides its window
    cache_start = max(0, n - ctx)
    logits, next_pos = full_forward(cache_start, n, cache)

    picker = TokenPicker(params, seq[:, :L], real[:, :L], model.config.vocab_size)

    def next_logits(n: int, tok: torch.Tensor) -> torch.Tensor:
        """Feed the token just written at column n-1; return the logits of the next one."""
        nonlocal cache_start, next_pos
        if cache is None:
            return full_forward(max(0, n - ctx), n)[0]
        if cache.length >= ctx:  # full: restart the cache from the most recent `keep` tokens
            cache.reset()
            cache_start = n - keep
            logits, next_pos = full_forward(cache_start, n, cache)
            return logits
        mask = real[:, None, None, cache_start:n] if padded else None  # (B, 1, 1, keys)
        out = model(seq[:, n - 1 : n], positions=next_pos, attn_mask=mask, kv_cache=cache, last_logits_only=True)
        if next_pos is not None:
            next_pos = next_pos + 1
        return out.logits[:, -1]

    yield from decode_steps(picker, seq, real, n, logits, max_new_tokens, context, ctx, next_logits)


def generate(
    model: nn.Module,
    prompt_ids: Sequence[int] | Sequence[Sequence[int]],
    max_new_tokens: int,
    params: SamplingParams | None = None,
    **options: Any,
) -> list[list[int]]:
    """Generate up to `max_new_tokens` after each prompt; returns the new ids of every row.

    `prompt_ids` is one prompt (list of ids) or a batch (list of lists, any lengths). Sampling: `params`
    and/or SamplingParams fields as keywords. A row ends at its first id in `stop_ids`, which is not
    included in the result. temperature=0 is greedy decoding; `seed` makes sampling reproducible (same
    seed, same prompts, same samples).
    """
    prompts, _ = _as_batch(prompt_ids)
    params = SamplingParams.from_options(params, **options)
    steps = iter_steps(model, prompts, max_new_tokens, params)
    # Collect on the device and convert once at the end: no host sync per token.
    collected = [s.tokens for s in steps]
    if not collected:
        return [[] for _ in prompts]
    rows = torch.stack(collected, dim=1).tolist()
    stops = set(params.stop_ids)
    out = []
    for row in rows:
        cut = next((i for i, t in enumerate(row) if t in stops), len(row))
        out.append(row[:cut])
    return out


def stream(
    model: nn.Module,
    prompt_ids: Sequence[int] | Sequence[Sequence[int]],
    max_new_tokens: int,
    params: SamplingParams | None = None,
    **options: Any,
) -> Iterator[int] | Iterator[list[int | None]]:
    """Like `generate`, but yields tokens as soon as they are produced.

    For a single prompt (list of ids) it yields ints and ends at a stop token (not yielded). For a batch
    it yields one list per step with an int for each row still running and None for finished rows.
    """
    prompts, single = _as_batch(prompt_ids)
    params = SamplingParams.from_options(params, **options)
    stops = set(params.stop_ids)
    steps = iter_steps(model, prompts, max_new_tokens, params)
    for s in steps:
        tokens, finished = s.tokens.tolist(), s.finished.tolist()
        if single:
            if tokens[0] in stops:
                return
            yield tokens[0]
        else:
            yield [None if f or t in stops else t for t, f in zip(tokens, finished)]
