"""The OpenAI wire format: validating request bodies and building responses and stream chunks.

Only what a small local model can honour is accepted; everything else a client may send and that changes
nothing here (user, logit_bias={} ...) is ignored, as OpenAI-compatible servers commonly do. Every bad
value raises `APIError`, which the app turns into HTTP 400 with OpenAI's error object
{"error": {"message", "type", "param", "code"}}.

Extensions (pass them in the body, e.g. `extra_body=` with the openai client): top_k, repetition_penalty
(the CTRL rule `diyllm sample` uses) and ignore_eos (generate exactly max_tokens, for benchmarks).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any

ROLE_ALIASES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP_STRINGS = 4
MAX_CHOICES = 8


class APIError(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None):  # noqa: A002 - OpenAI's name
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ParsedRequest:
    """A validated request: the prompt (messages or text) and the sampling options, not yet tokenized."""

    kind: str  # "chat" or "completion"
    messages: list[dict] | None = None
    prompt: str | list[int] | None = None
    max_tokens: int | None = None
    max_tokens_param: str = "max_tokens"  # or max_completion_tokens: the name errors report
    options: dict[str, Any] = field(default_factory=dict)  # GenerationRequest fields
    stop_strings: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False
    model: str | None = None


def _number(body: dict, key: str, lo: float, hi: float, default: float | None, lo_open: bool = False):
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise APIError(f"'{key}' must be a number, got {value!r}", key)
    if value < lo or value > hi or (lo_open and value == lo):
        interval = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise APIError(f"'{key}' must be in {interval}, got {value}", key)
    return float(value)


def _integer(body: dict, key: str, lo: int, hi: int | None = None, default: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(f"'{key}' must be an integer, got {value!r}", key)
    if value < lo or (hi is not None and value > hi):
        raise APIError(f"'{key}' must be >= {lo}{f' and <= {hi}' if hi is not None else ''}, got {value}", key)
    return value


def _boolean(body: dict, key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise APIError(f"'{key}' must be true or false, got {value!r}", key)
    return value


def _content_text(content: Any, i: int) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(f"messages[{i}].content: only text parts are supported, got {part!r}",
                               f"messages[{i}].content")
            parts.append(part["text"])
        return "".join(parts)
    raise APIError(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")


def parse_messages(value: Any) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise APIError("'messages' must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise APIError(f"messages[{i}] must be an object with 'role' and 'content'", f"messages[{i}]")
        role = m.get("role")
        if role not in ROLE_ALIASES:
            raise APIError(f"messages[{i}].role {role!r} is not supported; use system, user or assistant",
                           f"messages[{i}].role")
        if m.get("content") is None:
            raise APIError(f"messages[{i}] has no 'content'", f"messages[{i}].content")
        messages.append({"role": ROLE_ALIASES[role], "content": _content_text(m["content"], i)})
    return messages


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise APIError("'stop' must be a non-empty string or a list of non-empty strings", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise APIError(f"'stop' takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}", "stop")
    return tuple(stops)


def parse_request(body: Any, kind: str) -> ParsedRequest:
    """Validate a /v1/chat/completions (kind "chat") or /v1/completions ("completion") body."""
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    req = ParsedRequest(kind=kind, model=body.get("model") if isinstance(body.get("model"), str) else None)
    if kind == "chat":
        req.messages = parse_messages(body.get("messages"))
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            req.prompt = list(prompt)
        elif isinstance(prompt, str):
            req.prompt = prompt
        else:
            raise APIError("'prompt' must be a string (or a list of token ids); one prompt per request", "prompt")
        if _boolean(body, "echo"):
            raise APIError("'echo' is not supported", "echo")
    for unsupported in ("logprobs", "top_logprobs", "tools", "functions", "suffix"):
        value = body.get(unsupported)
        if value not in (None, False, [], 0):
            raise APIError(f"'{unsupported}' is not supported by this server", unsupported)
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    req.max_tokens, req.max_tokens_param = _integer(body, key, 1), key
    req.options = dict(
        temperature=_number(body, "temperature", 0.0, 2.0, 1.0),
        top_p=_number(body, "top_p", 0.0, 1.0, None, lo_open=True),
        top_k=_integer(body, "top_k", 1),
        presence_penalty=_number(body, "presence_penalty", -2.0, 2.0, 0.0),
        frequency_penalty=_number(body, "frequency_penalty", -2.0, 2.0, 0.0),
        repetition_penalty=_number(body, "repetition_penalty", 0.0, 10.0, 1.0, lo_open=True),
        seed=_integer(body, "seed", -(2**63), 2**63 - 1),
        n=_integer(body, "n", 1, MAX_CHOICES, 1),
    )
    if req.options["top_p"] == 1.0:
        req.options["top_p"] = None
    if req.options["seed"] is not None:
        req.options["seed"] %= 2**63  # torch.Generator takes a non-negative seed
    req.stop_strings = _stop(body)
    req.stream = _boolean(body, "stream")
    req.ignore_eos = _boolean(body, "ignore_eos")
    stream_options = body.get("stream_options")
    if stream_options is not None:
        if not isinstance(stream_options, dict):
            raise APIError("'stream_options' must be an object", "stream_options")
        req.include_usage = _boolean(stream_options, "include_usage")
    return req


def check_lengths(prompt_tokens: int, max_tokens: int | None, context_length: int,
                  prompt_param: str = "messages", max_tokens_param: str = "max_tokens") -> int:
    """The max_tokens to use: as asked, or all the room the context leaves. 400 when it does not fit."""
    if prompt_tokens >= context_length:
        raise APIError(f"the prompt is {prompt_tokens} tokens, but this model's context window is {context_length} "
                       "tokens (and a reply needs at least one); shorten the prompt or the conversation",
                       prompt_param, code="context_length_exceeded")
    room = context_length - prompt_tokens
    if max_tokens is None:
        return room
    if max_tokens > room:
        raise APIError(f"max_tokens={max_tokens} does not fit: the prompt is {prompt_tokens} tokens and the context "
                       f"window {context_length}, so at most {room} new tokens fit", max_tokens_param,
                       code="context_length_exceeded")
    return max_tokens


# ---- responses ---------------------------------------------------------------------------------------

def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(kind: str, rid: str, model: str, texts: list[str], reasons: list[str],
                        prompt_tokens: int, completion_tokens: int) -> dict:
    if kind == "chat":
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                    "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons))]
        obj = "chat.completion"
    else:
        choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens), "system_fingerprint": None}


def chunk(kind: str, rid: str, model: str, created: int, index: int, *, role: bool = False,
          text: str | None = None, finish_reason: str | None = None) -> dict:
    """One streamed event: for chat a `chat.completion.chunk` with a delta (the role first, then content,
    then an empty delta with the finish_reason); for completions a `text_completion` piece."""
    if kind == "chat":
        delta: dict[str, Any] = {}
        if role:
            delta = {"role": "assistant", "content": ""}
        elif text is not None:
            delta = {"content": text}
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice],
            "system_fingerprint": None}


def usage_chunk(kind: str, rid: str, model: str, created: int, prompt_tokens: int, completion_tokens: int) -> dict:
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}
