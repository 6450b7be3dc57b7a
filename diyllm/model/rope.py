"""Rotary position embedding (RoPE): position enters attention as a rotation of q and k.

Pairs of features (x0, x1), (x2, x3), ... are rotated by angle pos·θ^(-2k/d) for pair k. Because
q·k after rotating both by their own positions depends only on the difference of positions, attention
becomes relative. Low pairs spin fast (fine position), high pairs slowly (coarse position).
Note: this is the interleaved layout; Hugging Face's Llama rotates halves (x_k, x_{k+d/2}) instead,
which the exporter converts by permuting the q/k projection rows.
"""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    def __init__(self, theta: float, d_k: int, max_seq_len: int, device=None):
        super().__init__()
        if d_k % 2:
            raise ValueError(f"RoPE needs an even head size, got d_k={d_k}")
        self.theta, self.d_k, self.max_seq_len = theta, d_k, max_seq_len
        # float64 for the angles: pos·freq loses digits in float32 at long positions.
        inv_freq = theta ** (-torch.arange(0, d_k, 2, dtype=torch.float64, device=device) / d_k)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64, device=device), inv_freq)
        # Not in the state_dict: they are a pure function of the config.
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def cos_sin(
        self, token_positions: torch.Tensor | None, seq_len: int, offset: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of shape (..., seq_len, d_k/2) for the given positions (offset..offset+seq_len-1 when None)."""
        if token_positions is None:
            if offset + seq_len > self.max_seq_len:
                raise ValueError(
                    f"positions up to {offset + seq_len} exceed RoPE max_seq_len={self.max_seq_len}"
                )
            return self.cos[offset : offset + seq_len], self.sin[offset : offset + seq_len]
        return self.cos[token_positions], self.sin[token_positions]

    def forward(self, x: torch.Tensor, token_positions: torch.Tensor | None = None) -> torch.Tensor:
        """Rotate x of shape (..., seq_len, d_k); token_positions (..., seq_len) must broadcast against it."""
        cos, sin = self.cos_sin(token_positions, x.shape[-2])
        return apply_rotary(x, cos, sin)


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotation: torch.Tensor | None = None
) -> torch.Tensor:
    """Rotate each interleaved pair (x[2k], x[2k+1]) by the angle whose cos/sin are given for pair k.

    `rotation` (optional) is cos + i·sin as a complex tensor, computed once by the caller when many
    tensors share the same angles (every layer of one forward does).
    """
    if x.dtype in (torch.float32, torch.float64) and not torch.compiler.is_compiling():
        # Eager fast path, same arithmetic: a pair (a, b) is the complex number a + ib, and rotating it by θ
        # is multiplying by cos θ + i sin θ. One complex multiply replaces slicing, four products and a
        # stack. Under torch.compile the real form below is better: inductor fuses it, but not complex ops.
        if rotation is None or rotation.dtype != x.dtype.to_complex():
            rotation = torch.complex(cos.to(x.dtype), sin.to(x.dtype))
        if torch.is_grad_enabled() and x.requires_grad:
            return PairRotation.apply(x, rotation)
        return rotate_pairs(x, rotation)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    rotated = torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1)
    return rotated.flatten(-2)


def rotate_pairs(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """x (..., D) with its pairs multiplied by the complex `rotation` (broadcasting to (..., D/2))."""
    try:
        pairs = torch.view_as_complex(torch.unflatten(x, -1, (-1, 2)))
    except RuntimeError:  # a (re, im) pair is not whole in memory (odd offset or stride): copy first
        pairs = torch.view_as_complex(torch.unflatten(x.contiguous(), -1, (-1, 2)))
    return torch.view_as_real(pairs * rotation).flatten(-2)


class PairRotation(torch.autograd.Function):
    """`rotate_pairs` with its backward written out: a rotation's transpose is the rotation by -θ, so the
    gradient is rotated back with the conjugate. Autograd would record the complex views and product op
    by op; this is a quarter faster forward + backward on the 384-wide shape of benchmarks/bench_train.py
    (tests/test_attention.py checks it against the real-valued form, gradients included)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rotation)
        return rotate_pairs(x, rotation)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (rotation,) = ctx.saved_tensors
        return rotate_pairs(grad, rotation.conj()), None
