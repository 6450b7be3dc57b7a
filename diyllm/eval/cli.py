"""Evaluate a checkpoint on standard benchmarks and/or the synthetic tasks.

    diyllm eval --ckpt runs/x --tasks hellaswag,arc_easy --limit 200 --data_dir evaldata --out results.json

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
    parser.add_argument("--tasks", required=True, help="comma-separated task names")
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

    check_options(args.limit, args.shots, args.batch_size)  # before the (slow) model load
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
