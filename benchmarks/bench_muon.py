"""Muon's Newton-Schulz in bfloat16 vs float32 on this machine, at the stacks the trainer batches.

    python benchmarks/bench_muon.py
    python benchmarks/bench_muon.py --reps 10   # steadier figures (bfloat16 without hardware support is slow)

`muon_ns_dtype=auto` takes bfloat16 only where `native_bf16_matmul` says the hardware multiplies it
(CUDA from Ampere on; CPUs with AVX-512 BF16 or AMX). This prints both precisions' time per call for the
same-shape stacks of `shakespeare_speedrun` (d_model 128, d_ff 512, 4 layers) and of bench_train's
medium shape (d_model 384, d_ff 1024, 6 layers), so the rule can be checked against a new machine; and
float32's plain loop beside its default, which takes the Gram fast path for the long w1/w3/w2 stacks.
"""

from __future__ import annotations

import argparse
import time

import torch

from diyllm.training.device import native_bf16_matmul
from diyllm.training.newton_schulz import newton_schulz_dtype, newton_schulz_orthogonalize

STACKS = {  # (matrices, rows, cols): what _orthogonalize_all stacks for one step
    "speedrun q/k/v/o": (16, 128, 128), "speedrun w1/w3": (8, 512, 128), "speedrun w2": (4, 128, 512),
    "medium q/k/v/o": (24, 384, 384), "medium w1/w3": (12, 1024, 384), "medium w2": (6, 384, 1024),
}


def per_call_ms(g: torch.Tensor, dtype: torch.dtype, reps: int, **kw) -> float:
    newton_schulz_orthogonalize(g, dtype=dtype, **kw)  # warm-up
    start = time.perf_counter()
    for _ in range(reps):
        newton_schulz_orthogonalize(g, dtype=dtype, **kw)
    return (time.perf_counter() - start) / reps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    auto = str(newton_schulz_dtype(device.type)).replace("torch.", "")
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads; native bfloat16 matmul: "
          f"{native_bf16_matmul(device.type)} -> muon_ns_dtype=auto takes {auto}")
    totals = {torch.bfloat16: 0.0, torch.float32: 0.0}
    for name, shape in STACKS.items():
        g = torch.randn(*shape, device=device)
        ms = {dtype: per_call_ms(g, dtype, args.reps) for dtype in totals}
        for dtype in totals:
            totals[dtype] += ms[dtype]
        plain = per_call_ms(g, torch.float32, args.reps, via_gram=False)  # float32 without the Gram fast path
        print(f"  {name:<18} {'x'.join(map(str, shape)):>12}: bfloat16 {ms[torch.bfloat16]:9.2f} ms  "
              f"float32 {ms[torch.float32]:8.2f} ms  ({ms[torch.bfloat16] / ms[torch.float32]:.2f}x; "
              f"float32's plain loop {plain:.2f} ms)")
    faster = min(totals, key=totals.get)
    print(f"all stacks: bfloat16 {totals[torch.bfloat16]:.1f} ms, float32 {totals[torch.float32]:.1f} ms; "
          f"faster here: {str(faster).replace('torch.', '')} (auto takes {auto})")


if __name__ == "__main__":
    main()
