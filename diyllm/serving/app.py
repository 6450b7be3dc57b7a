"""The HTTP application: OpenAI-compatible routes, Server-Sent Events, the chat page, errors.

Routes: GET / (chat page), GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions.
Handlers only validate, tokenize and wait: generation happens in the `BatchScheduler` loop, whose events
come back through a thread-safe hop onto the event loop (`loop.call_soon_threadsafe`). Every error is an
OpenAI error object; a streamed reply ends with `data: [DONE]`. When a client goes away, its request is
marked cancelled and the decode loop drops its rows at the next step (the slot is free again).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from diyllm.errors import UserError
from diyllm.serving.protocol import (
    APIError,
    ParsedRequest,
    check_lengths,
    chunk,
    completion_response,
    new_id,
    parse_request,
    usage_chunk,
)
from diyllm.serving.scheduler import BatchScheduler, GenerationRequest, QueueFull

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DISCONNECT_POLL_S = 0.5


def chat_page() -> str:
    return resources.files("diyllm.serving").joinpath("static/chat.html").read_text(encoding="utf-8")


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _error(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


class ServerState:
    """What the routes share: the scheduler, the tokenizer, the model's name and the optional API key."""

    def __init__(self, scheduler: BatchScheduler, model_name: str, api_key: str | None = None):
        self.scheduler, self.model_name, self.api_key = scheduler, model_name, api_key
        self.tokenizer = scheduler.tokenizer
        self.context_length = scheduler.context_length
        self.created = int(time.time())

    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        if request.headers.get("authorization", "") != f"Bearer {self.api_key}":
            raise APIError("missing or wrong API key: send 'Authorization: Bearer KEY'", status=401,
                           code="invalid_api_key")

    def prompt_ids(self, req: ParsedRequest) -> list[int]:
        from diyllm.data.chat_template import encode_chat

        try:
            if req.kind == "chat":
                return encode_chat(self.tokenizer, req.messages, add_generation_prompt=True)[0]
            if isinstance(req.prompt, list):
                bad = [t for t in req.prompt if not 0 <= t < self.tokenizer.vocab_size]
                if bad:
                    raise APIError(f"token id {bad[0]} is outside the vocabulary (size {self.tokenizer.vocab_size})",
                                   "prompt")
                return req.prompt
            ids = self.tokenizer.encode(req.prompt)
        except UserError as exc:  # e.g. chat with a character tokenizer
            raise APIError(str(exc), "messages") from None
        except ValueError as exc:  # e.g. a character the character tokenizer does not know
            raise APIError(f"the text cannot be tokenized: {exc}", "messages" if req.kind == "chat" else "prompt",
                           code="invalid_text") from None
        if not ids:  # an empty prompt starts from end-of-text, as `diyllm sample` does
            eot = getattr(self.tokenizer, "eot_id", None)
            ids = [eot] if eot is not None else self.tokenizer.encode("\n")
        return ids

    def stop_ids(self, req: ParsedRequest) -> tuple[int, ...]:
        if req.ignore_eos:
            return ()
        ids = []
        eot = getattr(self.tokenizer, "eot_id", None)
        if eot is not None:
            ids.append(eot)
        if req.kind == "chat":
            from diyllm.data.chat_template import chat_token_ids

            ids.append(chat_token_ids(self.tokenizer)[1])
        return tuple(ids)


