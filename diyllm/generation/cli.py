"""Generate text from a checkpoint.

Examples:
  diyllm sample --ckpt out/shakespeare_char/best.pt --prompt "ROMEO:" --max_new_tokens 300
  diyllm sample --ckpt out/run --num_samples 3 --temperature 0.8 --top_k 50 --seed 1
  diyllm sample --ckpt out/run --prompt "def " --temperature 0 --no_cache      # greedy, reference path
  diyllm sample --ckpt out/run --max_new_tokens 2000 --compile                 # compiled decode step

One sample is streamed to the terminal as it is produced; several are generated as one batch and printed
one after another. Throughput (new tokens per second) goes to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import warnings

import torch

from diyllm.errors import UserError
from diyllm.model.quantize import QUANTIZE_CHOICES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="checkpoint .pt file or run folder (uses best.pt)")
    parser.add_argument("--prompt", default="", help="text to continue (default: start from end-of-text)")
    parser.add_argument("--num_samples", type=int, default=1)
    parser.add_argument("--max_new_tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--top_p", type=float, default=None, help="nucleus sampling, e.g. 0.9")
    parser.add_argument("--repetition_penalty", type=float, default=1.0, help="> 1 discourages repeats")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--no_cache", action="store_true", help="re-run the whole prefix each step (reference)")
    parser.add_argument("--compile", action="store_true",
                        help="static KV cache + torch.compile'd decode step (one-off compile, then faster)")
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="none",
                        help="int8: decode with int8 weights and bfloat16 activations (CPU: ~4x less to read "
                             "per token; combine with --compile); w8a8: int8 activations too (int8 dot "
                             "products: faster compiled)")
    parser.add_argument("--context", choices=("slide", "stop"), default="slide",
                        help="when the context window is full: drop the oldest tokens or stop")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")


# Samples are generated this many at a time, so --num_samples 100000 needs the memory of one batch.
SAMPLE_BATCH = 64


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    if prompt:
        try:
            ids = tokenizer.encode(prompt)
        except ValueError as exc:  # e.g. a character outside a char tokenizer's vocabulary
            raise UserError(f"--prompt cannot be encoded with this checkpoint's tokenizer: {exc}") from None
        if ids:
            return ids
    if getattr(tokenizer, "eot_id", None) is not None:
        return [tokenizer.eot_id]
    ids = tokenizer.encode("\n")
    if not ids:
        raise UserError("empty --prompt and the tokenizer has neither <|endoftext|> nor a newline; pass --prompt")
    return ids


def _check_options(args: argparse.Namespace) -> None:
    if args.num_samples < 1:
        raise UserError(f"--num_samples must be >= 1 (got {args.num_samples})")
    if args.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be >= 1 (got {args.max_new_tokens})")
    if args.temperature < 0:
        raise UserError(f"--temperature must be >= 0 (got {args.temperature}); 0 means greedy")
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top_k must be >= 1 (got {args.top_k})")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top_p must be in (0, 1] (got {args.top_p})")
    if args.repetition_penalty <= 0:
        raise UserError(f"--repetition_penalty must be > 0 (got {args.repetition_penalty})")


def run(args: argparse.Namespace) -> int:
    from diyllm.generation.generate import generate
    from diyllm.generation.sampling import SamplingParams
    from diyllm.generation.text import stream_text
    from diyllm.loading import load_model
    from diyllm.training.device import resolve_device

    _check_options(args)
    if args.compile and args.no_cache:
        raise UserError("--compile decodes with a static KV cache; drop --no_cache (or --compile)")
    model, tokenizer, _ = load_model(args.ckpt, device=resolve_device(args.device))
    if tokenizer is None:
        raise UserError(f"{args.ckpt} holds no tokenizer, so text cannot be encoded; retrain with `diyllm train`")
    ids = _prompt_ids(tokenizer, args.prompt)
    ctx = model.config.context_length
    if args.context == "stop" and len(ids) > ctx:
        raise UserError(f"--prompt is {len(ids)} tokens, longer than the model's context of {ctx} tokens, and "
                        "--context stop keeps every prompt token; shorten it or use --context slide")
    eot = getattr(tokenizer, "eot_id", None)
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            repetition_penalty=args.repetition_penalty, seed=args.seed, use_cache=not args.no_cache,
                            context=args.context, vocab_limit=tokenizer.vocab_size,
                            stop_ids=(eot,) if eot is not None else (), compile=args.compile, quantize=args.quantize)
    if args.seed is not None:
        torch.manual_seed(args.seed)

    start = time.perf_counter()
    num_tokens = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if args.num_samples == 1:
            stats: dict = {}
            sys.stdout.write(args.prompt)
            for piece in stream_text(model, tokenizer, ids, args.max_new_tokens, stop_strings=args.stop,
                                     stats=stats, params=params):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            num_tokens = stats.get("num_tokens", 0)
        else:
            done = 0
            while done < args.num_samples:  # in batches: memory stays that of SAMPLE_BATCH samples
                n = min(SAMPLE_BATCH, args.num_samples - done)
                seed = None if args.seed is None else args.seed + done
                rows = generate(model, [ids] * n, args.max_new_tokens, dataclasses.replace(params, seed=seed))
                num_tokens += sum(len(r) for r in rows)
                for i, row in enumerate(rows, start=done + 1):
                    text = tokenizer.decode(row)
                    for s in args.stop:
                        text = text.split(s, 1)[0]
                    print(f"--- sample {i}/{args.num_samples} ---")
                    print(args.prompt + text)
                done += n
    elapsed = time.perf_counter() - start
    sys.stdout.flush()  # the text first, then the notes on stderr
    for w in caught:
        print(f"note: {w.message}", file=sys.stderr)
    mode = "no cache" if args.no_cache else "KV cache"
    if args.compile:
        from diyllm.generation.compiled import compile_seconds

        took = compile_seconds(model)
        mode = f"compiled, {took:.1f}s of it compiling" if took is not None else "compile unavailable, eager"
    print(f"[{num_tokens} new tokens in {elapsed:.2f}s: {num_tokens / max(elapsed, 1e-9):.1f} tokens/s, "
          f"{mode}]", file=sys.stderr)
    return 0
