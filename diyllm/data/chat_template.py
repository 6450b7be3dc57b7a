"""The chat template: how a conversation becomes one token sequence, and which tokens are trained.

ChatML layout, one block per message:

<|im_start|>system\\nBe terse<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHey<|im_end|>\\n

`<|im_start|>` and `<|im_end|>` are special tokens (one id each, never split or merged). For inference the
prompt ends with the generation prompt "<|im_start|>assistant\\n" and the reply ends when the model
emits `<|im_end|>`.

Loss mask (SFT): 1 exactly on the tokens of every assistant reply and its closing `<|im_end|>` (the
model must learn to stop), 0 on system/user turns, on every header including "<|im_start|>assistant\\n"
(it is given, not predicted) and on the newline after `<|im_end|>`.

Segments (header, content, end) are encoded separately and concatenated, both for training and for
inference, so mask boundaries fall exactly between tokens and the prompt at inference is tokenized
exactly as in training.

Character tokenizers cannot hold multi-character special tokens; SFT and chat refuse them with a clear
error (train a BPE tokenizer instead).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from diyllm.errors import UserError

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
CHAT_SPECIAL_TOKENS = (IM_START, IM_END)
ROLES = ("system", "user", "assistant")

# The same template for Hugging Face (tokenizer_config.json "chat_template"); renders exactly render_chat().
CHAT_TEMPLATE_JINJA = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}


def validate_conversation(messages: Any, where: str = "conversation") -> list[Message]:
    """Check roles and contents; return the messages as a list (clear error naming `where` otherwise)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise UserError(f"{where}: 'conversations' must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f'{where}: message {i} must be an object with "role" and "content"')
        if m["role"] not in ROLES:
            raise UserError(f"{where}: message {i} has role {m['role']!r}; use one of {ROLES}")
        if not isinstance(m["content"], str):
            raise UserError(f"{where}: message {i} content must be a string")
    return list(messages)


def render_chat(messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
    """The conversation as text (what CHAT_TEMPLATE_JINJA renders too)."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def chat_token_ids(tokenizer: Any) -> tuple[int, int]:
    """(im_start id, im_end id); an error telling how to fix a tokenizer that lacks them."""
    if getattr(tokenizer, "kind", None) == "char" or not hasattr(tokenizer, "special_token_id"):
        raise UserError(
            "chat/SFT needs a BPE tokenizer: the chat markers <|im_start|>/<|im_end|> must be single special "
            "tokens, which a character tokenizer cannot hold. Pretrain with a BPE tokenizer (e.g. "
            "`diyllm prepare pystdlib`) and fine-tune that checkpoint"
        )
    try:
        return tokenizer.special_token_id(IM_START), tokenizer.special_token_id(IM_END)
    except KeyError:
        raise UserError(
            "the tokenizer has no chat special tokens <|im_start|>/<|im_end|>; add them with "
            "diyllm.data.chat_template.add_chat_tokens(tokenizer) (`diyllm sft` does this and resizes the model)"
        ) from None


def add_chat_tokens(tokenizer: Any) -> list[int]:
    """Make sure <|im_start|> and <|im_end|> are special tokens; return the ids that were newly added."""
    chat_token_ids_or_none = [t for t in CHAT_SPECIAL_TOKENS if t in getattr(tokenizer, "special_tokens", [])]
    if getattr(tokenizer, "kind", None) == "char" or not hasattr(tokenizer, "add_special_tokens"):
        chat_token_ids(tokenizer)  # raises the clear error
    before = tokenizer.vocab_size
    tokenizer.add_special_tokens([t for t in CHAT_SPECIAL_TOKENS if t not in chat_token_ids_or_none])
    return list(range(before, tokenizer.vocab_size))


def encode_chat(
    tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool = False
) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of a conversation; mask[i] = 1 where token i is an assistant reply token
    or the <|im_end|> closing it. With add_generation_prompt the ids end with "<|im_start|>assistant\\n"."""
    start, end = chat_token_ids(tokenizer)
    newline = tokenizer.encode("\n")
    ids: list[int] = []
    mask: list[int] = []
    for m in messages:
        header = [start] + tokenizer.encode(f"{m['role']}\n")
        content = tokenizer.encode(m["content"])
        trained = 1 if m["role"] == "assistant" else 0
        ids += header + content + [end] + newline
        mask += [0] * len(header) + [trained] * (len(content) + 1) + [0] * len(newline)
    if add_generation_prompt:
        header = [start] + tokenizer.encode("assistant\n")
        ids += header
        mask += [0] * len(header)
    return ids, mask
