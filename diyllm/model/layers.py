"""The small building blocks of a Llama-style transformer, written with plain tensor ops.

Each one has a PyTorch twin (F.linear, F.embedding, F.rms_norm, F.silu) that the tests compare it to;
writing them out is the point: nothing here is hidden inside a library call. Three fast paths run in
training, each checked against its plain formula by a test: RMSNorm's hand-written backward
(model/fast_paths.py), SwiGLU's gate through F.silu, which is `silu` below as one kernel
(tests/test_fast_paths.py), and on CPUs where BLAS underuses AVX-512, x Wᵀ through oneDNN
(model/cpu_matmul.py, tests/test_cpu_matmul.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from diyllm.model.cpu_matmul import linear
from diyllm.model.fast_paths import rms_norm_fast, use_fast_path


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
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The initial values (also replayed shard by shard when the model is built on the meta device)."""
        trunc_normal_(self.weight, math.sqrt(2.0 / (self.in_features + self.out_features)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)  # x @ self.weight.t(), through oneDNN where faster (model/cpu_matmul.py)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class EmbeddingLookup(torch.autograd.Function):
    """weight[ids] forward; backward adds each output row's gradient into the row of its token.

    Written out because the backward of plain indexing (`weight[ids]`, an accumulating index_put) adds the
    rows of a repeated token in an order that depends on the thread schedule: two identical runs on 2 CPU
    threads then drift apart by ~1e-6 within 40 steps. `index_add_` over the flattened ids adds them in
    index order, so the gradient is bit-identical on any thread count (as F.embedding's is).
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(token_ids)
        ctx.num_embeddings = weight.shape[0]
        return weight[token_ids]

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        (token_ids,) = ctx.saved_tensors
        dim = grad_out.shape[-1]
        grad_weight = grad_out.new_zeros(ctx.num_embeddings, dim)
        grad_weight.index_add_(0, token_ids.reshape(-1), grad_out.reshape(-1, dim))
        return grad_weight, None


class Embedding(nn.Module):
    """A lookup table: row i of the (vocab, d_model) weight is the vector of token i.

    The lookup goes through `EmbeddingLookup` so that its backward is deterministic (see there)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, device=None, dtype=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        trunc_normal_(self.weight, 1.0)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and self.weight.requires_grad):
            return self.weight[token_ids]  # no backward to make deterministic: skip the Function's overhead
        return EmbeddingLookup.apply(self.weight, token_ids)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · g. Computed in float32 because squaring bf16/fp16 values overflows."""

    def __init__(self, d_model: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_fast_path(x, self.weight):  # training in eager float32: same formula, backward by hand
            return rms_norm_fast(x, self.weight, self.eps)  # (model/fast_paths.py: 2x faster fwd+bwd)
        in_dtype = x.dtype
        # At least float32 (float64 stays float64). No casts when x already is: in decoding, where a
        # step is a few hundred tiny ops, each skipped op is time saved (x * x, not x.pow(2), for the
        # same reason: pow dispatches through type promotion first).
        xf = x if in_dtype in (torch.float32, torch.float64) else x.float()
        y = xf * torch.rsqrt((xf * xf).mean(dim=-1, keepdim=True) + self.eps) * self.weight
        return y if y.dtype == in_dtype else y.to(in_dtype)


def rms_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(mean(x²) + eps) over the last dimension, without a gain (RMSNorm's weight-free core)."""
    if use_fast_path(x):  # training in eager float32: same formula, backward by hand (model/fast_paths.py)
        return rms_norm_fast(x, None, eps)
    xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
    y = xf * torch.rsqrt((xf * xf).mean(dim=-1, keepdim=True) + eps)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def silu(x: torch.Tensor) -> torch.Tensor:
    """x·σ(x): a smooth ReLU that lets a little negative signal (and gradient) through."""
    return x * torch.sigmoid(x)


