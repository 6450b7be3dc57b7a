"""AdamW and gradient clipping, written out.

AdamW keeps, per parameter, running means of the gradient (m) and of its square (v); the step is
m̂ / (√v̂ + eps), i.e. each coordinate is scaled by its own recent gradient size. Weight decay is
*decoupled*: the weights shrink by lr·λ directly instead of adding λ·w to the gradient (which Adam's
scaling would distort).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch


class AdamW(torch.optim.Optimizer):
    """Matches torch.optim.AdamW (amsgrad off). `foreach=True` does the same arithmetic on whole
    lists of tensors at once (torch._foreach_*), which removes per-parameter Python overhead."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        foreach: bool = True,
    ):
        if lr < 0:
            raise ValueError(f"invalid learning rate {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}: each must be in [0, 1)")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
            if group["foreach"]:
                self._step_foreach(group, params)
            else:
                self._step_loop(group, params)
        return loss

    def _step_loop(self, group: dict, params: list[torch.Tensor]) -> None:
        """The readable version: one parameter at a time."""
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        for p in params:
            state = self.state[p]
            t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
            p.mul_(1 - lr * wd)  # decoupled weight decay
            m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            # Bias correction: m and v start at 0, so early averages are too small by (1 - β^t).
            step_size = lr / (1 - beta1**t)
            denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
            p.addcdiv_(m, denom, value=-step_size)

    def _step_foreach(self, group: dict, params: list[torch.Tensor]) -> None:
        """Same arithmetic as _step_loop, over lists; parameters that share a step count go together."""
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        by_step: dict[int, list[torch.Tensor]] = {}
        for p in params:
            by_step.setdefault(self.state[p]["step"], []).append(p)
        for t, ps in by_step.items():
            grads = [p.grad for p in ps]
            ms = [self.state[p]["exp_avg"] for p in ps]
            vs = [self.state[p]["exp_avg_sq"] for p in ps]
            if wd:
                torch._foreach_mul_(ps, 1 - lr * wd)
            torch._foreach_lerp_(ms, grads, 1 - beta1)  # m += (1-β1)(g - m)  ==  β1·m + (1-β1)·g
            torch._foreach_mul_(vs, beta2)
            torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
            denom = torch._foreach_sqrt(vs)
            torch._foreach_div_(denom, math.sqrt(1 - beta2**t))
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(ps, ms, denom, value=-lr / (1 - beta1**t))


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.nn.Parameter], max_l2_norm: float, eps: float = 1e-6) -> torch.Tensor:
    """Scale all gradients together so their global L2 norm is at most max_l2_norm; return the norm
    before clipping. Clipping the *global* norm keeps the update's direction, only its length shrinks."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    scale = (max_l2_norm / (total + eps)).clamp(max=1.0)
    torch._foreach_mul_(grads, scale.to(grads[0].device))
    return total
