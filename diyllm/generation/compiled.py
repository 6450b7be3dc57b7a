"""Compiled decoding: a static KV cache and one decode step, compiled once per process.

A cached decode step of a small model is a few hundred tiny ops; in eager mode each costs launch and
Python overhead, far more than reading the weights. Here the step `model(token, positions, mask,
StaticKVCache)` writes into one preallocated cache whose tensors never change shape or address, so
`torch.compile` builds it once: on CPU inductor emits fused C++ loops, on CUDA `mode="reduce-overhead"`
replays it as a CUDA graph. A boolean mask hides the cache's unused columns. On CUDA attention reads all
of them (a graph replays fixed shapes); on CPU the mask, and so attention, covers only the leading
`span` columns that can be visible, a dimension compiled as dynamic (one graph for every width): early
in a generation most of the cache is unfilled, and reading it was a quarter of an int8 step's time.
The prompt ("prefill", a different shape each time) runs eagerly into the same cache. Sampling
(temperature, top-k, top-p, repetition penalty) runs on the device after the step, with the same
functions as the eager path, so the two give the same tokens.

    generate(model, ids, 200, temperature=0, compile=True)      # or: diyllm sample --compile

The compiled step is kept per (model, batch size, dtype, device) for the life of the process: the compile time
(reported once, `compile_seconds`) is paid by the first generation only. Where compiling cannot work
(no C++ compiler, an old torch, an unsupported op) decoding falls back to the eager step with one warning.
`decode_compiled` is the entry point a server can call directly (it yields `DecodeStep`s like
`iter_steps`). On CPU the step skips Dynamo's per-call checks of the model and checks a structural
signature once per generation instead (generation/step_guards.py).
"""

from __future__ import annotations

import time
import warnings
import weakref
from collections.abc import Iterator

import torch
from torch import nn

from diyllm.generation import step_guards
from diyllm.generation.sampling import SamplingParams, TokenPicker
from diyllm.generation.steps import decode_steps, left_padded_prompts
from diyllm.model.kv_cache import StaticKVCache

# model -> {(batch, dtype): StaticDecoder}; weak, so a dropped model frees its caches and graphs.
_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_WARNED: set[str] = set()
# The CPU step reads the cache columns up to the newest token, rounded up to a multiple of this. The
# graph does not care (the span is a dynamic size); 1, 16 and 64 measured the same within noise on
# benchmarks/bench_generate.py's medium shape, and 16 keeps the attention loops in whole vector blocks.
SPAN_MULTIPLE = 16
# Inductor's C++ wrapper on CPU: the compiled step calls its kernels from C++, not from generated Python
# (about a hundred kernel calls per token). benchmarks/bench_generate.py's medium int8 step: 962 -> 1403
# tokens/s; a cold compile takes as long either way (~26 s), a cached one ~5 s.
CPU_OPTIONS = {"cpp_wrapper": True}


class CompiledDecodeWarning(RuntimeWarning):
    """Compiled decoding was asked for but could not be used; decoding runs eagerly instead."""


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(CompiledDecodeWarning(msg), stacklevel=3)


def _step(model: nn.Module, cache: StaticKVCache, tokens: torch.Tensor, positions: torch.Tensor,
          visible: torch.Tensor) -> torch.Tensor:
    """One decode step: logits (B, V) of the token after `tokens` (B, 1), which sit at `positions`
    (B, 1) and are written to cache column `cache.index`. `visible` (B, span): the cache's first `span`
    columns of `cache.visible`; attention reads no further. The function that gets compiled."""
    mask = visible[:, None, None, :]  # (B, 1, 1, span): broadcast over heads and the one query
    return model(tokens, positions=positions, attn_mask=mask, kv_cache=cache, last_logits_only=True).logits[:, -1]


def compile_unavailable_reason(device: torch.device) -> str | None:
    """Why torch.compile cannot run here, or None if it should."""
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    if device.type == "cpu":
        from shutil import which

        if not any(which(cc) for cc in ("g++", "c++", "clang++")):
            return "no C++ compiler (g++/clang++) for inductor's CPU backend"
    elif device.type not in ("cuda",):
        return f"compiled decoding supports cpu and cuda, not {device.type}"
    return None


