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
    from diyllm.data.dataset import open_dataset
    from diyllm.loading import load_model
    from diyllm.model.quantize import quantized_for
    from diyllm.training.components import FinalSplitEval
    from diyllm.training.distributed import DistInfo
    from diyllm.training.objective import NextTokenLoss

    cpu = torch.device("cpu")
    model, _, _ = load_model(args.ckpt, device=cpu)
    val = open_dataset(args.data_dir, require_val=True).split("val")
    # the trainer's final_val_tokens scorer: consecutive windows of the context length, every token once
    scorer = FinalSplitEval(val, model.config.context_length, args.max_tokens, 64, NextTokenLoss(), cpu,
                            torch.float32, DistInfo(), None)
    print(f"{args.ckpt}: {scorer.num_tokens:,} val tokens in windows of {model.config.context_length}")
    base = None
    for name in ("none", "int8", "w8a8"):
        start = time.perf_counter()
        loss = scorer.evaluate(model if name == "none" else quantized_for(model, name))["val_loss"]
        base = loss if base is None else base
        print(f"  {name:<5} val loss {loss:.4f}  ({loss - base:+.4f} vs float32, {time.perf_counter() - start:.1f}s)")


if __name__ == "__main__":
    from diyllm.errors import UserError

    try:
        main()
    except UserError as exc:  # a missing checkpoint or dataset: one line, not a traceback
        raise SystemExit(f"error: {exc}") from None
