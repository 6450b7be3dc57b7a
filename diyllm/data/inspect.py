"""Look inside a prepared dataset: sizes, dtype, and one training window decoded as x and y.

y is x shifted left by one token: at every position the model sees x[..t] and must predict y[t]. The
uniform-guess loss ln(V) is what an untrained model scores; a trained one should end far below it.
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from diyllm.data.dataset import load_split, read_meta, tokenizer_path
from diyllm.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data_dir", help="folder written by `diyllm prepare`")
    parser.add_argument("--split", choices=["train", "val"], default="train")
    parser.add_argument("--context", type=int, default=16, help="tokens in the sample window")
    parser.add_argument("--seed", type=int, default=0, help="picks the window position")


def _show(tok: object, i: int) -> str:
    s = tok.decode([int(i)])  # type: ignore[attr-defined]
    return repr(s)[1:-1][:18]


def run(args: argparse.Namespace) -> int:
    from diyllm.tokenizers import load_tokenizer

    meta = read_meta(args.data_dir)
    tok = load_tokenizer(tokenizer_path(args.data_dir))
    data = load_split(args.data_dir, args.split)
    V = int(meta["vocab_size"])
    print(f"dataset     {args.data_dir}")
    print(f"tokenizer   {meta.get('tokenizer_kind')} (vocab_size {V}, eot_id {meta.get('eot_id')})")
    print(f"dtype       {meta['dtype']}")
    print(f"train       {meta.get('train_tokens', 0):,} tokens ({meta.get('train_documents', '?')} documents)")
    print(f"val         {meta.get('val_tokens', 0):,} tokens ({meta.get('val_documents', '?')} documents)")
    print(f"split       {meta.get('split_mode')} (val_fraction {meta.get('val_fraction')}, seed {meta.get('seed')})")
    print(f"ln(V)       {math.log(V):.4f}  (loss of a uniform guess over {V} tokens)")
    n = len(data)
    T = args.context
    if n < T + 1:
        raise UserError(f"the {args.split} split has {n} tokens, fewer than a window of {T + 1}")
    start = int(np.random.default_rng(args.seed).integers(0, n - T))
    window = np.asarray(data[start : start + T + 1]).astype(np.int64)
    x, y = window[:-1], window[1:]
    print(f"\nwindow at {args.split}[{start}:{start + T + 1}]  (y is x shifted by one)")
    print(f"{'t':>4}  {'x id':>7}  {'x token':<20}  {'y id':>7}  {'y token':<20}")
    for t in range(T):
        print(f"{t:>4}  {x[t]:>7}  {_show(tok, x[t]):<20}  {y[t]:>7}  {_show(tok, y[t]):<20}")
    print("\nx decoded:", repr(tok.decode(x.tolist())))
    print("y decoded:", repr(tok.decode(y.tolist())))
    return 0
