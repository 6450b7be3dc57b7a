"""Exact-match scoring of chat replies: greedy generation compared with the expected answer.

Used by `diyllm lab sft` (diyllm/lab/experiments.py) on the synthetic SFT tasks of diyllm.data.synthetic.
It generates, so it lives beside generation, not in data/.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def normalise(answer: str) -> str:
    return " ".join(answer.strip().split()).rstrip(".").lower()


def exact_match(model: Any, tokenizer: Any, conversations: Sequence[dict], max_new_tokens: int = 16,
                return_replies: bool = False) -> float | tuple[float, list[str]]:
    """Fraction of conversations whose greedy reply (to all messages but the last) equals the last one.

    Replies are generated in one left-padded batch and stop at <|im_end|>; comparison ignores case,
    surrounding spaces and a final period.
    """
    from diyllm.data.chat_template import IM_END, encode_chat
    from diyllm.generation.generate import generate

    prompts = [encode_chat(tokenizer, c["conversations"][:-1], add_generation_prompt=True)[0]
               for c in conversations]
    stop = [tokenizer.special_token_id(IM_END)]
    outs = generate(model, prompts, max_new_tokens, temperature=0, stop_ids=stop)
    replies = [tokenizer.decode(o) for o in outs]
    score = sum(normalise(r) == normalise(c["conversations"][-1]["content"]) for r, c in zip(replies, conversations))
    acc = score / max(1, len(conversations))
    return (acc, replies) if return_replies else acc
