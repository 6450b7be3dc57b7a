"""Look inside a prepared dataset: shards, sizes, dtype, and one training window decoded as x and y.

The dataset is opened with the same validation as training (sizes vs manifest, dtype, ids < vocab), so
a damaged folder fails here with the message the trainer would give; --verify also recomputes the SHA-256
of every shard against the manifest, whatever the record of earlier verifications says (diyllm.data.checksums).

y is x shifted left by one token: at every position the model sees x[..t] and must predict y[t]. The
uniform-guess loss ln(V) is what an untrained model scores; a trained one should end far below it.
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from diyllm.data.dataset import checksummed_shards, manifest_shards, open_dataset, tokenizer_path
from diyllm.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data_dir", help="folder written by `diyllm prepare`")
    parser.add_argument("--split", choices=["train", "val"], default="train")
    parser.add_argument("--context", type=int, default=16, help="tokens in the sample window")
    parser.add_argument("--seed", type=int, default=0, help="picks the window position")
    parser.add_argument("--shard", type=int, default=None, help="take the window from this shard of the split")
    parser.add_argument("--verify", action="store_true", help="recompute every shard's SHA-256 (reads all data)")


def _show(tok: object, i: int) -> str:
    s = tok.decode([int(i)])  # type: ignore[attr-defined]
    return repr(s)[1:-1][:18]


def run(args: argparse.Namespace) -> int:
    from diyllm.data.checksums import checksum_problem
    from diyllm.tokenizers import load_tokenizer

    dataset = open_dataset(args.data_dir)
    if args.verify:  # every shard, not only the ones listed below
        problem = checksum_problem(dataset.path, checksummed_shards(dataset.path, dataset.meta), trust_stamp=False)
        if problem:
            raise UserError(problem)
    meta = dataset.meta
    tok = load_tokenizer(tokenizer_path(args.data_dir))
    V = dataset.vocab_size
    print(f"dataset     {args.data_dir}")
    print(f"tokenizer   {meta.get('tokenizer_kind')} (vocab_size {V}, eot_id {meta.get('eot_id')})")
    print(f"dtype       {meta['dtype']}")
    print(f"train       {meta.get('train_tokens', 0):,} tokens ({meta.get('train_documents', '?')} documents)")
    print(f"val         {meta.get('val_tokens', 0):,} tokens ({meta.get('val_documents', '?')} documents)")
    print(f"split       {meta.get('split_mode')} (val_fraction {meta.get('val_fraction')}, seed {meta.get('seed')})")
    print(f"ln(V)       {math.log(V):.4f}  (loss of a uniform guess over {V} tokens)")
    if "documents_seen" in meta:
        print(f"hygiene     {meta['documents_seen']:,} documents read, "
              f"{meta.get('duplicates_dropped', 0):,} duplicates "
              f"and {meta.get('too_short_dropped', 0):,} too short (< {meta.get('min_chars', 0)} chars) dropped")
    shards = manifest_shards(meta)
    for split, entries in shards.items():
        print(f"{split} shards ({len(entries)}):")
        for i, e in enumerate(entries[:10]):
            line = f"  {e['file']:<18} {len(dataset.splits[split].arrays[i]):>14,} tokens"
            if e.get("documents") is not None:
                line += f"  {e['documents']:>10,} documents"
            if args.verify and e.get("sha256"):
                line += "  sha256 ok"
            print(line)
        if len(entries) > 10:
            print(f"  ... {len(entries) - 10} more")
    parts = dataset.splits[args.split]
    if args.shard is not None:
        if not 0 <= args.shard < len(parts.arrays):
            raise UserError(f"--shard {args.shard}: the {args.split} split has shards 0..{len(parts.arrays) - 1}")
        data = parts.arrays[args.shard]
    else:
        data = parts
    n = len(data)
    T = args.context
    if n < T + 1:
        raise UserError(f"the {args.split} split has {n} tokens, fewer than a window of {T + 1}")
    start = int(np.random.default_rng(args.seed).integers(0, n - T))
    window = np.asarray(data[start : start + T + 1]).astype(np.int64)
    x, y = window[:-1], window[1:]
    where = args.split if args.shard is None else shards[args.split][args.shard]["file"]
    print(f"\nwindow at {where}[{start}:{start + T + 1}]  (y is x shifted by one)")
    print(f"{'t':>4}  {'x id':>7}  {'x token':<20}  {'y id':>7}  {'y token':<20}")
    for t in range(T):
        print(f"{t:>4}  {x[t]:>7}  {_show(tok, x[t]):<20}  {y[t]:>7}  {_show(tok, y[t]):<20}")
    print("\nx decoded:", repr(tok.decode(x.tolist())))
    print("y decoded:", repr(tok.decode(y.tolist())))
    return 0
