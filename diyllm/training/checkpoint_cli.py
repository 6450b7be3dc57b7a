"""Checkpoint tools.

  diyllm checkpoint consolidate runs/big/latest --out model.pt

`consolidate` turns a sharded checkpoint folder (DCP, written by `parallelism = "fsdp"` runs) into the
single-file checkpoint that sample, chat, export and `init_from` read: full weights, the model and
training configs, the tokenizer and the iteration (no optimizer state: resume a run from its folder).
Those commands also accept the folder directly; consolidating once saves re-assembling it each time.
"""

from __future__ import annotations

import argparse
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    cons = sub.add_parser("consolidate", help="a DCP checkpoint folder -> one .pt file")
    cons.add_argument("folder", help="a DCP checkpoint folder, e.g. RUN_DIR/latest or RUN_DIR/best")
    cons.add_argument("--out", required=True, help="the .pt file to write")
    cons.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def run(args: argparse.Namespace) -> int:
    from diyllm.errors import UserError
    from diyllm.sharded_checkpoints import consolidate, is_dcp_folder

    if not is_dcp_folder(args.folder):
        raise UserError(f"{args.folder} is not a sharded (DCP) checkpoint folder (no .metadata, no *.distcp); "
                        "single-file .pt checkpoints need no consolidation")
    if os.path.exists(args.out) and not args.overwrite:
        raise UserError(f"{args.out} exists; pass --overwrite to replace it")
    if os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a folder; give a file name such as model.pt")
    ckpt = consolidate(args.folder, args.out)
    n = sum(t.numel() for k, t in ckpt["model"].items() if k != "lm_head.weight" or not
            ckpt.get("model_config", {}).get("tie_embeddings"))
    print(f"wrote {args.out}: {n / 1e6:.2f}M parameters, iteration {ckpt.get('iteration', 0)}")
    return 0
