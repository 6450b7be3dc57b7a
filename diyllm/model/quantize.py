"""Weight-only int8 quantization for decoding: a quarter of the bytes per token.

A decode step multiplies one token's vector by every weight matrix, so its time is the time to read the
weights. Stored as int8 with one float scale per output row (symmetric, per channel),

    W ≈ q · s,   q = round(W / s) in [-127, 127],   s = max_j |W_ij| / 127   (row i),

the matrices take a quarter of float32's bytes. x·Wᵀ is then computed as (x·qᵀ)·s: torch's CPU kernel
`aten._weight_int8pack_mm` does that in one pass for bfloat16 activations, which is why the quantized
model runs in bfloat16 (embeddings, norms, KV cache); elsewhere each matmul dequantizes its weight first
(same result, no speed-up). On the 384-wide shape of benchmarks/bench_generate.py, one pass over the
weights takes 0.25 ms instead of float32's 3.3 ms.

The error is at most half a step of each row's scale per weight (|W - q·s| <= s/2); logits stay within
~2-3% of float32's largest logit and greedy tokens mostly agree (tests/test_quantize.py). Training never sees this: the
quantized model is a copy, for generation only (`generate(..., quantize="int8")`, `diyllm sample / chat /
serve --quantize int8`).

`quantize="w8a8"` also rounds each token's activation vector to int8 (one dynamic scale per row, the
same symmetric rule) right before each matmul, so the product is int8 · int8 summed exactly in int32
(`torch._int_mm`, which uses the CPU's int8 dot-product instructions), then scaled by both scales:

    x·Wᵀ ≈ (s_x · s_W) ⊙ (q_x · q_Wᵀ),   s_x = max_j |x_j| / 127 per row.

Reading the weights is then no longer held back by converting them to float: on the benchmark's
medium shape the 25 weight matmuls of a decode step take ~0.18 ms instead of ~0.4 ms. The extra error
is the activations' rounding (at most half a step of s_x each). It pays off compiled, where the
rounding fuses into the neighbouring kernels; eagerly it adds ops per matmul.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from diyllm.model.layers import Linear, stacked_weight
from diyllm.model.lora import has_lora, merge_lora
from diyllm.model.rope import RotaryEmbedding

QUANTIZE_CHOICES = ("none", "int8", "w8a8")


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, s) with x ≈ q·s per row: q int8 in [-127, 127], s (rows, 1) float32 = max |x| / 127."""
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 127
    return torch.round(x / scale).clamp(-127, 127).to(torch.int8), scale


