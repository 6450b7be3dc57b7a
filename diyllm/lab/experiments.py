"""Ready-made experiments that each answer one question with one command.

  diyllm lab pretrain-vs-sft            # a few minutes on CPU
  diyllm lab pretrain-vs-sft --quick    # well under a minute (what the tests run)
  diyllm lab synthetic-data --out data/synthetic_chat     # just write the synthetic JSONL files

pretrain-vs-sft: what does supervised fine-tuning add to a pretrained model?
 1. Synthetic data (diyllm.data.synthetic): plain sentences stating facts (capitals, sums, reversed /
    spelled words, letter counts) for pretraining, and chat conversations asking about the same facts,
    with a held-out split whose question phrasings never appear in SFT training.
 2. Pretrain a tiny byte-level model on the sentences (JSONL source, packed windows).
 3. Ask it the held-out questions in the chat format: it has never seen <|im_start|>/<|im_end|>, so it
    just continues the text and exact match is ~0.
 4. SFT the same weights on the training conversations (assistant-only loss) and ask again: it now
    answers in the format, and stops.
Prints exact-match accuracy before/after (overall and per task) and a few answers side by side; writes
report.json into the output folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

EXPERIMENTS = ("pretrain-vs-sft", "synthetic-data", "post-training")  # post-training: diyllm/lab/post_training.py


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", choices=EXPERIMENTS)
    parser.add_argument("--quick", action="store_true", help="tiny settings (well under a minute)")
    parser.add_argument("--out", default=None, help="output folder (default runs/lab/<experiment>)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", type=int, default=6, help="answers shown side by side")


def settings(quick: bool) -> dict[str, Any]:
    """Model and schedule sizes; quick is for tests and first looks, the default for a clearer result."""
    if quick:
        return dict(d_model=64, num_layers=2, num_heads=4, context_length=80, batch_size=16,
                    pretrain_iters=150, sft_iters=150, pretrain_docs=500, sft_train=600, sft_val=60,
                    pretrain_lr=3e-3, sft_lr=2e-3, tasks=("capital", "add", "reverse"), system=False)
    return dict(d_model=96, num_layers=3, num_heads=4, context_length=128, batch_size=16,
                pretrain_iters=700, sft_iters=400, pretrain_docs=3000, sft_train=3000, sft_val=200,
                pretrain_lr=3e-3, sft_lr=1e-3, tasks=("capital", "add", "reverse", "spell", "count"), system=True)


def write_synthetic(out: Path, s: dict, seed: int) -> dict[str, Path]:
    from diyllm.data.synthetic import make_splits, plain_text_corpus, write_jsonl

    train, val = make_splits(s["sft_train"], s["sft_val"], seed, s["tasks"], s["system"])
    paths = {"pretrain": out / "pretrain.jsonl", "train": out / "sft_train.jsonl", "val": out / "sft_val.jsonl"}
    write_jsonl(paths["pretrain"], [{"text": t} for t in plain_text_corpus(s["pretrain_docs"], seed, s["tasks"])])
    write_jsonl(paths["train"], train)
    write_jsonl(paths["val"], val)
    return paths


def byte_tokenizer():
    """256 byte tokens + <|endoftext|> (diyllm.tokenizers.byte_tokenizer)."""
    from diyllm.tokenizers import byte_tokenizer

    return byte_tokenizer()


def per_task(convs: list[dict], replies: list[str]) -> dict[str, float]:
    from diyllm.generation.exact_match import normalise

    tasks: dict[str, list[int]] = {}
    for c, r in zip(convs, replies):
        tasks.setdefault(c["task"], []).append(normalise(r) == normalise(c["conversations"][-1]["content"]))
    return {t: sum(v) / len(v) for t, v in sorted(tasks.items())}


def pretrain_vs_sft(out: Path, quick: bool = False, device: str = "cpu", seed: int = 0, show: int = 6,
                    log=print, **overrides: Any) -> dict[str, Any]:
    """Run the experiment; return the report dict (also written to out/report.json).

    `overrides` replace entries of settings(quick) (e.g. pretrain_iters=100 in a test)."""
    import torch

    s = {**settings(quick), **overrides}
    threads = torch.get_num_threads()
    if quick:  # a model this small is dominated by per-op overhead: extra threads only add contention
        torch.set_num_threads(1)
    try:
        return _pretrain_vs_sft(out, s, quick, device, seed, show, log)
    finally:
        torch.set_num_threads(threads)


def _pretrain_vs_sft(out: Path, s: dict, quick: bool, device: str, seed: int, show: int, log) -> dict[str, Any]:
    import torch

    from diyllm.data.chat_template import add_chat_tokens
    from diyllm.generation.exact_match import exact_match
    from diyllm.loading import load_model
    from diyllm.training.config import TrainConfig
    from diyllm.training.sft_cli import prepare_sft, resize_vocabulary
    from diyllm.training.trainer import train

    t0 = time.perf_counter()
    paths = write_synthetic(out / "data", s, seed)
    tok = byte_tokenizer()
    tok.save(out / "data" / "tokenizer.json")
    common = dict(context_length=s["context_length"], d_model=s["d_model"], num_layers=s["num_layers"],
                  num_heads=s["num_heads"], batch_size=s["batch_size"], device=device, dtype="float32", seed=seed,
                  progress=not quick, eval_iters=4, log_interval=max(1, s["pretrain_iters"] // 5),
                  weight_decay=0.0, dropout=0.0, warmup_iters=20, checkpoint_interval=0)
    log(f"[1/4] pretraining a {s['num_layers']}-layer d={s['d_model']} byte-level model on "
        f"{s['pretrain_docs']} plain-text documents ({s['pretrain_iters']} iterations)")
    pre_cfg = TrainConfig(data_dir=str(paths["pretrain"]), data_format="jsonl",
                          tokenizer_path=str(out / "data" / "tokenizer.json"), out_dir=str(out / "pretrain"),
                          max_iters=s["pretrain_iters"], learning_rate=s["pretrain_lr"], min_lr=s["pretrain_lr"] / 10,
                          eval_interval=s["pretrain_iters"], **common).validate()
    pre = train(pre_cfg)

    val = [json.loads(line) for line in paths["val"].read_text(encoding="utf-8").splitlines()]
    log(f"[2/4] asking the pretrained model {len(val)} held-out questions in the chat format")
    base, base_tok, _ = load_model(out / "pretrain" / "best.pt", device=device)
    add_chat_tokens(base_tok)
    resize_vocabulary(base, base_tok.vocab_size)
    before, before_replies = exact_match(base, base_tok, val, return_replies=True)

    log(f"[3/4] supervised fine-tuning on {s['sft_train']} conversations ({s['sft_iters']} iterations)")
    sft_cfg = TrainConfig(data_dir=str(paths["train"]), val_data=str(paths["val"]), out_dir=str(out / "sft"),
                          init_from=str(out / "pretrain" / "best.pt"), max_iters=s["sft_iters"],
                          learning_rate=s["sft_lr"], min_lr=s["sft_lr"] / 10, eval_interval=s["sft_iters"],
                          **common).validate()
    sft_cfg = dataclasses.replace(sft_cfg, log_interval=max(1, s["sft_iters"] // 5))
    cfg, source, model = prepare_sft(sft_cfg)
    post = train(cfg, source=source, model=model)

    log("[4/4] asking the fine-tuned model the same questions")
    tuned, tuned_tok, _ = load_model(out / "sft" / "best.pt", device=device)
    after, after_replies = exact_match(tuned, tuned_tok, val, return_replies=True)

    report = {
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in s.items()},
        "held_out_questions": len(val),
        "exact_match_before": before, "exact_match_after": after,
        "per_task_before": per_task(val, before_replies), "per_task_after": per_task(val, after_replies),
        "pretrain_val_loss": pre.best_val_loss, "sft_val_loss": post.best_val_loss,
        "examples": [{"question": c["conversations"][-2]["content"], "answer": c["conversations"][-1]["content"],
                      "before": b, "after": a} for c, b, a in zip(val[:show], before_replies, after_replies)],
        "seconds": time.perf_counter() - t0,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    torch.set_grad_enabled(True)
    return report


def print_report(r: dict[str, Any], out: Path) -> None:
    print(f"\nexact match on {r['held_out_questions']} held-out questions: "
          f"pretrained {r['exact_match_before']:.1%}  ->  after SFT {r['exact_match_after']:.1%}")
    print(f"{'task':<10}{'before':>8}{'after':>8}")
    for task, acc in r["per_task_after"].items():
        print(f"{task:<10}{r['per_task_before'].get(task, 0):>8.0%}{acc:>8.0%}")
    print("\nside by side (before = the pretrained model's reply to the same chat prompt):")
    for e in r["examples"]:
        print(f"  Q: {e['question']}   (expected: {e['answer']})")
        print(f"     before: {e['before'][:70]!r}")
        print(f"     after:  {e['after'][:70]!r}")
    print(f"\n{r['seconds']:.0f}s in all; runs, data and report.json in {out}")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out or f"runs/lab/{args.experiment}")
    if args.experiment == "synthetic-data":
        s = settings(args.quick)
        paths = write_synthetic(out, s, args.seed)
        byte_tokenizer().save(out / "tokenizer.json")  # found automatically beside the data
        print("wrote " + ", ".join(str(p) for p in paths.values()) + f" and {out / 'tokenizer.json'}")
        return 0
    if args.experiment == "post-training":
        from diyllm.lab.post_training import post_training
        from diyllm.lab.post_training import print_report as print_post_report

        print_post_report(post_training(out, quick=args.quick, device=args.device, seed=args.seed), out)
        return 0
    report = pretrain_vs_sft(out, quick=args.quick, device=args.device, seed=args.seed, show=args.show)
    print_report(report, out)
    sys.stdout.flush()
    return 0
