"""The decode loop behind the server: continuous batching in one thread (`diyllm serve`: the main one).

Every request becomes one or more rows (`n` choices). The loop repeats:

1. admit waiting rows into free slots: prefill each prompt alone (the same forward `diyllm sample` runs),
   which gives the logits of its first new token;
2. sample one token for every active row at once (each row with its own temperature, top-p, penalties
   and random generator), turn it into text and hand the text to the request's callback;
3. drop rows that finished (stop token, stop string, max_tokens, cancelled), packing the batch;
4. one decode step for all remaining rows together (`SlotKVCache.decode`, or with `compile` one compiled
   static-cache step whose rows write at their own columns: `_decode_compiled`).

So rows join and leave between steps and no request waits for another one to end. Everything runs in this
loop's thread: the HTTP event loop (in another thread) only puts requests in and receives events through
`emit`, and torch releases the GIL while it computes, so the server keeps answering (e.g. /health) during a
long generation. Why the loop, not the HTTP server, gets the main thread: `BatchScheduler.run`.

Requests beyond the free slots wait in a FIFO queue (first come, first served) of at most `max_queue`
requests; `submit` raises `QueueFull` beyond it (the server answers 503).
"""

from __future__ import annotations

import codecs
import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from diyllm.generation.compiled import StaticDecoder
from diyllm.generation.sampling import sample_next
from diyllm.generation.text import _held_back
from diyllm.model.layers import frozen_fused_weights
from diyllm.serving.slots import SlotKVCache


class QueueFull(RuntimeError):
    """More requests are waiting than the server accepts (`max_queue`)."""


@dataclass
class GenerationRequest:
    """What to generate, already validated (see `diyllm.serving.protocol`).

    `emit` is called from the decode thread with ("delta", index, text), ("finish", index, reason,
    completion_tokens) or ("error", message); it must be thread-safe (the app hops to its event loop).
    """

    prompt_ids: list[int]
    max_tokens: int
    emit: Callable[..., None]
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    n: int = 1
    stop_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    cancelled: bool = False  # set by the app when the client goes away; the row is dropped at the next step


@dataclass
class _Row:
    request: GenerationRequest
    index: int
    generator: torch.Generator | None
    new_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))

    def add_token(self, piece: bytes) -> tuple[str, bool]:
        """Append one token's bytes: (newly settled text, whether a stop string was reached).

        Text that could still turn into a stop string is held back until the next token decides it (the
        rule of `diyllm.generation.text.stream_text`); the incremental UTF-8 decoder holds back bytes of an
        unfinished character, so no U+FFFD appears mid-character."""
        self.text += self.decoder.decode(piece)
        stops = self.request.stop_strings
        if stops:
            hits = [i for i in (self.text.find(s, max(0, self.emitted - len(s))) for s in stops) if i >= 0]
            if hits:
                out, self.emitted = self.text[self.emitted:min(hits)], len(self.text)
                return out, True
        settled = max(self.emitted, len(self.text) - _held_back(self.text, stops))
        out, self.emitted = self.text[self.emitted:settled], settled
        return out, False

    def flush(self) -> str:
        """At the end (stop token or length): whatever was held back, which never became a stop string."""
        self.text += self.decoder.decode(b"", final=True)
        out, self.emitted = self.text[self.emitted:], len(self.text)
        return out


