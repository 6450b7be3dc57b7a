"""Ready-made experiments that each answer one question with one command.

  diyllm lab pretrain-vs-sft            # a few minutes on CPU
  diyllm lab pretrain-vs-sft --quick    # well under a minute (what the tests run)
  diyllm lab synthetic-data --out data/synthetic_chat     # just write the synthetic JSONL files
  diyllm lab masking --quick            # causal LM vs MLM-style masking (diyllm/lab/masking.py)

pretrain-vs-sft: what does supervised fine-tuning add to a pretrained model?
 1. Synthetic data (diyllm.data.synthetic): plain sentences stating facts (capitals, sums, reversed /
    spelled words, letter counts) for pretraining, and chat conversations asking about the same facts,
    with a held-out split whose question phrasings never appear in SFT training.
 2. Pretrain a tiny byte-level model on the sentences (JSONL source, packed windows).
 3. Ask it the held-out questions in the chat format: it has never seen <|im_start|>/<|im_end|>, so it
    just continues the text and exact match is ~0.
 4. SFT the same weights on the training conversations (assistant-only loss) and ask again: it now
    answers in the format, and stops.
 5. The third arm: the same SFT, same data and steps, from a randomly initialised model (no pretraining).
Prints a table of the three arms (data / task / loss span / what was learned / exact match), exact match
per task and a few answers side by side; writes report.json into the output folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

EXPERIMENTS = ("pretrain-vs-sft", "synthetic-data", "post-training", "masking")  # post-training: lab/post_training.py


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", choices=EXPERIMENTS)
    parser.add_argument("--quick", action="store_true", help="tiny settings (well under a minute)")
    parser.add_argument("--out", default=None, help="output folder (default runs/lab/<experiment>)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", type=int, default=6, help="answers shown side by side")
    parser.add_argument("--pretrain_shards", type=int, default=1,
                        help="synthetic-data: split the pretraining documents over N files pretrain_00.jsonl, ...")


def settings(quick: bool) -> dict[str, Any]:
    """Model and schedule sizes; quick is for tests and first looks, the default for a clearer result."""
    if quick:
        return dict(d_model=64, num_layers=2, num_heads=4, context_length=80, batch_size=16,
                    pretrain_iters=150, sft_iters=150, pretrain_docs=500, sft_train=600, sft_val=60,
                    pretrain_lr=3e-3, sft_lr=2e-3, tasks=("capital", "add", "reverse"), system=False)
    return dict(d_model=96, num_layers=3, num_heads=4, context_length=128, batch_size=16,
                pretrain_iters=700, sft_iters=400, pretrain_docs=3000, sft_train=3000, sft_val=200,
                pretrain_lr=3e-3, sft_lr=1e-3, tasks=("capital", "add", "reverse", "spell", "count"), system=True)


def write_synthetic(out: Path, s: dict, seed: int, pretrain_shards: int = 1) -> dict[str, Path]:
    """pretrain.jsonl ({"text"} rows), sft_train/sft_val.jsonl (conversations). With pretrain_shards > 1
    the pretraining documents are dealt round-robin into pretrain_00.jsonl, pretrain_01.jsonl, ... instead
    (several files, as a streaming source over a glob expects)."""
    from diyllm.data.synthetic import make_splits, plain_text_corpus, write_jsonl

    train, val = make_splits(s["sft_train"], s["sft_val"], seed, s["tasks"], s["system"])
    docs = [{"text": t} for t in plain_text_corpus(s["pretrain_docs"], seed, s["tasks"])]
    paths = {"train": out / "sft_train.jsonl", "val": out / "sft_val.jsonl"}
    if pretrain_shards > 1:
        for i in range(pretrain_shards):
            paths[f"pretrain_{i:02d}"] = out / f"pretrain_{i:02d}.jsonl"
            write_jsonl(paths[f"pretrain_{i:02d}"], docs[i::pretrain_shards])
    else:
        paths["pretrain"] = out / "pretrain.jsonl"
        write_jsonl(paths["pretrain"], docs)
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
                  weight_decay=0.0, dropout=0.0, warmup_iters=20, checkpoint_interval=0,
                  overwrite=True)  # the experiment rebuilds its own folder (data included) on every run
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

    log("[4/5] asking the fine-tuned model the same questions")
    tuned, tuned_tok, _ = load_model(out / "sft" / "best.pt", device=device)
    after, after_replies = exact_match(tuned, tuned_tok, val, return_replies=True)

    log(f"[5/5] the same SFT from a random init (no pretraining), {s['sft_iters']} iterations, then the same questions")
    from diyllm.data.sft import SFTSource

    scratch_cfg = dataclasses.replace(sft_cfg, data_format="sft", init_from="scratch",
                                      tokenizer_path=str(out / "data" / "tokenizer.json"),
                                      out_dir=str(out / "sft_from_scratch"))
    scratch_source = SFTSource.from_config(scratch_cfg, tokenizer=byte_tokenizer())
    scratch_cfg = dataclasses.replace(scratch_cfg, vocab_size=scratch_source.vocab_size)
    scratch = train(scratch_cfg, source=scratch_source)
    fresh, fresh_tok, _ = load_model(out / "sft_from_scratch" / "best.pt", device=device)
    from_scratch, scratch_replies = exact_match(fresh, fresh_tok, val, return_replies=True)

    report = {
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in s.items()},
        "held_out_questions": len(val),
        "exact_match_before": before, "exact_match_after": after, "exact_match_sft_from_scratch": from_scratch,
        "per_task_before": per_task(val, before_replies), "per_task_after": per_task(val, after_replies),
        "per_task_sft_from_scratch": per_task(val, scratch_replies),
        "pretrain_val_loss": pre.best_val_loss, "sft_val_loss": post.best_val_loss,
        "sft_from_scratch_val_loss": scratch.best_val_loss,
        "examples": [{"question": c["conversations"][-2]["content"], "answer": c["conversations"][-1]["content"],
                      "before": b, "after": a, "from_scratch": f}
                     for c, b, a, f in zip(val[:show], before_replies, after_replies, scratch_replies)],
        "seconds": time.perf_counter() - t0,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    torch.set_grad_enabled(True)
    return report


ARMS = (  # (name, data, task, loss span, what it learns, report key)
    ("pretrained only", "plain sentences", "continue the text", "every token",
     "facts as text, no chat format", "exact_match_before"),
    ("pretrain + SFT", "+ conversations", "answer in the chat format", "assistant replies only",
     "the format on top of them", "exact_match_after"),
    ("SFT from scratch", "conversations only", "answer in the chat format", "assistant replies only",
     "format + what SFT data shows", "exact_match_sft_from_scratch"),
)


def print_report(r: dict[str, Any], out: Path) -> None:
    n = r["held_out_questions"]
    print(f"\nthe three arms on {n} held-out questions (exact match):")
    print(f"{'arm':<18}{'data':<20}{'task':<27}{'loss on':<24}{'what was learned':<30}{'exact match':>11}")
    for name, data, task, span, learned, key in ARMS:
        print(f"{name:<18}{data:<20}{task:<27}{span:<24}{learned:<30}{r[key]:>11.1%}")
    print(f"\n{'task':<10}{'pretrained':>11}{'+ SFT':>8}{'SFT only':>10}")
    for task, acc in r["per_task_after"].items():
        print(f"{task:<10}{r['per_task_before'].get(task, 0):>11.0%}{acc:>8.0%}"
              f"{r['per_task_sft_from_scratch'].get(task, 0):>10.0%}")
    print("\nside by side (before = the pretrained model's reply to the same chat prompt):")
    for e in r["examples"]:
        print(f"  Q: {e['question']}   (expected: {e['answer']})")
        print(f"     before:       {e['before'][:70]!r}")
        print(f"     after:        {e['after'][:70]!r}")
        print(f"     from scratch: {e['from_scratch'][:70]!r}")
    print(f"\n{r['seconds']:.0f}s in all; runs, data and report.json in {out}")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out or f"runs/lab/{args.experiment}")
    if args.experiment == "masking":
        from diyllm.lab.masking import run_masking

        r = run_masking(quick=args.quick, seed=args.seed)
        return 0 if r["val_loss"]["causal"] < r["val_loss"]["mlm-style"] else 1
    if args.experiment == "synthetic-data":
        s = settings(args.quick)
        if args.pretrain_shards < 1:
            from diyllm.errors import UserError

            raise UserError(f"--pretrain_shards {args.pretrain_shards}: need at least 1 file")
        paths = write_synthetic(out, s, args.seed, args.pretrain_shards)
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
