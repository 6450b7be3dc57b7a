"""LoRA adapters after training: fold them into a plain checkpoint.

  diyllm lora merge --ckpt runs/sft_lora --out merged.pt

--ckpt is a LoRA run's checkpoint (or run folder: best.pt, else latest.pt), which holds only the
adapters and a reference to its base; --out gets an ordinary checkpoint with W + scale·B·A in place of
every adapted W, which sample, chat, export and fine-tuning read like any other. (sample and chat also
read the adapter checkpoint directly, unmerged.)
"""

from __future__ import annotations

import argparse
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    merge = sub.add_parser("merge", help="fold adapters into a plain checkpoint")
    merge.add_argument("--ckpt", required=True, help="LoRA checkpoint file or run folder")
    merge.add_argument("--out", required=True, help="checkpoint file to write")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def merge_checkpoint(ckpt: str, out: str, overwrite: bool = False) -> dict:
    """Write the merged plain checkpoint of LoRA checkpoint `ckpt` to `out`; return a summary."""
    from diyllm.errors import UserError
    from diyllm.model.lora import merge_lora
    from diyllm.training.checkpoint import load_model, save_checkpoint

    if os.path.exists(out) and not overwrite:
        raise UserError(f"{out} exists; choose another --out or pass --overwrite to replace it")
    if os.path.isdir(out):
        raise UserError(f"--out {out} is a folder; give a checkpoint file name such as merged.pt")
    model, _, saved = load_model(ckpt)
    if "lora" not in saved:
        raise UserError(f"{ckpt} is not a LoRA checkpoint (no 'lora' entry); there is nothing to merge")
    merge_lora(model)
    extra = {k: saved[k] for k in ("tokenizer", "train_config", "best_val_loss") if k in saved}
    save_checkpoint(model, None, int(saved.get("iteration", 0)), out, model_config=model.config.to_dict(),
                    merged_from={"adapters": os.path.abspath(ckpt), **saved["lora"]}, **extra)
    return {"adapters": sum(t.numel() for t in saved["model"].values()), "base": saved["lora"]["base"]}


def run(args: argparse.Namespace) -> int:
    info = merge_checkpoint(args.ckpt, args.out, args.overwrite)
    print(f"merged {info['adapters']:,} adapter values from {args.ckpt} into base {info['base']} -> {args.out}")
    return 0