class BatchScheduler:
    """Owns the model, the slot cache and the decode loop (`run`, or a thread of its own: `start`). `max_batch`
    rows decode together."""

    def __init__(self, model: nn.Module, tokenizer: Any, max_batch: int = 16, max_queue: int = 64,
                 compile: bool = False):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.compile = compile  # decode steps through a compiled static-cache step (generation/compiled.py)
        self.runs_on_caller = False  # True: the owner calls run() itself (diyllm serve), start() starts nothing
        self.context_length = model.config.context_length
        vocab_limit = getattr(tokenizer, "vocab_size", None)
        V = model.config.vocab_size
        self.device = next(model.parameters()).device
        self._no_text = (torch.arange(V, device=self.device) >= vocab_limit
                         if vocab_limit is not None and vocab_limit < V else None)
        self._token_bytes = [tokenizer.token_bytes(i) if vocab_limit is None or i < vocab_limit else b""
                             for i in range(V)]
        self._waiting: collections.deque[GenerationRequest] = collections.deque()
        self._wake = threading.Condition()
        self._rows: list[_Row] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps run (for /health and tests)
        self.peak_batch = 0  # most rows ever decoded in one step (> 1 shows batching happened)

    # ---- the app's side ----------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> None:
        with self._wake:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (--max-queue {self.max_queue})")
            self._waiting.append(request)
            self._wake.notify()

    def stats(self) -> dict[str, int]:
        return {"active_rows": len(self._rows), "waiting_requests": len(self._waiting), "max_batch": self.max_batch,
                "decode_steps": self.steps, "peak_batch": self.peak_batch}

    def start(self) -> None:
        """Decode in a thread of its own (tests, embedding). `diyllm serve` calls `run` on its main thread
        instead; then this does nothing."""
        if self.runs_on_caller:
            return
        self._thread = threading.Thread(target=self.run, name="diyllm-decode", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # ---- the decode loop ---------------------------------------------------------------------------
    def run(self, alive: Callable[[], bool] | None = None) -> None:
        """The decode loop, in the calling thread, until `stop` (or, checked every second while idle, until
        `alive()` turns False: the HTTP server's thread ended).

        Why `diyllm serve` runs it on the main thread (and the HTTP server in another): torch's CPU kernels
        run on OpenMP thread teams, one per thread that starts them. Once the main thread has a team (it
        loaded the model) and a second thread starts its own, the process holds more OpenMP threads than
        cores, and GNU OpenMP stops spinning between parallel regions: each of a decode step's hundreds
        of kernels then waits for its workers to wake up. Measured on 2 cores: a small matmul 17 -> 131 us,
        a compiled decode step 0.27 -> 2.5 ms, when run in a second thread."""
        with torch.inference_mode(), frozen_fused_weights(self.model):
            # --compile: one compiled step for all max_batch slots, each row writing at its own column
            # (its own decoder, not the process-wide one of decoder_for: the cache is this server's slots;
            # the compiled graph is still shared with every decoder of the same structure)
            self._decoder = StaticDecoder(self.model, self.max_batch, per_row=True) if self.compile else None
            self._cache = SlotKVCache(self.model, self.max_batch,
                                      self._decoder.cache if self._decoder is not None else None)
            self._columns = torch.arange(self._cache.max_len, device=self.device)
            V = self.model.config.vocab_size
            self._seen = torch.zeros(self.max_batch, V, dtype=torch.bool, device=self.device)
            self._counts = torch.zeros(self.max_batch, V, dtype=torch.float32, device=self.device)
            self._logits = torch.zeros(self.max_batch, V, dtype=torch.float32, device=self.device)
            self._tokens = torch.zeros(self.max_batch, dtype=torch.long, device=self.device)
            while True:
                with self._wake:
                    while not self._stopping and not self._rows and not self._waiting:
                        self._wake.wait(timeout=None if alive is None else 1.0)
                        if alive is not None and not alive():
                            return
                    if self._stopping:
                        return
                try:
                    self._step()
                except Exception as exc:  # never let one bad step kill the server: fail the rows, go on
                    for row in self._rows:
                        row.request.emit("error", f"generation failed: {type(exc).__name__}: {exc}")
                    self._rows = []

    def _step(self) -> None:
        self._admit()
        self._rows_drop_cancelled()
        if not self._rows:
            return
        self._sample_and_emit()
        if self._rows:
            self._decode()

    def _admit(self) -> None:
        while True:
            with self._wake:
                if not self._waiting or len(self._rows) + self._waiting[0].n > self.max_batch:
                    return
                request = self._waiting.popleft()
            if request.cancelled:
                continue
            first = len(self._rows)
            ids = torch.tensor([request.prompt_ids], dtype=torch.long, device=self.device)
            try:
                out = self.model(ids, kv_cache=self._cache.prefill(first), last_logits_only=True)
            except Exception as exc:  # this request fails alone; the batch goes on
                request.emit("error", f"prefill failed: {type(exc).__name__}: {exc}")
                continue
            for i in range(request.n):
                slot = first + i
                if i:
                    self._cache.move(first, slot)
                self._logits[slot] = out.logits[0, -1].float()
                self._seen[slot] = False
                self._seen[slot, ids[0]] = True
                self._counts[slot] = 0
                generator = None
                if request.seed is not None:
                    generator = torch.Generator(device=self.device).manual_seed(request.seed + i)
                self._rows.append(_Row(request, i, generator))

    def _rows_drop_cancelled(self) -> None:
        for b in reversed(range(len(self._rows))):
            if self._rows[b].request.cancelled:
                self._remove(b)

    def _scores(self, B: int) -> torch.Tensor:
        """Penalised logits of rows 0..B-1: repetition penalty (CTRL rule, prompt included), then OpenAI's
        presence/frequency penalties (generated tokens only), then ids without text removed."""
        rows = self._rows
        scores = self._logits[:B]
        rep = [r.request.repetition_penalty for r in rows]
        if any(p != 1.0 for p in rep):
            p = torch.tensor(rep, device=self.device)[:, None]
            penalised = torch.where(scores > 0, scores / p, scores * p)
            scores = torch.where(self._seen[:B], penalised, scores)
        presence = [r.request.presence_penalty for r in rows]
        frequency = [r.request.frequency_penalty for r in rows]
        if any(presence) or any(frequency):
            counts = self._counts[:B]
            scores = scores - counts * torch.tensor(frequency, device=self.device)[:, None]
            scores = scores - (counts > 0) * torch.tensor(presence, device=self.device)[:, None]
        if self._no_text is not None:
            scores = scores.masked_fill(self._no_text, float("-inf"))
        return scores

    def _sample_and_emit(self) -> None:
        B = len(self._rows)
        scores = self._scores(B)
        tokens = scores.argmax(dim=-1)
        for b, row in enumerate(self._rows):
            r = row.request
            if r.temperature > 0:
                tokens[b] = sample_next(scores[b : b + 1], r.temperature, r.top_k, r.top_p, row.generator)[0]
        self._tokens[:B] = tokens
        finished: list[tuple[int, str]] = []
        for b, tok in enumerate(tokens.tolist()):
            row = self._rows[b]
            r = row.request
            if tok in r.stop_ids:
                finished.append((b, "stop"))
                continue
            row.new_ids.append(tok)
            self._seen[b, tok] = True
            self._counts[b, tok] += 1
            text, hit_stop_string = row.add_token(self._token_bytes[tok])
            if text:
                r.emit("delta", row.index, text)
            if hit_stop_string:
                finished.append((b, "stop_string"))
            elif len(row.new_ids) >= r.max_tokens or self._cache.lengths[b] >= self.context_length:
                finished.append((b, "length"))
        for b, reason in reversed(finished):
            row = self._rows[b]
            if reason != "stop_string":
                rest = row.flush()
                if rest:
                    row.request.emit("delta", row.index, rest)
            row.request.emit("finish", row.index, "length" if reason == "length" else "stop", len(row.new_ids))
            self._remove(b)

    def _remove(self, b: int) -> None:
        """Drop row b; the last row moves into its slot so rows stay packed at 0..B-1."""
        last = len(self._rows) - 1
        if b != last:
            self._cache.move(last, b)
            self._logits[b] = self._logits[last]
            self._seen[b] = self._seen[last]
            self._counts[b] = self._counts[last]
            self._tokens[b] = self._tokens[last]
            self._rows[b] = self._rows[last]
        self._rows.pop()
        self._cache.lengths[last] = 0

    def _decode(self) -> None:
        B = len(self._rows)
        if self._decoder is not None:
            self._decode_compiled(B)
        else:
            view, positions, mask = self._cache.decode(B)
            ids = self._tokens[:B, None]
            out = self.model(ids, positions=positions, attn_mask=mask, kv_cache=view, last_logits_only=True)
            self._logits[:B] = out.logits[:, -1].float()
        self.steps += 1
        self.peak_batch = max(self.peak_batch, B)

    def _decode_compiled(self, B: int) -> None:
        """The same step through the compiled decoder: the active rows (at least 2, a size the graph takes
        as dynamic; a free slot in there writes into the cache's spare column, sees column 0 only, and its
        logits are dropped), each row's token at its own column, a mask of what each row may see, as wide
        as the longest row needs."""
        dec, cache = self._decoder, self._decoder.cache
        rows = max(B, 2) if self.max_batch >= 2 else None  # None: one static row
        lengths = self._cache.lengths
        filled = torch.tensor(lengths, device=self.device)  # free slots hold 0
        cache.row_columns.copy_(filled)
        cache.row_columns[B:] = cache.max_len
        torch.le(self._columns[None, :], filled[:, None], out=cache.visible)  # row b sees columns 0..lengths[b]
        dec.positions.copy_(filled[:, None])
        dec.tokens.copy_(self._tokens[:, None])
        logits = dec.step(self.model, max(lengths[:B]), rows)
        self._logits[:B] = logits[:B].float()
        for b in range(B):  # the static cache keeps no lengths of its own (`advance` does nothing)
            lengths[b] += 1
