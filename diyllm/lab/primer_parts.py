"""The primer's further parts: the ideas from first principles that the training loop relies on.

Each part prints its numbers and returns them (the tests check them against an independent computation):
  chain_rule   backpropagation on a 3-weight model, by hand vs autograd
  clip         clipping the global gradient norm, before and after
  adamw_wd     AdamW with decoupled weight decay and the training configs' betas
  xent         cross-entropy is -log of the probability given to the correct token
  per_sample   full batch vs one update per sample at lr 0.1 on y = 2x: when the per-sample update diverges
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from diyllm.training.loss import cross_entropy
from diyllm.training.optim import AdamW, clip_grad_norm_

Echo = Callable[..., None]
XS = (1.0, 2.0, 3.0, 4.0)  # the primer's data: y = 2x


def adam_moments(m: float, v: float, g: float, step: int, betas: tuple[float, float]) -> tuple[float, ...]:
    """One step of Adam's running averages by hand: (m, v, m_hat, v_hat) after gradient g at `step` (from 1).
    m and v start at 0, so early on they are biased towards 0; dividing by 1 − β^step removes that."""
    b1, b2 = betas
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    return m, v, m / (1 - b1**step), v / (1 - b2**step)


def chain_rule(x: float = 1.5, y: float = 1.0, w1: float = 0.8, w2: float = -0.5, b: float = 0.3,
               echo: Echo = print) -> dict[str, tuple[float, float]]:
    """Backpropagation on a 3-weight model, every local derivative by hand, checked against autograd.

    Model: h = w1·x, a = tanh(h), ŷ = w2·a + b, loss = (ŷ − y)². Returns {weight: (by hand, autograd)}."""
    h = w1 * x
    a = math.tanh(h)
    y_hat = w2 * a + b
    loss = (y_hat - y) ** 2
    echo(f"forward: h = w1*x = {h:.4f}, a = tanh(h) = {a:.4f}, y_hat = w2*a + b = {y_hat:.4f}, "
         f"loss = (y_hat - y)^2 = {loss:.4f}")
    d_yhat = 2 * (y_hat - y)  # dloss/dŷ
    d_w2 = d_yhat * a  # ŷ = w2·a + b  ->  dŷ/dw2 = a
    d_b = d_yhat * 1.0  # dŷ/db = 1
    d_a = d_yhat * w2  # dŷ/da = w2
    d_h = d_a * (1 - a * a)  # da/dh = 1 − tanh(h)²
    d_w1 = d_h * x  # dh/dw1 = x
    echo(f"backward by hand: dloss/dy_hat = 2(y_hat - y) = {d_yhat:+.4f}")
    echo(f"  dloss/dw2 = dloss/dy_hat * a           = {d_yhat:+.4f} * {a:.4f} = {d_w2:+.4f}")
    echo(f"  dloss/db  = dloss/dy_hat * 1           = {d_b:+.4f}")
    echo(f"  dloss/da  = dloss/dy_hat * w2          = {d_a:+.4f}")
    echo(f"  dloss/dh  = dloss/da * (1 - a^2)       = {d_a:+.4f} * {1 - a * a:.4f} = {d_h:+.4f}")
    echo(f"  dloss/dw1 = dloss/dh * x               = {d_h:+.4f} * {x} = {d_w1:+.4f}")
    weights = {name: torch.tensor(v, dtype=torch.float64, requires_grad=True) for name, v in
               (("w1", w1), ("w2", w2), ("b", b))}
    auto_loss = (weights["w2"] * torch.tanh(weights["w1"] * x) + weights["b"] - y) ** 2
    auto_loss.backward()
    result = {"w1": (d_w1, weights["w1"].grad.item()), "w2": (d_w2, weights["w2"].grad.item()),
              "b": (d_b, weights["b"].grad.item())}
    for name, (hand, auto) in result.items():
        echo(f"  {name}: by hand {hand:+.6f}   autograd {auto:+.6f}")
    echo("  the same numbers: loss.backward() multiplies exactly these local derivatives, output to input")
    return result


def clip(max_norm: float = 1.0, echo: Echo = print) -> tuple[float, float, list[list[float]]]:
    """Clipping the global gradient norm: every gradient scaled by one factor, so the direction stays.

    Two parameters with gradients [3, 4] and [12]: global norm sqrt(9 + 16 + 144) = 13. Returns
    (norm before, norm after, clipped gradients)."""
    p1, p2 = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    p1.grad, p2.grad = torch.tensor([3.0, 4.0]), torch.tensor([12.0])
    echo(f"gradients: {p1.grad.tolist()} and {p2.grad.tolist()}; global norm = sqrt(3^2 + 4^2 + 12^2) = 13")
    before = clip_grad_norm_([p1, p2], max_norm).item()
    after = math.sqrt(sum(float((p.grad**2).sum()) for p in (p1, p2)))
    clipped = [p1.grad.tolist(), p2.grad.tolist()]
    echo(f"clip to max_norm = {max_norm}: scale = {max_norm} / {before:.0f} = {max_norm / before:.4f}")
    echo(f"after: {[round(v, 4) for v in clipped[0]]} and {[round(v, 4) for v in clipped[1]]}; "
         f"global norm {after:.4f} (ratios between gradients unchanged: 3:4:12)")
    echo("a norm already below max_norm is left as it is; the trainer logs the norm *before* clipping")
    return before, after, clipped


def adamw_wd(steps: int = 200, lr: float = 0.1, betas: tuple[float, float] = (0.9, 0.95),
             weight_decay: float = 0.1, eps: float = 1e-8, show: int = 3, echo: Echo = print) -> list[float]:
    """AdamW with decoupled weight decay and the betas of the training configs (0.9, 0.95; wd 0.1).

    Each step first shrinks w by lr·wd·w (decoupled: the decay never enters m and v), then takes the
    Adam step. Checked against diyllm's AdamW at every step. Returns w after each step."""
    x = torch.tensor(XS, dtype=torch.float64)
    w = torch.nn.Parameter(torch.tensor(0.0, dtype=torch.float64))
    opt = AdamW([w], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    m = v = 0.0
    w_hand = 0.0
    history = []
    echo(f"AdamW: lr {lr}, betas {betas}, weight_decay {weight_decay}: w <- w - lr*wd*w - lr*m_hat/(sqrt(v_hat)+eps)")
    for step in range(1, steps + 1):
        loss = ((w * x - 2 * x) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        g = w.grad.item()
        m, v, m_hat, v_hat = adam_moments(m, v, g, step, betas)
        decay = lr * weight_decay * w_hand
        w_hand = w_hand - decay - lr * m_hat / (math.sqrt(v_hat) + eps)
        opt.step()
        if not math.isclose(w.item(), w_hand, rel_tol=1e-9, abs_tol=1e-12):
            raise AssertionError(f"step {step}: hand-computed w {w_hand} disagrees with AdamW's {w.item()}")
        history.append(w.item())
        if step <= show:
            echo(f"  step {step}  grad {g:+8.3f}  decay -lr*wd*w {-decay:+.5f}  "
                 f"adam -lr*m_hat/sqrt(v_hat) {-lr * m_hat / (math.sqrt(v_hat) + eps):+.4f}  w -> {w.item():.4f}")
    echo(f"  after {steps} steps w = {history[-1]:.4f}: weight decay pulls it slightly below 2 (an L2 pull towards 0"
         " that the loss must pay for); on matrices this keeps weights small, so the trainer never decays norms")
    return history


def xent(probabilities: tuple[float, ...] = (0.7, 0.2, 0.1), echo: Echo = print) -> list[tuple[float, float]]:
    """Cross-entropy is −log of the probability the model gives the correct token.

    For each possible correct class: (−ln p, the loss diyllm's cross_entropy computes from logits ln p)."""
    logits = torch.tensor(probabilities, dtype=torch.float64).log()  # softmax(ln p) = p when sum(p) = 1
    echo(f"the model's probabilities for 3 tokens: {list(probabilities)} (logits ln p: "
         f"{[round(v, 4) for v in logits.tolist()]})")
    rows = []
    for correct, p in enumerate(probabilities):
        by_formula = -math.log(p)
        by_code = cross_entropy(logits.unsqueeze(0), torch.tensor([correct])).item()
        rows.append((by_formula, by_code))
        echo(f"  correct token {correct}: -ln({p}) = {by_formula:.4f}   cross_entropy(logits) = {by_code:.4f}")
    echo(f"  a uniform guess over V tokens costs ln V (here ln 3 = {math.log(3):.4f}):"
         " the loss an untrained model starts at")
    return rows


def _error_factor(lr: float, x: float) -> float:
    """One gradient step on the sample x multiplies the error (w − 2) by 1 − 2·lr·x² (d/dw of (wx − 2x)² is
    2x²(w − 2)): the step is stable only while |1 − 2·lr·x²| < 1, i.e. lr < 1/x²."""
    return 1 - 2 * lr * x * x


def per_sample(lr: float = 0.1, epochs: int = 6, echo: Echo = print) -> dict[str, list[float]]:
    """Full batch vs one update per sample at lr 0.1 on y = 2x: which converges, and why.

    Full batch on x = 1..4: the error is multiplied by 1 − 2·lr·mean(x²) = 1 − 15·lr = −0.5 per step:
    converges. One update per sample multiplies it by 1 − 2·lr·x² for each x in turn: 0.8, 0.2, −0.8 and
    −2.2 for x = 4, which alone overshoots; over x = 1..4 the small samples still damp it (×0.28 per epoch),
    but add the sample x = 5 (×−4.0) and the epoch factor is −1.13: w runs away. Returns the w histories
    per step / epoch for "full_batch", "per_sample_1to4" and "per_sample_1to5"."""
    def full_batch(xs):
        w, hist = 0.0, []
        for _ in range(epochs):
            w -= lr * sum(2 * (w * x - 2 * x) * x for x in xs) / len(xs)
            hist.append(w)
        return hist

    def one_per_sample(xs):
        w, hist = 0.0, []
        for _ in range(epochs):
            for x in xs:
                w -= lr * 2 * (w * x - 2 * x) * x
            hist.append(w)
        return hist

    xs5 = (*XS, 5.0)
    runs = {"full_batch": full_batch(XS), "per_sample_1to4": one_per_sample(XS), "per_sample_1to5": one_per_sample(xs5)}
    factors = ", ".join(f"x={x:g}: {_error_factor(lr, x):+.2f}" for x in xs5)
    echo(f"lr = {lr}; one step on sample x multiplies the error (w - 2) by 1 - 2*lr*x^2 ({factors})")
    mean_sq = sum(x * x for x in XS) / len(XS)
    epoch4 = math.prod(_error_factor(lr, x) for x in XS)
    epoch5 = math.prod(_error_factor(lr, x) for x in xs5)
    echo(f"full batch x=1..4: factor 1 - 2*lr*mean(x^2) = {1 - 2 * lr * mean_sq:+.2f} per step; "
         f"per sample, per epoch: x=1..4 {epoch4:+.2f}, x=1..5 {epoch5:+.2f}")
    echo("  epoch  full batch (1..4)   per sample (1..4)   per sample (1..5)")
    for i in range(epochs):
        echo(f"  {i + 1:5d}  {runs['full_batch'][i]:17.4f}   {runs['per_sample_1to4'][i]:17.4f}"
             f"   {runs['per_sample_1to5'][i]:17.4f}")
    echo("  per sample, every step on x >= 4 overshoots (|factor| > 1): whether the epoch diverges depends on what"
         " the other samples damp; with x = 5 in the data it does. A safe lr is set by the largest curvature one"
         " update sees (lr < 1/x^2), the full batch only by the mean")
    return runs


PARTS: dict[str, Callable[..., object]] = {
    "chain_rule": chain_rule, "clip": clip, "adamw_wd": adamw_wd, "xent": xent, "per_sample": per_sample,
}
