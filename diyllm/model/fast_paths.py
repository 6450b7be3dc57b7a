"""Fast paths for a training step's elementwise chains, beside the plain formulas in layers.py.

Autograd differentiates `x * rsqrt(mean(x²) + eps) * g` op by op: about 4 passes over the activations
forward and 11 backward (x·x has two incoming gradients to add, the mean's gradient is materialised,
every product saves its inputs). The backward written out by hand below needs 5; the forward runs the
plain path's ops, so the two paths give the same output bit for bit, and gradients equal to float32
rounding: tests/test_fast_paths.py checks both against float64 finite differences and each other. On the
384-wide shape of benchmarks/bench_train.py one RMSNorm forward + backward takes 3.4 ms instead of 7.5 ms.

Used by `RMSNorm.forward` and `rms_normalize` (qk_norm) when they would record a backward in eager
float32; everything else (no grad, bf16/fp16 inputs, torch.compile, which fuses the plain formula
itself) takes the plain path.
"""

from __future__ import annotations

import torch


class RMSNormFunction(torch.autograd.Function):
    """y = x̂ · g with x̂ = x · r and r = 1 / sqrt(mean(x²) + eps), over the last dimension.

    Backward, with dy the incoming gradient and d the width:
        dg = Σ_rows dy · x̂
        dx̂ = dy · g
        dx = r · (dx̂ - x̂ · mean(dx̂ · x̂))      (the second term: x̂ moves along itself as x does)
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        # The plain path's ops exactly, so that both give the same bits forward (a frozen or no-grad
        # forward takes the plain path; a LoRA model's first forward must equal its base model's).
        r = torch.rsqrt((x * x).mean(dim=-1, keepdim=True) + eps)
        x_hat = x * r
        ctx.save_for_backward(x_hat, weight, r)
        return x_hat if weight is None else x_hat * weight  # no weight: qk_norm's weight-free form

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x_hat, weight, r = ctx.saved_tensors
        d = x_hat.shape[-1]
        needs_weight = weight is not None and ctx.needs_input_grad[1]
        d_weight = (dy * x_hat).reshape(-1, d).sum(0) if needs_weight else None
        if not ctx.needs_input_grad[0]:
            return None, d_weight, None
        d_x_hat = dy if weight is None else dy * weight
        along = torch.linalg.vecdot(d_x_hat, x_hat).unsqueeze(-1).div_(d)  # mean(dx̂ · x̂) per row
        d_x = torch.addcmul(d_x_hat, x_hat, along, value=-1).mul_(r)
        return d_x, d_weight, None


def rms_norm_fast(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm with the hand-written backward above (x and weight of one floating dtype; weight None:
    no gain)."""
    return RMSNormFunction.apply(x, weight, eps)


def use_fast_path(x: torch.Tensor, weight: torch.Tensor | None = None) -> bool:
    """True where the fast path pays: eager float32 with a backward to record."""
    return (x.dtype == torch.float32 and (weight is None or weight.dtype == torch.float32)
            and torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad))
            and not torch.compiler.is_compiling())


__all__ = ["RMSNormFunction", "rms_norm_fast", "use_fast_path"]