class StaticDecoder:
    """A StaticKVCache plus the compiled step for one model, batch size and dtype."""

    def __init__(self, model: nn.Module, batch_size: int, compile: bool = True, per_row: bool = False):
        param = next(model.parameters())
        self.device = param.device  # the model itself is not kept: _DECODERS must not hold it alive
        self.max_len = model.config.context_length
        # per_row: each row writes at its own cache.row_columns[b] (a server's slots, serving/slots.py)
        self.per_row = per_row
        self.cache = StaticKVCache.for_model(model, batch_size, self.max_len, per_row=per_row)
        self.decode_index = self.cache.index
        self.tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
        self.compile_seconds: float | None = None  # set by the first compiled step
        self.full_span = self.device.type == "cuda"  # a CUDA graph replays one shape: always all max_len
        self.last_span = 0  # columns the latest step read (for tests and curious readers)
        self._span: torch.Tensor | None = None  # the CPU step's (B, span) mask input (_span_mask)
        self._rows_cut: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # per_row: _row_views
        self.step_fn = _step
        self.signature: tuple | None = None  # set where a compiled step relies on it (CPU)
        self.options: dict = {}  # inductor options the step was compiled with
        if compile:
            reason = compile_unavailable_reason(self.device)
            if reason:
                _warn_once(f"compiled decoding unavailable ({reason}); decoding eagerly")
            else:
                self._compile(model, batch_size)

    def fits(self, model: nn.Module) -> bool:
        """Whether `model` still has the structure this decoder's step was compiled for."""
        return self.signature is None or self.signature == step_guards.structure_signature(model)

    def _compile(self, model: nn.Module, batch_size: int, options: dict | None = None) -> None:
        options = (CPU_OPTIONS if self.device.type == "cpu" else {}) if options is None else options
        self.options = options
        if self.device.type == "cpu" and step_guards.CAN_SKIP_MODEL_GUARDS:  # one graph per structure
            self.signature = step_guards.structure_signature(model)
            key = (batch_size, self.per_row, self.signature, tuple(sorted(options.items())))
            self.step_fn = step_guards.shared_step(_step, key, options)
            return
        mark = getattr(getattr(torch, "_dynamo", None), "mark_static_address", None)
        if mark is not None:  # fixed addresses: CUDA graphs read them in place instead of copying
            for t in [*self.cache.tensors(), self.tokens, self.positions]:
                mark(t)
        mode = "reduce-overhead" if self.device.type == "cuda" else None
        # dynamic=False: every size is static except the one `step` marks dynamic (the CPU span). CUDA
        # keeps the full static span on purpose: its CUDA graphs would be re-recorded for every new width.
        self.step_fn = torch.compile(_step, mode=mode, dynamic=False, fullgraph=True, options=options or None)

    def span(self, column: int) -> int:
        """How many leading cache columns the step writing `column` reads: every column that can be
        visible (0..column), rounded up to a multiple of SPAN_MULTIPLE, at most max_len; on CUDA always
        max_len (a new width would record a new CUDA graph)."""
        if self.full_span:
            return self.max_len
        return min(self.max_len, -(-(column + 1) // SPAN_MULTIPLE) * SPAN_MULTIPLE)

    def step(self, model: nn.Module, column: int, rows: int | None = None) -> torch.Tensor:
        """Run the decode step of `model` on self.tokens/self.positions, writing cache column `column`
        (self.decode_index holds it too, as a tensor for the graph). rows (per_row decoders, at least 2):
        only the first `rows` rows, a size the graph takes as dynamic (a server's active slots); `column`
        is then the furthest column any of them writes."""
        self.last_span = self.span(column)
        visible, tokens, positions = self.cache.visible[:, : self.last_span], self.tokens, self.positions
        if rows is not None:
            visible, (tokens, positions) = visible[:rows], self._row_views(rows)
        if not self.full_span:  # one graph for every span width, not a recompile per width
            visible = self._span_mask(visible)
        args = (model, self.cache, tokens, positions, visible)
        if self.compile_seconds is None and self.step_fn is not _step:
            start = time.perf_counter()
            try:
                logits = self.step_fn(*args)
            except Exception as exc:  # inductor/dynamo failures vary widely: fall back, say so once
                why = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
                if self.options:  # e.g. the C++ wrapper on an older torch: the plain compile may still work
                    _warn_once(f"compiling the decode step with {self.options} failed ({why}); compiling it "
                               "without those options")
                    self._compile(model, self.tokens.shape[0], options={})
                    return self.step(model, column, rows)
                _warn_once(f"compiled decoding failed ({why}); decoding eagerly")
                self.step_fn = _step
                return _step(*args)
            self.compile_seconds = time.perf_counter() - start
            return logits
        return self.step_fn(*args)

    def _span_mask(self, visible: torch.Tensor) -> torch.Tensor:
        """`visible` (B, span) copied into a contiguous tensor of its own, kept while the span stays the same
        (SPAN_MULTIPLE steps): the view's row stride (max_len) would be one more size to guard on, and
        marking a new tensor's span as dynamic at every step costs more than the copy."""
        if self._span is None or self._span.shape != visible.shape:
            self._span = torch.empty_like(visible, memory_format=torch.contiguous_format)
            torch._dynamo.mark_dynamic(self._span, 1, min=2, max=self.max_len)
            if self.per_row:
                torch._dynamo.mark_dynamic(self._span, 0, min=2, max=self.cache.batch_size)
        return self._span.copy_(visible)

    def _row_views(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """self.tokens / self.positions cut to their first `rows` rows, marked dynamic once per count."""
        if rows not in self._rows_cut:
            self._rows_cut[rows] = (self.tokens[:rows], self.positions[:rows])
            for t in self._rows_cut[rows]:
                torch._dynamo.mark_dynamic(t, 0, min=2, max=self.cache.batch_size)
        return self._rows_cut[rows]

    def prefill(self, model: nn.Module, ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Eager forward of `ids` (B, T) into cache columns 0..T-1; `real` (B, T) marks non-padding.
        Returns the last position's logits and leaves self.positions at each row's next position.
        The mask is T columns wide: attention reads only the prompt's part of the cache."""
        B, T = ids.shape
        cache = self.cache
        cache.reset()
        positions = (real.long().cumsum(dim=1) - 1).clamp_(min=0)
        cache.visible[:, :T] = real
        causal = torch.ones(T, T, dtype=torch.bool, device=self.device).tril_()
        mask = causal[None] & cache.visible[:, None, :T]
        mask |= torch.eye(T, dtype=torch.bool, device=self.device)  # a padding query sees itself
        cache.index = torch.arange(T, device=self.device)
        try:
            out = model(ids, positions=positions, attn_mask=mask[:, None], kv_cache=cache, last_logits_only=True)
        finally:
            cache.index = self.decode_index
        self.positions.copy_(positions[:, -1:] + 1)
        return out.logits[:, -1]


def decoder_for(model: nn.Module, batch_size: int, compile: bool = True, check: bool = False,
                per_row: bool = False) -> StaticDecoder:
    """The process-wide StaticDecoder of `model` for this batch size (built, and compiled, once).
    check=True (decode_compiled, once per generation, with the model set up for generation as every
    time, e.g. frozen_fused_weights' stacks in place): build it again if the model's structure changed
    since its step was compiled (generation/step_guards.py). per_row: the server's kind (rows write at
    their own columns)."""
    per_model = _DECODERS.setdefault(model, {})
    param = next(model.parameters())
    key = (batch_size, param.dtype, param.device, compile, per_row)
    if key not in per_model or (check and not per_model[key].fits(model)):
        per_model[key] = StaticDecoder(model, batch_size, compile=compile, per_row=per_row)
    return per_model[key]


def compile_seconds(model: nn.Module) -> float | None:
    """Seconds this process spent compiling decode steps for `model` (None: nothing was compiled)."""
    took = [d.compile_seconds for d in _DECODERS.get(model, {}).values() if d.compile_seconds is not None]
    return sum(took) if took else None


@torch.inference_mode()
def decode_compiled(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, params: SamplingParams,
                    compile: bool = True) -> Iterator:
    """The cached decoding loop of generate.py, on a StaticDecoder; same arguments, same DecodeSteps.

    Left-padded batches, the sliding window (re-prefill the last 3/4 when the cache is full) and
    `context="stop"` behave exactly as in the eager loop. compile=False runs the same static-cache loop
    eagerly (what the fallback does)."""
    context = params.context
    dec = decoder_for(model, len(prompts), compile, check=True)
    device, ctx = dec.device, dec.max_len
    seq, real, L = left_padded_prompts(prompts, max_new_tokens, ctx, context, device)
    keep = max(1, ctx - ctx // 4)
    n = L
    start = max(0, n - ctx)
    logits = dec.prefill(model, seq[:, start:n], real[:, start:n])
    column = n - start  # the cache column the next token goes to

    picker = TokenPicker(params, seq[:, :L], real[:, :L], model.config.vocab_size)

    def next_logits(n: int, tok: torch.Tensor) -> torch.Tensor:
        nonlocal column
        if column >= ctx:  # full: restart the cache from the most recent `keep` tokens (eagerly)
            column = keep
            return dec.prefill(model, seq[:, n - keep : n], real[:, n - keep : n])
        dec.tokens.copy_(tok[:, None])
        dec.decode_index.fill_(column)
        dec.cache.visible[:, column] = True
        logits = dec.step(model, column).clone()  # a CUDA graph's output is overwritten by its next replay
        dec.positions.add_(1)
        column += 1
        return logits

    yield from decode_steps(picker, seq, real, n, logits, max_new_tokens, context, ctx, next_logits)
