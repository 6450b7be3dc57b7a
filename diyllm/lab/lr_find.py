"""Learning-rate range test: raise the LR exponentially from tiny to huge and watch the loss.

    diyllm lr-find configs/pystdlib_cpu.toml --start_lr 1e-6 --end_lr 1 --num_iters 200

A fresh model trains for `num_iters` steps with lr_i = start·(end/start)^(i/(n−1)). The raw loss is
noisy, so it is smoothed with an exponential moving average (bias-corrected, like Adam's moments:
the EMA starts at 0, so early values are divided by 1 − β^i). The test stops once the smoothed loss
exceeds 4× its best value (the LR is now so high that training diverges).

The suggestion is the LR at the minimum of the smoothed curve divided by 10. Why not the minimum
itself: there the LR is already on the edge of instability (the loss bottoms out *because* the next
LRs blow up). Why not the steepest-descent point (also reported): on transformers trained with Adam
the smoothed curve is long and flat, and its steepest point jumps around with the noise and the
smoothing constant. The suggestion is for a *constant* LR over a short horizon; a full run with
warmup + cosine decay usually tolerates a peak a few times higher. docs/lab.md reports how the
suggestion compared with real trainings at 10x below and above it (benchmarks/bench_lr_find.py).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from diyllm.errors import UserError
from diyllm.lab.common import build_model, save_png, tiny_mode, train_batches, with_tiny
from diyllm.training.optim import AdamW, clip_grad_norm_

ACCEPTS_OVERRIDES = True


@dataclass
class LRFindResult:
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    lr_at_min: float = float("nan")
    steepest_lr: float = float("nan")
    suggestion: float = float("nan")  # lr_at_min / 10
    diverged: bool = False  # stopped before num_iters because the loss blew up

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def lr_schedule(start_lr: float, end_lr: float, num_iters: int) -> list[float]:
    """Exponentially spaced LRs from start_lr to end_lr inclusive."""
    if not 0 < start_lr < end_lr:
        raise UserError(f"need 0 < start_lr < end_lr, got start_lr={start_lr}, end_lr={end_lr}")
    if num_iters < 2:
        raise UserError(f"num_iters must be at least 2, got {num_iters}")
    ratio = end_lr / start_lr
    return [start_lr * ratio ** (i / (num_iters - 1)) for i in range(num_iters)]


def lr_range_test(
    model: torch.nn.Module,
    next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    start_lr: float = 1e-7,
    end_lr: float = 1.0,
    num_iters: int = 200,
    smoothing: float = 0.98,
    diverge_factor: float = 4.0,
    betas: tuple[float, float] = (0.9, 0.95),
    weight_decay: float = 0.0,
    grad_clip: float = 1.0,
    progress: bool = True,
) -> LRFindResult:
    """Train `model` in place with an exponentially increasing LR; return the curve and the suggestion."""
    lrs = lr_schedule(start_lr, end_lr, num_iters)
    opt = AdamW(model.parameters(), lr=lrs[0], betas=betas, weight_decay=weight_decay)
    model.train()
    res = LRFindResult()
    avg, best = 0.0, math.inf
    bar = tqdm(lrs, desc="lr-find", disable=not progress, leave=False)
    for i, lr in enumerate(bar, 1):
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = next_batch()
        loss = model(x, targets=y).loss
        value = loss.item()
        if not math.isfinite(value):
            res.diverged = True
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        avg = smoothing * avg + (1 - smoothing) * value
        smooth = avg / (1 - smoothing**i)  # bias correction: the EMA started at 0
        res.lrs.append(lr)
        res.losses.append(value)
        res.smoothed.append(smooth)
        best = min(best, smooth)
        bar.set_postfix(lr=f"{lr:.1e}", loss=f"{smooth:.3f}")
        if i > 5 and smooth > diverge_factor * best:
            res.diverged = True
            break
    bar.close()
    _suggest(res)
    return res


def _suggest(res: LRFindResult) -> None:
    if len(res.smoothed) < 3:
        raise UserError("the loss diverged within the first steps; lower --start_lr")
    i_min = min(range(len(res.smoothed)), key=res.smoothed.__getitem__)
    res.lr_at_min = res.lrs[i_min]
    res.suggestion = res.lr_at_min / 10
    # Steepest descent: most negative d(smoothed)/d(log lr) before the minimum, skipping the first
    # 10 % where the bias-corrected EMA is still settling.
    lo = max(1, len(res.smoothed) // 10)
    slopes = [
        ((res.smoothed[j] - res.smoothed[j - 1]) / (math.log(res.lrs[j]) - math.log(res.lrs[j - 1])), j)
        for j in range(lo, i_min + 1)
    ]
    res.steepest_lr = res.lrs[min(slopes)[1]] if slopes else res.lr_at_min


def plot_lr_find(res: LRFindResult, out: str | Path, title: str = "LR range test") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(res.lrs, res.losses, color="0.7", lw=0.8, label="loss")
    ax.plot(res.lrs, res.smoothed, color="C0", lw=2, label="smoothed (EMA, bias-corrected)")
    ax.axvline(res.suggestion, color="C2", ls="--", label=f"suggested {res.suggestion:.1e} (min/10)")
    ax.axvline(res.lr_at_min, color="C3", ls=":", label=f"minimum {res.lr_at_min:.1e}")
    ax.axvline(res.steepest_lr, color="C1", ls=":", label=f"steepest {res.steepest_lr:.1e}")
    ax.set_xscale("log")
    lo = min(min(res.smoothed), min(res.losses))
    ax.set_ylim(lo - 0.1 * abs(lo), min(max(res.losses), 4.5 * lo) + 0.1)
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", default="pystdlib_cpu", help="training config (default: pystdlib_cpu)")
    parser.add_argument("--start_lr", type=float, default=1e-7)
    parser.add_argument("--end_lr", type=float, default=1.0)
    parser.add_argument("--num_iters", type=int, default=None, help="steps (default 200; 40 with DIYLLM_TINY=1)")
    parser.add_argument("--smoothing", type=float, default=0.98, help="EMA factor β of the smoothed loss")
    parser.add_argument("--diverge_factor", type=float, default=4.0, help="stop when smoothed loss > this x best")
    parser.add_argument("--out", default="lr_find.png", help="PNG path (default: lr_find.png)")
    parser.add_argument("--seed", type=int, default=None, help="default: the config's seed")


def _initial_model(cfg):
    """A fresh model of the config's shape, or with init_from=PATH / hf:DIR that checkpoint's weights (the
    range test always starts a fresh optimizer, so init_from=resume has no meaning here and is refused)."""
    if cfg.init_from == "scratch":
        return build_model(cfg)
    if cfg.init_from == "resume":
        raise UserError("lr-find always starts a fresh optimizer, so init_from=resume does not apply; pass "
                        "--init_from=RUN_DIR (or a .pt file) to run the range test from that run's weights")
    from diyllm.training.checkpoint import load_model

    model, _, _ = load_model(cfg.init_from)
    print(f"lr-find: starting from the weights of {cfg.init_from}")
    return model.train()


def run(args: argparse.Namespace) -> int:
    from diyllm.training.config import load_config

    cfg = load_config(args.config, with_tiny(list(args.overrides)))
    num_iters = args.num_iters or (40 if tiny_mode() else 200)
    seed = cfg.seed if args.seed is None else args.seed
    torch.manual_seed(seed)
    model = _initial_model(cfg)
    n = model.num_parameters()
    print(f"lr-find: {n:,} parameters, batch {cfg.batch_size}x{cfg.context_length} tokens, "
          f"{num_iters} steps from lr {args.start_lr:g} to {args.end_lr:g}")
    t0 = time.perf_counter()
    res = lr_range_test(model, train_batches(cfg, seed=seed), args.start_lr, args.end_lr, num_iters, args.smoothing,
                        args.diverge_factor, betas=(cfg.beta1, cfg.beta2), grad_clip=cfg.grad_clip,
                        progress=cfg.progress)
    dt = time.perf_counter() - t0
    steps = len(res.lrs)
    print(f"{steps} steps in {dt:.1f}s ({steps * cfg.batch_size * cfg.context_length / dt:,.0f} tokens/s)"
          + ("; stopped: the loss diverged" if res.diverged else ""))
    print(f"lowest smoothed loss {min(res.smoothed):.4f} at lr {res.lr_at_min:.2e}")
    print(f"steepest descent at lr {res.steepest_lr:.2e}")
    print(f"suggested learning_rate = {res.suggestion:.2e}  (the minimum's LR / 10; "
          f"try --learning_rate={res.suggestion:.1e})")
    plot_lr_find(res, args.out, title=f"LR range test: {args.config}")
    print(f"wrote {args.out}")
    return 0
