"""Greedy generation for generative tasks (GSM8K, the synthetic tasks), in batches.

Generation runs with diyllm.generation (KV cache, left-padded batches) up to the task's max_new_tokens
or the end-of-text / <|im_end|> token; the text is then cut at the first stop string. With greedy
decoding that is the same text a generation stopping at the string would give. Prompts too long for the
window keep their last tokens (counted as truncated) so the answer still fits; with a small window the
generation gets at most half of it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from diyllm.eval.tasks import Task


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to (not including) the earliest stop string."""
    ends = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return text[: min(ends)] if ends else text


def _stop_ids(tokenizer: Any) -> list[int]:
    ids = []
    eot = getattr(tokenizer, "eot_id", None)
    if eot is not None:
        ids.append(eot)
    if "<|im_end|>" in getattr(tokenizer, "special_tokens", ()):
        ids.append(tokenizer.special_token_id("<|im_end|>"))
    return ids


def generate_answers(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str | list[dict]],
    task: Task,
    window: int,
    batch_size: int,
    chat: bool = False,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[str], int]:
    """Greedy replies to `prompts` (text, or conversations when `chat`) and how many prompts were cut."""
    from diyllm.generation.generate import generate

    if chat:
        from diyllm.data.chat_template import encode_chat

        encoded = [encode_chat(tokenizer, p, add_generation_prompt=True)[0] for p in prompts]
    else:
        encoded = [tokenizer.encode(p) for p in prompts]
    max_new = max(1, min(task.max_new_tokens, window // 2))  # a small window keeps half for the prompt
    room = window - max_new
    truncated = sum(len(ids) > room for ids in encoded)
    encoded = [ids[-room:] for ids in encoded]
    stop_ids = _stop_ids(tokenizer)
    vocab = getattr(tokenizer, "vocab_size", None)
    texts: list[str] = []
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start : start + batch_size]
        outs = generate(model, batch, max_new, temperature=0, stop_ids=stop_ids, vocab_limit=vocab)
        texts += [cut_at_stop(tokenizer.decode(o), task.stop) for o in outs]
        if progress is not None:
            progress(len(batch))
    return texts, truncated