async def _generate(state: ServerState, request: Request, kind: str) -> Response:
    state.check_key(request)
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(f"the request body is not valid JSON: {exc}") from None
    req = parse_request(body, kind)
    prompt_ids = state.prompt_ids(req)
    max_tokens = check_lengths(len(prompt_ids), req.max_tokens, state.context_length,
                               "messages" if kind == "chat" else "prompt", req.max_tokens_param)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def emit(*event: Any) -> None:
        loop.call_soon_threadsafe(events.put_nowait, event)

    if req.options["n"] > state.scheduler.max_batch:
        raise APIError(f"n={req.options['n']} is more than this server decodes at once "
                       f"(--max-concurrency {state.scheduler.max_batch})", "n")
    gen = GenerationRequest(prompt_ids=prompt_ids, max_tokens=max_tokens, emit=emit, stop_ids=state.stop_ids(req),
                            stop_strings=req.stop_strings, **req.options)
    try:
        state.scheduler.submit(gen)
    except QueueFull as exc:
        raise APIError(f"the server is busy ({exc}); retry later", status=503, type="server_error",
                       code="queue_full") from None
    rid, created, n = new_id(kind), int(time.time()), gen.n
    name = state.model_name
    if req.stream:
        return StreamingResponse(_stream(kind, rid, name, created, gen, events, len(prompt_ids), req.include_usage),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    texts, reasons, completion_tokens = [""] * n, ["stop"] * n, 0
    finished = 0
    try:
        while finished < n:
            try:
                event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return Response(status_code=499)
                continue
            if event[0] == "delta":
                texts[event[1]] += event[2]
            elif event[0] == "finish":
                reasons[event[1]] = event[2]
                completion_tokens += event[3]
                finished += 1
            else:
                raise APIError(event[1], status=500, type="server_error")
    finally:
        gen.cancelled = True  # no-op when finished; frees the rows when the client left or we failed
    return JSONResponse(completion_response(kind, rid, name, texts, reasons, len(prompt_ids), completion_tokens))


async def _stream(kind, rid, model, created, gen: GenerationRequest, events: asyncio.Queue, prompt_tokens: int,
                  include_usage: bool):
    """The SSE body: role chunks (chat), content deltas, finish chunks, optional usage, then [DONE]."""
    try:
        if kind == "chat":
            for i in range(gen.n):
                yield _sse(chunk(kind, rid, model, created, i, role=True))
        finished, completion_tokens, pending = 0, 0, None
        while finished < gen.n:
            event, pending = pending or await events.get(), None
            if event[0] == "delta":
                # Deltas of one choice that queued up while this coroutine waited for the event loop go out
                # as one chunk: the client sees the same text, and this thread, which shares the GIL with
                # the decode loop, formats and writes one chunk instead of several.
                text = event[2]
                while not events.empty():
                    pending = events.get_nowait()
                    if pending[0] != "delta" or pending[1] != event[1]:
                        break
                    text, pending = text + pending[2], None
                yield _sse(chunk(kind, rid, model, created, event[1], text=text))
            elif event[0] == "finish":
                finished += 1
                completion_tokens += event[3]
                yield _sse(chunk(kind, rid, model, created, event[1], finish_reason=event[2]))
            else:
                yield _sse(APIError(event[1], status=500, type="server_error").body())
                break
        if include_usage:
            yield _sse(usage_chunk(kind, rid, model, created, prompt_tokens, completion_tokens))
        yield "data: [DONE]\n\n"
    finally:
        gen.cancelled = True


def create_app(scheduler: BatchScheduler, model_name: str, api_key: str | None = None) -> Starlette:
    """The Starlette app around a (not yet started) scheduler; the app starts and stops it."""
    state = ServerState(scheduler, model_name, api_key)

    async def index(request: Request) -> Response:
        return HTMLResponse(chat_page())

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": state.model_name, **scheduler.stats()})

    async def models(request: Request) -> Response:
        state.check_key(request)
        return JSONResponse({"object": "list", "data": [
            {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "diyllm",
             "context_length": state.context_length}]})

    async def chat_completions(request: Request) -> Response:
        return await _generate(state, request, "chat")

    async def completions(request: Request) -> Response:
        return await _generate(state, request, "completion")

    async def api_error(request: Request, exc: APIError) -> Response:
        return _error(exc)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(APIError(f"{request.method} {request.url.path}: {exc.detail}", status=exc.status_code, type=kind))

    async def server_error(request: Request, exc: Exception) -> Response:
        return _error(APIError(f"internal error: {type(exc).__name__}: {exc}", status=500, type="server_error"))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    routes = [
        Route("/", index),
        Route("/health", health),
        Route("/v1/models", models),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]
    handlers = {APIError: api_error, HTTPException: http_error, Exception: server_error}
    return Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
