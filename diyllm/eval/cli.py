"""Evaluate a checkpoint on standard benchmarks and/or the synthetic tasks.

    diyllm eval --ckpt runs/x --tasks hellaswag,arc_easy --limit 200 --data_dir evaldata --out results.json
    diyllm eval --ckpt runs/x --val_split data/shakespeare_bpe512     # the loss over a prepared val split

Tasks: hellaswag, arc_easy, arc_challenge, piqa, winogrande, lambada, mmlu, ceval, cmmlu, gsm8k, synthetic.
Data comes from --data_dir DIR/<task>/<split>.jsonl (the public dataset's own rows) or is downloaded from
the Hugging Face Hub into ~/.cache/diyllm/eval on first use. See docs/eval.md for the prompt formats.
"""

from __future__ import annotations

import argparse
import os

from diyllm.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="checkpoint .pt, run folder, or hf:DIR")
    parser.add_argument("--tasks", default=None, help="comma-separated task names")
    parser.add_argument("--val_split", default=None, metavar="DIR",
                        help="instead of --tasks: the loss over the val split of a prepared dataset, every token "
                             "once (what final_val_tokens reports at the end of training)")
    parser.add_argument("--max_tokens", type=int, default=10**9, help="--val_split: score at most this many tokens")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N items of each task")
    parser.add_argument("--shots", type=int, default=0, help="few-shot examples per item (seeded)")
    parser.add_argument("--batch_size", type=int, default=16, help="rows per forward pass")
    parser.add_argument("--data_dir", default=None, help="local task data: DIR/<task>/<split>.jsonl")
    parser.add_argument("--out", default=None, help="write results.json here")
    parser.add_argument("--log_samples", action="store_true", help="keep per-item predictions in --out")
    parser.add_argument("--chat", action="store_true", help="prompt through the chat template (SFT models)")
    parser.add_argument("--seed", type=int, default=1234, help="few-shot sampling seed")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps ...")


def run(args: argparse.Namespace) -> int:
    from diyllm.eval.report import format_table, write_results
    from diyllm.eval.runner import check_options, evaluate
    from diyllm.eval.tasks import parse_task_list
    from diyllm.loading import load_model

    if (args.tasks is None) == (args.val_split is None):
        raise UserError("give --tasks NAMES (benchmarks) or --val_split DIR (a prepared dataset's val split)")
    check_options(args.limit, args.shots, args.batch_size)  # before the (slow) model load
    if args.val_split is not None:
        return val_split(args)
    parse_task_list(args.tasks)
    if args.log_samples and not args.out:
        raise UserError("--log_samples keeps per-item predictions in the results file; add --out results.json")
    if args.out and os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a folder; give a file name such as {args.out}/results.json")
    model, tokenizer, _ = load_model(args.ckpt, device=args.device)
    if tokenizer is None:
        raise UserError(f"{args.ckpt} embeds no tokenizer, so text cannot be encoded; "
                        "use a checkpoint written by diyllm train")
    results = evaluate(model, tokenizer, args.tasks, limit=args.limit, shots=args.shots, batch_size=args.batch_size,
                       data_dir=args.data_dir, chat=args.chat, seed=args.seed, log_samples=args.log_samples)
    results["config"]["ckpt"] = os.fspath(args.ckpt)
    print(format_table(results))
    if args.out:
        write_results(results, args.out)
        print(f"wrote {args.out}")
    return 0


def val_split(args: argparse.Namespace) -> int:
    """--val_split DIR: one line with the loss (and --out: the same numbers as JSON)."""
    import json

    from diyllm.atomic import atomic_write
    from diyllm.data.dataset import read_meta
    from diyllm.eval.val_split import score_val_split
    from diyllm.loading import load_model

    read_meta(args.val_split)  # a missing or unprepared folder: its error before the (slow) model load
    model, tokenizer, _ = load_model(args.ckpt, device=args.device)
    result = score_val_split(model, args.val_split, tokenizer, max_tokens=args.max_tokens, batch_size=args.batch_size)
    bpb = "" if result["val_bpb"] is None else f" | val bpb {result['val_bpb']:.4f}"
    print(f"{args.ckpt}: val loss {result['val_loss']:.4f}{bpb} over {result['val_tokens']:,} val tokens of "
          f"{args.val_split}, each scored once")
    if args.out:
        with atomic_write(args.out, "w", encoding="utf-8") as f:
            json.dump({"ckpt": os.fspath(args.ckpt), "val_split": os.fspath(args.val_split), **result}, f, indent=2)
        print(f"wrote {args.out}")
    return 0
