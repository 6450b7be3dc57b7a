"""The small building blocks of a Llama-style transformer, written with plain tensor ops.

Each one has a PyTorch twin (F.linear, F.embedding, F.rms_norm, F.silu) that the tests compare it to;
writing them out is the point: nothing here is hidden inside a library call.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def trunc_normal_(weight: torch.Tensor, std: float) -> torch.Tensor:
    """Normal init cut at ±3 std, so no single weight starts out as an outlier."""
    return nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-3 * std, b=3 * std)


class Linear(nn.Module):
    """y = x Wᵀ without bias (Llama uses none). Weight shape (d_out, d_in), as in torch.nn.Linear.

    Init std sqrt(2/(d_in+d_out)) keeps activation variance roughly constant in both directions.
    """

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        trunc_normal_(self.weight, math.sqrt(2.0 / (in_features + out_features)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Embedding(nn.Module):
    """A lookup table: row i of the (vocab, d_model) weight is the vector of token i."""

    def __init__(self, num_embeddings: int, embedding_dim: int, device=None, dtype=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, device=device, dtype=dtype))
        trunc_normal_(self.weight, 1.0)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.weight[token_ids]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · g. Computed in float32 because squaring bf16/fp16 values overflows."""

    def __init__(self, d_model: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        x = x.to(torch.promote_types(in_dtype, torch.float32))  # at least float32 (float64 stays float64)
        x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (x * self.weight.to(x.dtype)).to(in_dtype)


def silu(x: torch.Tensor) -> torch.Tensor:
    """x·σ(x): a smooth ReLU that lets a little negative signal (and gradient) through."""
    return x * torch.sigmoid(x)


class SwiGLU(nn.Module):
    """Gated feed-forward: w2(silu(w1 x) ⊙ w3 x). The gate w3 lets each unit scale its own output.

    With `fused=True` w1 and w3 run as one matmul on their concatenated weights (fewer, larger kernels);
    the parameters and state_dict keys are the same either way.
    """

    def __init__(self, d_model: int, d_ff: int, fused: bool = True, device=None, dtype=None):
        super().__init__()
        self.fused = fused
        self.w1 = Linear(d_model, d_ff, device=device, dtype=dtype)
        self.w2 = Linear(d_ff, d_model, device=device, dtype=dtype)
        self.w3 = Linear(d_model, d_ff, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            gate, up = (x @ torch.cat([self.w1.weight, self.w3.weight]).t()).chunk(2, dim=-1)
        else:
            gate, up = self.w1(x), self.w3(x)
        return self.w2(silu(gate) * up)
