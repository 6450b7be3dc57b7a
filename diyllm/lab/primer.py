"""Gradient descent, three ways, on the smallest problem there is: fit y = 2·x with one weight w.

1. By hand: loss(w) = mean((w·x − y)²), so dloss/dw = mean(2·(w·x − y)·x); step w ← w − lr·grad.
2. With autograd: the same loop, but loss.backward() computes the gradient.
3. With AdamW (diyllm.training.optim.AdamW): printing m, v and the bias-corrected step for the
   first iterations, so the optimizer every later chapter uses is not a black box.

All three end with w ≈ 2. This is page one of the curriculum (docs/curriculum.md).

More parts (`diyllm primer --part NAME`, all of them with `--part all`):
  chain_rule   a 3-weight model, every local derivative by hand, multiplied along the chain, vs autograd
  clip         gradient clipping worked through: the global norm before and after
  adamw_wd     AdamW *with* decoupled weight decay and the betas the training configs use
  xent         cross-entropy = -log P(correct), on three probabilities
  per_sample   lr 0.1 on y = 2x: full batch vs one update per sample, and when the latter diverges
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch

from diyllm.lab.primer_parts import PARTS, adam_moments
from diyllm.training.optim import AdamW

XS = (1.0, 2.0, 3.0, 4.0)
TRUE_W = 2.0


@dataclass
class PrimerResult:
    by_hand: list[float]  # w after each step
    autograd: list[float]
    adamw: list[float]


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.tensor(XS, dtype=torch.float64)
    return x, TRUE_W * x


def descend_by_hand(steps: int = 12, lr: float = 0.05, w: float = 0.0, echo=print) -> list[float]:
    """Plain gradient descent with a gradient derived on paper."""
    xs = XS
    history = []
    echo(f"1) by hand: loss = mean((w*x - y)^2), grad = mean(2*(w*x - y)*x), lr = {lr}")
    for step in range(1, steps + 1):
        loss = sum((w * x - TRUE_W * x) ** 2 for x in xs) / len(xs)
        grad = sum(2 * (w * x - TRUE_W * x) * x for x in xs) / len(xs)
        w = w - lr * grad
        history.append(w)
        echo(f"   step {step:2d}  loss {loss:10.6f}  grad {grad:+10.5f}  w -> {w:.6f}")
    return history


def descend_with_autograd(steps: int = 12, lr: float = 0.05, w0: float = 0.0, echo=print) -> list[float]:
    """The same steps, but the gradient comes from loss.backward()."""
    x, y = _data()
    w = torch.tensor(w0, dtype=torch.float64, requires_grad=True)
    history = []
    echo(f"2) autograd: loss.backward() fills w.grad; same lr = {lr}")
    for step in range(1, steps + 1):
        loss = ((w * x - y) ** 2).mean()
        loss.backward()
        with torch.no_grad():
            grad = w.grad.item()
            w -= lr * w.grad
            w.grad = None
        history.append(w.item())
        echo(f"   step {step:2d}  loss {loss.item():10.6f}  grad {grad:+10.5f}  w -> {w.item():.6f}")
    return history


def descend_with_adamw(
    steps: int = 100, lr: float = 0.1, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
    w0: float = 0.0, show: int = 5, echo=print,
) -> list[float]:
    """AdamW (no weight decay, which would pull w towards 0): m and v are recomputed here by hand from
    each gradient and checked against the optimizer's own state, then the step m̂/(√v̂+eps)·lr is shown."""
    x, y = _data()
    w = torch.nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    opt = AdamW([w], lr=lr, betas=betas, eps=eps, weight_decay=0.0)
    b1, b2 = betas
    m = v = 0.0
    history = []
    echo(f"3) AdamW: lr = {lr}, beta1 = {b1}, beta2 = {b2}; m, v start at 0 so they are bias-corrected")
    for step in range(1, steps + 1):
        loss = ((w * x - y) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        g = w.grad.item()
        m, v, m_hat, v_hat = adam_moments(m, v, g, step, betas)
        update = lr * m_hat / (math.sqrt(v_hat) + eps)
        before = w.item()
        opt.step()
        state = opt.state[w]
        assert math.isclose(state["exp_avg"].item(), m, rel_tol=1e-9), "hand-computed m disagrees with AdamW"
        assert math.isclose(state["exp_avg_sq"].item(), v, rel_tol=1e-9), "hand-computed v disagrees with AdamW"
        history.append(w.item())
        if step <= show:
            echo(f"   step {step:2d}  grad {g:+9.4f}  m {m:+9.4f}  v {v:9.4f}  m_hat {m_hat:+8.4f}"
                 f"  v_hat {v_hat:8.4f}  -lr*m_hat/(sqrt(v_hat)+eps) {-update:+.4f}: w {before:.4f} -> {w.item():.4f}")
        elif step % 10 == 0 or step == steps:
            echo(f"   step {step:2d}  loss {loss.item():10.6f}  w -> {w.item():.6f}")
    echo("   note: the first step moves w by ~lr whatever the gradient's size: m_hat/sqrt(v_hat) = g/|g| = ±1;")
    echo("   with a constant lr Adam keeps circling the minimum in steps of ~lr, which is why schedules decay it")
    return history


def run_primer(echo=print) -> PrimerResult:
    hand = descend_by_hand(echo=echo)
    echo("")
    auto = descend_with_autograd(echo=echo)
    echo("")
    adam = descend_with_adamw(echo=echo)
    echo("")
    echo(f"final w: by hand {hand[-1]:.6f}, autograd {auto[-1]:.6f}, AdamW {adam[-1]:.6f}  (target {TRUE_W})")
    return PrimerResult(hand, auto, adam)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="print only the final weights")
    parser.add_argument("--part", choices=["descent", *PARTS, "all"], default="descent",
                        help="descent (default): the three ways to fit y = 2x; " + "; ".join(
                            f"{name}: {fn.__doc__.splitlines()[0].rstrip('.')}" for name, fn in PARTS.items())
                        + "; all: every part")


def run(args: argparse.Namespace) -> int:
    part = getattr(args, "part", "descent")
    if part != "descent":
        echo = (lambda *a: None) if args.quiet else print
        for name, fn in PARTS.items():
            if part in (name, "all"):
                echo(f"--- {name} ---")
                fn(echo=echo)
                echo("")
        if part != "all":
            return 0
    result = run_primer(echo=(lambda *a: None) if args.quiet else print)
    if args.quiet:
        print(f"final w: by hand {result.by_hand[-1]:.6f}, autograd {result.autograd[-1]:.6f}, "
              f"AdamW {result.adamw[-1]:.6f}  (target {TRUE_W})")
    return 0
