"""Newton-Schulz orthogonalisation, the heart of Muon (training/optim.py): the plain iteration, and a fast
path for long matrices in float32 that iterates on their small Gram matrix instead (tested to agree)."""

from __future__ import annotations

import torch

from diyllm.training.device import native_bf16_matmul

# Keller Jordan's quintic Newton-Schulz coefficients (also torch.optim.Muon's defaults): chosen to make
# the polynomial's slope at 0 as steep as possible, so 5 steps push every singular value into ~[0.7, 1.2].
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
# The Gram path pays off once a matrix's long side is this many times its short side (flop count below).
GRAM_MIN_ASPECT = 1.5


def newton_schulz_orthogonalize(
    g: torch.Tensor,
    steps: int = 5,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype | None = None,
    via_gram: bool | None = None,
) -> torch.Tensor:
    """Approximately U·Vᵀ for g = U·S·Vᵀ: the same directions with every singular value set near 1.

    X ← a·X + (b·A + c·A²)·X with A = X·Xᵀ applies the odd polynomial a·s + b·s³ + c·s⁵ to each singular
    value s. Dividing by the Frobenius norm first puts every s in [0, 1], where the polynomial pushes it
    up towards 1. Working on the wide orientation keeps A = X·Xᵀ the small square. bfloat16 is enough
    (the result is only a direction) and is what the reference implementations use; `dtype=None` takes it
    where the hardware multiplies bfloat16 natively (`native_bf16_matmul`) and float32 elsewhere, since a
    CPU without AVX-512 BF16 or AMX runs bfloat16 products 20-40x slower than float32.

    g is one matrix (rows, cols) or a stack (n, rows, cols) of same-shape matrices, each orthogonalised
    on its own (its own norm): a model's q/k/v/o then cost one batched call per step instead of one each,
    and on small models the per-call overhead is most of Muon's time.

    via_gram: the same iteration run on the Gram matrix (`_iterate_on_gram`); None takes it for float32 or
    float64 matrices whose long side is at least GRAM_MIN_ASPECT times the short one.
    """
    if g.dim() not in (2, 3):
        raise ValueError(f"Newton-Schulz needs a matrix or a stack of them, got shape {tuple(g.shape)}")
    dtype = dtype or newton_schulz_dtype(g.device.type)
    x = g.to(dtype) if g.dim() == 3 else g.to(dtype)[None]
    tall = g.shape[-2] > g.shape[-1]
    if tall:
        x = x.mT
    x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=eps)
    if via_gram is None:  # bfloat16 keeps the plain loop: the Gram path folds every step's rounding into A
        via_gram = dtype in (torch.float32, torch.float64) and x.shape[-1] >= GRAM_MIN_ASPECT * x.shape[-2]
    x = _iterate_on_gram(x, steps, coefficients) if via_gram else _iterate(x, steps, coefficients)
    x = x.mT if tall else x
    return x if g.dim() == 3 else x[0]


def _iterate(x: torch.Tensor, steps: int, coefficients: tuple[float, float, float]) -> torch.Tensor:
    """The plain iteration on a wide, normalised stack x (n, r, L), r <= L."""
    a, b, c = coefficients
    for _ in range(steps):
        gram = x @ x.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b·A + c·A²
        x = torch.baddbmm(x, poly, x, beta=a)  # a·X + poly·X
    return x


def _iterate_on_gram(x: torch.Tensor, steps: int, coefficients: tuple[float, float, float]) -> torch.Tensor:
    """`_iterate`'s result with only r×r products inside the loop (the fast path for long matrices).

    Every step multiplies X on the left by P = a·I + b·A + c·A², a polynomial in A = X·Xᵀ. So after k
    steps X_k = Q·X_0 with Q = P_k···P_1, and the next Gram matrix is P·A·Pᵀ = P²·A (P is symmetric and
    commutes with A): the loop never needs X itself. For x of shape (r, L) the plain loop costs
    5·(4r²L + 2r³) flops, this one 4r²L + 34r³: fewer once L > 1.5·r (benchmarks/bench_muon.py's
    8 × 512 × 128 stack on a 2-core AVX2 CPU: 19 ms instead of 35 ms).
    """
    a, b, c = coefficients
    gram = x @ x.mT
    q = None
    for k in range(steps):
        p = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b·A + c·A²
        p.diagonal(dim1=-2, dim2=-1).add_(a)  # + a·I
        q = p if q is None else p @ q
        if k < steps - 1:  # the last step's Gram matrix is not needed
            gram = p @ (p @ gram)
    return q @ x


def newton_schulz_dtype(device_type: str) -> torch.dtype:
    """Newton-Schulz's working precision when none is asked for: bfloat16 where this machine multiplies it
    in hardware (it is 2-4x faster than float32 there), float32 elsewhere."""
    return torch.bfloat16 if native_bf16_matmul(device_type) else torch.float32