class Int8Linear(nn.Module):
    """y = x·(q·s)ᵀ with int8 q (out, in) and one scale per output row (buffers: nothing to train)."""

    def __init__(self, weight: torch.Tensor, act_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        q, scale = quantize_rows(weight.detach())  # the weights' rows; W8A8Linear rounds its inputs the same way
        scale = scale[:, 0]
        # The CPU kernel reads the inner dimension in blocks of 16 (with any other width it returns garbage),
        # so the columns are zero-padded to a multiple of 16 and each input row is padded to match.
        self.pad = -self.in_features % 16
        self.register_buffer("weight_int8", F.pad(q, (0, self.pad)))
        self.register_buffer("scale", scale.to(act_dtype))

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight_int8[:, : self.in_features].to(dtype) * self.scale.to(dtype)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype == torch.bfloat16 and self.scale.dtype == x.dtype and HAS_INT8_MM:
            flat = x.reshape(-1, self.in_features)
            flat = F.pad(flat, (0, self.pad)) if self.pad else flat.contiguous()
            out = torch.ops.aten._weight_int8pack_mm(flat, self.weight_int8, self.scale)
            return out.reshape(*x.shape[:-1], self.out_features)
        return x @ self.dequantized(x.dtype).t()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row scales"


HAS_INT8_MM = hasattr(torch.ops.aten, "_weight_int8pack_mm")
HAS_INT_MM = hasattr(torch, "_int_mm")


class W8A8Linear(Int8Linear):
    """An Int8Linear whose input is rounded to int8 too, per row (dynamic): y = s_x·s_W ⊙ (q_x·q_Wᵀ).

    Same buffers as Int8Linear (the state is the weights' quantization only). On CPU the int8 product is
    `torch._int_mm` (exact int32 sums); elsewhere the same integers are multiplied in float32 (exact while
    a row's sum stays below 2²⁴, i.e. in_features up to ~1000 at full range; otherwise within rounding)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        q, s_x = quantize_rows(F.pad(flat, (0, self.pad)) if self.pad else flat)
        if x.device.type == "cpu" and HAS_INT_MM:
            dots = torch._int_mm(q, self.weight_int8.t()).float()  # (in, out) view: the layout it reads fastest
        else:
            dots = q.float() @ self.weight_int8.float().t()
        out = dots * s_x * self.scale.float()
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", int8 activations (per-row dynamic scales)"


def quantize_int8(model: nn.Module, act_dtype: torch.dtype = torch.bfloat16, stack: bool = True,
                  activations: str = "bf16") -> nn.Module:
    """A copy of `model` for generation: every Linear (attention, MLP, the head) becomes an Int8Linear,
    everything else (embeddings, norms) is cast to act_dtype. The original is left as it was.

    stack=True gives q|k|v and w1|w3 one Int8Linear each (`stack_int8_parts`): the same numbers in
    fewer kernel calls. stack=False keeps one per matrix (what the tests compare against).
    activations="int8" makes them W8A8Linear (quantize="w8a8": the inputs are rounded to int8 too)."""
    if activations not in ("bf16", "int8"):
        raise ValueError(f"activations={activations!r} must be 'bf16' (weight-only int8) or 'int8' (w8a8)")
    layer = W8A8Linear if activations == "int8" else Int8Linear
    quantized = copy.deepcopy(model).eval()
    if has_lora(quantized):  # adapters first: folded into W (+ s·BA), then quantized
        merge_lora(quantized)
    for module in list(quantized.modules()):
        if hasattr(module, "fused_parts"):
            module.fused = False  # never stack the float weights: they are about to be int8
            if stack:
                stack_int8_parts(module, act_dtype, layer)
    for name, child in list(quantized.named_modules()):
        if isinstance(child, Linear):
            parent, _, attr = name.rpartition(".")
            owner = quantized.get_submodule(parent) if parent else quantized
            setattr(owner, attr, layer(child.weight, act_dtype))
    rope = [(m, m.cos, m.sin) for m in quantized.modules() if isinstance(m, RotaryEmbedding)]
    quantized.to(act_dtype)  # embeddings and norms; the int8 weights are not floating point and stay
    for m, cos, sin in rope:  # RoPE's angle tables stay float32 (cast to the activations' dtype at use)
        m.cos, m.sin = cos, sin
    return quantized


def stack_int8_parts(module: nn.Module, act_dtype: torch.dtype, layer: type[Int8Linear] = Int8Linear) -> None:
    """Make `module.stacked_proj` one Int8Linear of its fused parts' stacked weight and drop the parts.

    Quantization is per output row, so a row gets the same int8 values and scale whether its matrix is
    quantized alone or stacked with others: x through the stack is the separate int8 matmuls' outputs
    side by side, in one kernel call instead of three (q|k|v) or two (w1|w3). A decode step of the
    6-layer benchmark shape makes 25 calls instead of 43. The parts become None, so the copy holds
    each int8 weight once. Parts that are not plain Linear layers are left as they are (`quantize_int8`
    has merged any LoRA adapters already). With W8A8Linear the stack rounds its input once, to the
    same integers each part would have."""
    parts = module.fused_parts()
    if not all(type(part) is Linear for part in parts):
        return
    module.stacked_proj = layer(stacked_weight(module), act_dtype)
    for name, child in list(module.named_children()):
        if any(child is part for part in parts):
            setattr(module, name, None)


def quantized_for(model: nn.Module, scheme: str) -> nn.Module:
    """The generation copy for a `quantize` choice: "int8" (weight-only) or "w8a8"."""
    if scheme not in ("int8", "w8a8"):
        raise ValueError(f"quantize={scheme!r}: no quantized copy for it; use one of {QUANTIZE_CHOICES[1:]}")
    return quantize_int8(model, activations="int8" if scheme == "w8a8" else "bf16")


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())


__all__ = ["Int8Linear", "W8A8Linear", "quantize_rows", "quantize_int8", "quantized_for", "stack_int8_parts",
           "is_quantized", "QUANTIZE_CHOICES", "HAS_INT8_MM", "HAS_INT_MM"]

