"""LoRA vs full fine-tuning on the same shape: trainable fraction, training-state memory, step time.

    python benchmarks/bench_lora.py                     # d_model 384, 6 layers, batch 8 x 256 tokens, rank 8
    python benchmarks/bench_lora.py --quick             # a tiny shape, for a smoke run

Each mode runs in its own subprocess (so its peak RSS is its own): build the model, optionally add LoRA
(rank --rank, all projections), take --steps AdamW steps on random tokens, report the median step time,
the bytes of gradients + optimizer state (counted from the tensors) and the process's peak RSS. The two
modes alternate for --rounds rounds (the machine may be shared) and the medians are compared: LoRA's
saving is the gradient and optimizer memory of the frozen weights; its forward costs a little more.
On a GPU (--device cuda) the peak is torch.cuda.max_memory_allocated instead of RSS.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def one_run(args: argparse.Namespace) -> dict:
    import resource

    import torch

    from diyllm.model import DIYConfig, DIYForCausalLM
    from diyllm.model.lora import apply_lora, trainable_fraction
    from diyllm.training.build import build_optimizer
    from diyllm.training.config import TrainConfig

    torch.manual_seed(0)
    device = torch.device(args.device)
    cfg = DIYConfig(vocab_size=4096, context_length=args.seq, d_model=args.d_model, num_layers=args.layers,
                    num_heads=args.heads)
    model = DIYForCausalLM(cfg).to(device)
    if args.mode == "lora":
        apply_lora(model, args.rank, 2 * args.rank)
    trainable, total = trainable_fraction(model)
    opt = build_optimizer(TrainConfig(weight_decay=0.0, learning_rate=1e-4), model)
    x = torch.randint(0, 4096, (args.batch, args.seq), device=device)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        model(x, targets=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # keep the grads allocated: they are part of the training state
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    state = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    state += sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"trainable": trainable, "total": total, "ms": 1000 * statistics.median(times[1:] or times),
            "state_bytes": state, "peak_bytes": peak}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--d_model", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.d_model, args.layers, args.heads, args.seq, args.batch, args.steps, args.rounds = 64, 2, 4, 64, 4, 3, 1
    if args.mode:
        print(json.dumps(one_run(args)))
        return 0
    results: dict[str, list[dict]] = {"full": [], "lora": []}
    for _ in range(args.rounds):
        for mode in results:
            out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--mode", mode], capture_output=True,
                                 text=True, check=True)
            results[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in results.items()}
    print(f"shape d_model={args.d_model} layers={args.layers} batch {args.batch}x{args.seq}, LoRA rank {args.rank}, "
          f"{args.device}, medians of {args.rounds} rounds")
    print(f"{'':<6}{'trainable':>14}{'fraction':>10}{'grad+optim MB':>15}{'peak MB':>10}{'ms/step':>10}")
    for m, r in med.items():
        print(f"{m:<6}{int(r['trainable']):>14,}{r['trainable'] / r['total']:>10.2%}{r['state_bytes'] / 1e6:>15.1f}"
              f"{r['peak_bytes'] / 1e6:>10.1f}{r['ms']:>10.1f}")
    print(f"LoRA / full: step time {med['lora']['ms'] / med['full']['ms']:.2f}x, training state "
          f"{med['lora']['state_bytes'] / med['full']['state_bytes']:.3f}x, peak "
          f"{med['lora']['peak_bytes'] / med['full']['peak_bytes']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
