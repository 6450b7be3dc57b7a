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
import torch.nn.functional as F


def val_windows(data_dir: str, context: int, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    from diyllm.data.dataset import open_dataset

    val = open_dataset(data_dir, require_val=True).split("val")
    n = min(len(val) - 1, max_tokens) // context * context
    ids = torch.from_numpy(val[: n + 1].astype("int64"))
    return ids[:-1].view(-1, context), ids[1:].view(-1, context)


@torch.no_grad()
def mean_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 64) -> float:
    total = 0.0
    for i in range(0, len(x), batch):
        logits = model(x[i : i + batch]).logits.float()
        total += F.cross_entropy(logits.flatten(0, 1), y[i : i + batch].flatten(), reduction="sum").item()
    return total / y.numel()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a run folder or .pt file (as for diyllm sample)")
    p.add_argument("--data_dir", required=True, help="the prepared dataset the model was trained on")
    p.add_argument("--max_tokens", type=int, default=2_000_000, help="score at most this many val tokens")
    args = p.parse_args()
    from diyllm.loading import load_model
    from diyllm.model.quantize import quantized_for

    model, _, _ = load_model(args.ckpt, device=torch.device("cpu"))
    model.eval()
    x, y = val_windows(args.data_dir, model.config.context_length, args.max_tokens)
    print(f"{args.ckpt}: {y.numel():,} val tokens in windows of {model.config.context_length}")
    base = None
    for name in ("none", "int8", "w8a8"):
        start = time.perf_counter()
        loss = mean_loss(model if name == "none" else quantized_for(model, name), x, y)
        base = loss if base is None else base
        print(f"  {name:<5} val loss {loss:.4f}  ({loss - base:+.4f} vs float32, {time.perf_counter() - start:.1f}s)")


if __name__ == "__main__":
    from diyllm.errors import UserError

    try:
        main()
    except UserError as exc:  # a missing checkpoint or dataset: one line, not a traceback
        raise SystemExit(f"error: {exc}") from None
