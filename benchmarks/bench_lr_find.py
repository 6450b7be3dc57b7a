"""Does the LR finder's suggestion hold up? Short real trainings at the suggestion and 10x below/above.

    python benchmarks/bench_lr_find.py --input ../shared/data/tinyshakespeare.txt
    python benchmarks/bench_lr_find.py --data_dir data/pystdlib --config pystdlib_cpu

Runs `lr_range_test` on a fresh model of the config's shape, then trains the same model from scratch
(same seed, same data, warmup + cosine as configured) at suggestion/10, suggestion, suggestion*10 (which
is the LR at the curve's minimum) and the steepest-descent LR, and prints the final val loss of each next
to the suggestion's. LR finders are known to mislead on transformers; this
is the check. The numbers go into docs/lab.md.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diyllm.lab.common import build_model, train_batches  # noqa: E402
from diyllm.lab.lr_find import lr_range_test  # noqa: E402
from diyllm.training.config import load_config, replace  # noqa: E402
from diyllm.training.trainer import train  # noqa: E402


def folder(name: str) -> str:
    return name.split(" ")[0].replace("/", "_div").replace("*", "_x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="shakespeare_char_cpu")
    p.add_argument("--data_dir", default="data/shakespeare_char")
    p.add_argument("--input", default=None, help="tinyshakespeare.txt, to prepare --data_dir when it is missing")
    p.add_argument("--iters", type=int, default=300, help="steps of each real training")
    p.add_argument("--find_iters", type=int, default=150, help="steps of the LR range test")
    p.add_argument("--out_root", default="runs/bench_lr_find")
    args = p.parse_args()

    if not Path(args.data_dir, "meta.json").is_file():
        from diyllm.data.prepare import prepare_dataset
        from diyllm.data.recipes import RECIPES, resolve_recipe

        recipe = "shakespeare_char" if args.config.startswith("shakespeare_char") else "pystdlib"
        inputs, kw = resolve_recipe(RECIPES[recipe], argparse.Namespace(input=args.input))
        prepare_dataset(inputs, args.data_dir, **kw)

    base = load_config(args.config, [f"--data_dir={args.data_dir}", f"--max_iters={args.iters}",
                                     f"--warmup_iters={args.iters // 10}", f"--eval_interval={args.iters}",
                                     "--eval_iters=40", "--checkpoint_interval=0", "--progress=false",
                                     "--log_interval=1000000", "--device=cpu", "--dtype=float32"])
    torch.manual_seed(base.seed)
    t0 = time.perf_counter()
    res = lr_range_test(build_model(base), train_batches(base, seed=base.seed), 1e-6, 1.0, args.find_iters,
                        betas=(base.beta1, base.beta2), grad_clip=base.grad_clip, progress=False)
    print(f"lr-find ({len(res.lrs)} steps{', diverged' if res.diverged else ''}, {time.perf_counter() - t0:.0f}s): "
          f"suggestion {res.suggestion:.2e} (min/10), steepest {res.steepest_lr:.2e}, minimum {res.lr_at_min:.2e}")
    # suggestion*10 is the LR at the curve's minimum itself (the suggestion is min/10).
    candidates = {"suggestion/10": res.suggestion / 10, "suggestion": res.suggestion,
                  "suggestion*10 (= minimum)": res.suggestion * 10, "steepest": res.steepest_lr}
    results = {}
    for name, lr in candidates.items():
        cfg = replace(base, learning_rate=lr, min_lr=lr / 10, out_dir=f"{args.out_root}/{folder(name)}", run_name=name)
        t = time.perf_counter()
        r = train(cfg)
        results[name] = r.final_val_loss
        print(f"  {name:<14} lr {lr:.2e}: final val loss {r.final_val_loss:.4f} ({time.perf_counter() - t:.0f}s)",
              flush=True)
    ref = results["suggestion"]
    best = min(results, key=lambda k: results[k] if math.isfinite(results[k]) else math.inf)
    print(f"\n| LR | value | final val loss ({args.iters} steps) | vs suggestion |\n|---|---:|---:|---:|")
    for name, lr in candidates.items():
        print(f"| {name} | {lr:.2e} | {results[name]:.4f} | {results[name] - ref:+.4f} |")
    print(f"best of these: {best}")


if __name__ == "__main__":
    main()