class SwiGLU(nn.Module):
    """Gated feed-forward: w2(silu(w1 x) ⊙ w3 x). The gate w3 lets each unit scale its own output.

    w1 and w3 may run as one matmul on their stacked weights (`fused`, see `fused_projection`); the
    parameters and state_dict keys are the same either way. In an int8 copy (model/quantize.py) w1 and
    w3 are None and `stacked_proj` holds both.
    """

    def __init__(self, d_model: int, d_ff: int, fused: bool | None = None, device=None, dtype=None):
        super().__init__()
        self.fused = fused
        self.frozen_fused: torch.Tensor | None = None  # set by frozen_fused_weights
        self.stacked_proj: nn.Module | None = None  # w1|w3 as one module, for good (int8 copies)
        self.w1 = Linear(d_model, d_ff, device=device, dtype=dtype)
        self.w2 = Linear(d_ff, d_model, device=device, dtype=dtype)
        self.w3 = Linear(d_model, d_ff, device=device, dtype=dtype)

    def fused_parts(self) -> list[Linear]:
        return [self.w1, self.w3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h13 = fused_projection(self, x)
        if h13 is not None:
            gate, up = h13.chunk(2, dim=-1)
        else:
            gate, up = self.w1(x), self.w3(x)
        # F.silu is `silu` below as one kernel, with a one-kernel backward (tests/test_fast_paths.py):
        # the plain x·σ(x) costs a third more time per step in this block, forward + backward.
        return self.w2(F.silu(gate) * up)


class ReluSquaredMLP(nn.Module):
    """w2(relu(w1 x)²): two matrices instead of SwiGLU's three. Squaring keeps ReLU's sparsity but makes
    the unit's output grow smoothly from 0 (modded-nanogpt's speedrun found it learns faster than GELU)."""

    fused = False  # nothing to stack

    def __init__(self, d_model: int, d_ff: int, device=None, dtype=None):
        super().__init__()
        self.w1 = Linear(d_model, d_ff, device=device, dtype=dtype)
        self.w2 = Linear(d_ff, d_model, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.w1(x))
        return self.w2(h * h)


def fused_weight(module: nn.Module) -> torch.Tensor | None:
    """The weights of `module.fused_parts()` stacked into one matrix, or None when separate matmuls
    are the cheaper choice.

    One large matmul launches fewer kernels than several small ones, but stacking copies the weights
    and makes the outputs strided views. `module.fused`: True always stacks in training, False never,
    None (the default) stacks on accelerators only: on CPU the separate matmuls measured faster
    (benchmarks/bench_train.py: about 10% on the d_model=384 shape). Without gradients (inference,
    often one token per call) a copy per call would cost more than it saves, so the stack is used only
    when `frozen_fused_weights` made one for a whole generation.
    """
    if module.fused is False:
        return None
    if not torch.is_grad_enabled():
        return module.frozen_fused
    if module.fused is None and module.fused_parts()[0].weight.device.type == "cpu":
        return None
    return stacked_weight(module)


def fused_projection(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """x through all of `module.fused_parts()` in one matmul (their outputs side by side, in order), or
    None when the parts run one by one.

    Two ways to get there: `module.stacked_proj`, a module that holds the stacked weight for good (the
    int8 copy of model/quantize.py, where stacking saves kernel calls and costs no copy per call), or
    the float weights stacked as `fused_weight` decides.
    """
    if module.stacked_proj is not None:
        return module.stacked_proj(x)
    w = fused_weight(module)
    return None if w is None else linear(x, w)


def stacked_weight(module: nn.Module) -> torch.Tensor:
    """The weights of `module.fused_parts()` concatenated along the output dimension, in order."""
    return torch.cat([part.weight for part in module.fused_parts()])


@contextmanager
def frozen_fused_weights(model: nn.Module) -> Iterator[None]:
    """Stack every fused module's weights once, for no-grad use (generation) inside the block.

    The stacks are copies: changing the weights inside the block is not seen, and they are dropped on
    exit. While the block runs they take as much memory again as the q/k/v and w1/w3 weights.
    """
    modules = [m for m in model.modules() if hasattr(m, "fused_parts") and m.fused is not False]
    saved = [m.frozen_fused for m in modules]
    with torch.no_grad():
        for m in modules:
            m.frozen_fused = stacked_weight(m)
    try:
        yield
    finally:
        for m, previous in zip(modules, saved):
            m.frozen_fused = previous
