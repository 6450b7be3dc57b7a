"""What int8 decoding costs in quality: a checkpoint's loss over a whole val split, float vs int8 vs w8a8.

    python benchmarks/bench_quantize_quality.py --ckpt runs/shakespeare_char_speedrun --data_dir data/shakespeare_char

The val split is cut into consecutive windows of the model's context length (every token scored once,
with the tokens before it in its window as context), and the same windows go through the float model
and its two generation copies (model/quantize.py): `int8` (int8 weights, bfloat16 activations) and
`w8a8` (int8 activations too). The speed side is benchmarks/bench_generate.py.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a run folder or .pt file (as for diyllm sample)")
    p.add_argument("--data_dir", required=True, help="the prepared dataset the model was trained on")
    p.add_argument("--max_tokens", type=int, default=2_000_000, help="score at most this many val tokens")
    args = p.parse_args()
    from diyllm.eval.val_split import score_val_split
    from diyllm.loading import load_model
    from diyllm.model.quantize import quantized_for

    model, tokenizer, _ = load_model(args.ckpt, device=torch.device("cpu"))
    base = None
    for name in ("none", "int8", "w8a8"):
        start = time.perf_counter()
        # `diyllm eval --val_split`'s scorer: consecutive windows of the context length, every token once
        score = score_val_split(model if name == "none" else quantized_for(model, name), args.data_dir, tokenizer,
                                max_tokens=args.max_tokens, batch_size=64)
        loss = score["val_loss"]
        if base is None:
            print(f"{args.ckpt}: {score['val_tokens']:,} val tokens in windows of {model.config.context_length}")
        base = loss if base is None else base
        print(f"  {name:<5} val loss {loss:.4f}  ({loss - base:+.4f} vs float32, {time.perf_counter() - start:.1f}s)")


if __name__ == "__main__":
    from diyllm.errors import UserError

    try:
        main()
    except UserError as exc:  # a missing checkpoint or dataset: one line, not a traceback
        raise SystemExit(f"error: {exc}") from None
