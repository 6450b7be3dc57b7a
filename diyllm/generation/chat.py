"""Talk to a fine-tuned checkpoint in the terminal (or answer one --prompt for scripts).

  diyllm chat --ckpt runs/lab/pretrain-vs-sft/sft/best.pt
  diyllm chat --ckpt runs/sft --prompt "What is the capital of Peru?" --temperature 0

Interactive commands: /reset (forget the conversation), /quit (or Ctrl-D). The reply streams as it is
generated and ends at <|im_end|>. The whole history is sent every turn (with the KV cache); when it no
longer fits in the context window together with room for a reply, the oldest turns are dropped (a
system prompt is always kept) and a note says so.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from typing import Any, TextIO

from diyllm.errors import UserError
from diyllm.model.quantize import QUANTIZE_CHOICES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="checkpoint .pt or run folder of an SFT run")
    parser.add_argument("--prompt", default=None, help="answer this one message and exit")
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--top_p", type=float, default=0.9)
    parser.add_argument("--repetition_penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="static KV cache + torch.compile'd decode step")
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="none",
                        help="int8: int8 weights, bfloat16 activations (faster decoding on CPU); w8a8: "
                             "int8 activations too")
    parser.add_argument("--device", default="auto")


class ChatSession:
    """A conversation with a model: history, fitting it into the context, streaming replies."""

    def __init__(self, model: Any, tokenizer: Any, system: str | None = None, max_new_tokens: int = 256,
                 params: Any = None, **sampling: Any):
        """params (a SamplingParams) and/or its fields as keywords: how replies are sampled."""
        from diyllm.data.chat_template import chat_token_ids
        from diyllm.generation.sampling import SamplingParams

        self.model, self.tokenizer = model, tokenizer
        self.im_end = chat_token_ids(tokenizer)[1]
        self.system = system
        self.max_new_tokens = max_new_tokens
        # every reply ends at <|im_end|> and at the edge of the context (a reply must not slide the window)
        self.params = SamplingParams.from_options(params, **{**sampling, "stop_ids": [self.im_end], "context": "stop"})
        self.context_length = model.config.context_length
        self.history: list[dict] = []
        self.dropped_turns = 0

    def reset(self) -> None:
        self.history = []

    def _messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def prompt_ids(self) -> list[int]:
        """The history as a generation prompt, dropping the oldest turns until a reply has room."""
        from diyllm.data.chat_template import encode_chat

        room = min(self.max_new_tokens, max(1, self.context_length // 4))
        while True:
            try:
                ids, _ = encode_chat(self.tokenizer, self._messages(), add_generation_prompt=True)
            except ValueError as exc:  # e.g. a character outside a char tokenizer's vocabulary
                self.history.pop()
                raise UserError(f"cannot encode the message with this checkpoint's tokenizer: {exc}") from None
            if len(ids) + room <= self.context_length:
                return ids
            if len(self.history) <= 1:
                self.history = []
                raise UserError(f"the message is {len(ids)} tokens: too long for a context of {self.context_length} "
                                f"tokens with room for a reply; write less")
            # drop the oldest user message and the reply to it
            cut = 2 if len(self.history) > 2 and self.history[1]["role"] == "assistant" else 1
            self.history = self.history[cut:]
            self.dropped_turns += 1

    def reply(self, message: str) -> Iterable[str]:
        """Stream the assistant's reply to `message` (text pieces); the history is updated at the end."""
        from diyllm.generation.text import stream_text

        self.history.append({"role": "user", "content": message})
        ids = self.prompt_ids()
        budget = min(self.max_new_tokens, self.context_length - len(ids) + 1)
        pieces = []
        for piece in stream_text(self.model, self.tokenizer, ids, budget, params=self.params):
            pieces.append(piece)
            yield piece
        self.history.append({"role": "assistant", "content": "".join(pieces)})


def chat_loop(session: ChatSession, lines: Iterable[str], out: TextIO, interactive: bool = True) -> None:
    """Read user lines, print streamed replies; /reset and /quit are commands."""
    for line in lines:
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            session.reset()
            out.write("(conversation reset)\n")
            continue
        before = session.dropped_turns
        try:
            if interactive:
                out.write("assistant> ")
            for piece in session.reply(text):
                out.write(piece)
                out.flush()
        except UserError as exc:
            if not interactive:  # --prompt: an error line and exit code 2, not a reply
                raise
            out.write(f"\n(error: {exc})\n")
            continue
        out.write("\n")
        if session.dropped_turns > before:
            out.write(f"(dropped the {session.dropped_turns - before} oldest turn(s) to fit the context window)\n")


def _stdin_lines() -> Iterable[str]:
    while True:
        try:
            yield input("you> ")
        except EOFError:
            print()
            return


def run(args: argparse.Namespace) -> int:
    from diyllm.loading import load_model
    from diyllm.training.device import resolve_device

    model, tokenizer, _ = load_model(args.ckpt, device=resolve_device(args.device))
    if tokenizer is None:
        raise UserError(f"{args.ckpt} holds no tokenizer")
    from diyllm.generation.sampling import SamplingParams

    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            repetition_penalty=args.repetition_penalty, seed=args.seed, compile=args.compile,
                            quantize=args.quantize)
    session = ChatSession(model, tokenizer, system=args.system, max_new_tokens=args.max_new_tokens, params=params)
    if args.prompt is not None:
        chat_loop(session, [args.prompt], sys.stdout, interactive=False)
        return 0
    print(f"chatting with {args.ckpt} (context {session.context_length} tokens). /reset, /quit")
    chat_loop(session, _stdin_lines(), sys.stdout)
    return 0
