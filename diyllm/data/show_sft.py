"""Render one SFT conversation with its trained tokens marked, to check the loss mask by eye.

  diyllm show-sft-sample data/synthetic_chat/train.jsonl --index 3 --ckpt runs/pretrain/best.pt
  diyllm show-sft-sample chats.jsonl --tokenizer data/pystdlib/tokenizer.json --context_length 256
  diyllm show-sft-sample chats.parquet --conversations_field messages      # also .jsonl.zst/.gz, hf:...

Trained tokens (loss mask 1: assistant replies and their <|im_end|>) are shown in green when the output
is a terminal, and between [[ and ]] otherwise (or with --plain). Tokens beyond --context_length, which
training would cut off, are listed after a marker. Without --tokenizer/--ckpt a byte-level tokenizer is
used (one token per byte).
"""

from __future__ import annotations

import argparse
import sys

from diyllm.errors import UserError

GREEN, RESET = "\033[42;30m", "\033[0m"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", help="conversations file (JSONL, .jsonl.gz/.zst, Parquet), folder, glob or hf: source")
    parser.add_argument("--index", type=int, default=0, help="which conversation (0-based, non-blank lines)")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--tokenizer", help="tokenizer JSON file")
    src.add_argument("--ckpt", help="checkpoint whose tokenizer to use")
    parser.add_argument("--context_length", type=int, default=0, help="mark where training would truncate")
    parser.add_argument("--plain", action="store_true", help="brackets instead of colour even on a terminal")
    parser.add_argument("--conversations_field", default="conversations", help="JSONL key / Parquet column")


def render_mask(tokenizer, ids: list[int], mask: list[int], color: bool) -> str:
    """The decoded tokens, with maximal runs of trained tokens highlighted."""
    out, run, trained = [], [], None

    def flush():
        if not run:
            return
        text = tokenizer.decode(run)
        out.append((GREEN + text + RESET) if (trained and color) else (f"[[{text}]]" if trained else text))

    for t, m in zip(ids, mask):
        if trained is not None and bool(m) != trained:
            flush()
            run = []
        trained = bool(m)
        run.append(t)
    flush()
    return "".join(out)


def load_tokenizer_for(args: argparse.Namespace):
    if args.tokenizer:
        from diyllm.tokenizers import load_tokenizer

        return load_tokenizer(args.tokenizer)
    if args.ckpt:
        from diyllm.checkpoints import read_checkpoint, resolve_checkpoint_path, tokenizer_from_text

        path = resolve_checkpoint_path(args.ckpt)
        tok = tokenizer_from_text(read_checkpoint(path).get("tokenizer"), path)
        if tok is None:
            raise UserError(f"{path} holds no tokenizer; pass --tokenizer")
        return tok
    from diyllm.tokenizers import byte_tokenizer

    return byte_tokenizer()


def run(args: argparse.Namespace) -> int:
    from diyllm.data.chat_template import add_chat_tokens, encode_chat
    from diyllm.data.sft import conversation_files, iter_conversations

    tok = load_tokenizer_for(args)
    add_chat_tokens(tok)
    if args.index < 0:
        raise UserError(f"--index must be >= 0 (got {args.index})")
    path = conversation_files(args.data)[0]
    count = 0
    for count, (_, at, conv) in enumerate(iter_conversations(path, args.conversations_field), start=1):
        if count - 1 == args.index:
            where, messages = at, conv
            break
    else:
        raise UserError(f"{path} has {count} conversations; --index {args.index} is out of range")
    ids, mask = encode_chat(tok, messages)
    color = sys.stdout.isatty() and not args.plain
    cut = args.context_length + 1 if args.context_length else len(ids)
    print(f"{where}  conversation {args.index}: {len(messages)} messages, {len(ids)} tokens, "
          f"{sum(mask)} trained" + (" (green)" if color else " (between [[ and ]])"))
    print(render_mask(tok, ids[:cut], mask[:cut], color))
    if cut < len(ids):
        kept = sum(mask[1:cut])
        print(f"--- truncated at context_length={args.context_length}: {len(ids) - cut} tokens dropped; "
              f"{kept} trained tokens remain" + ("" if kept else " -> this conversation would be DROPPED"))
        print(render_mask(tok, ids[cut:], mask[cut:], color))
    return 0
