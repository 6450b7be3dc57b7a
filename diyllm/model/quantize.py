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
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from diyllm.model.layers import Linear, stacked_weight
from diyllm.model.lora import has_lora, merge_lora
from diyllm.model.rope import RotaryEmbedding

QUANTIZE_CHOICES = ("none", "int8")


class Int8Linear(nn.Module):
    """y = x·(q·s)ᵀ with int8 q (out, in) and one scale per output row (buffers: nothing to train)."""

    def __init__(self, weight: torch.Tensor, act_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
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


def quantize_int8(model: nn.Module, act_dtype: torch.dtype = torch.bfloat16, stack: bool = True) -> nn.Module:
    """A copy of `model` for generation: every Linear (attention, MLP, the head) becomes an Int8Linear,
    everything else (embeddings, norms) is cast to act_dtype. The original is left as it was.

    stack=True gives q|k|v and w1|w3 one Int8Linear each (`stack_int8_parts`): the same numbers in
    fewer kernel calls. stack=False keeps one per matrix (what the tests compare against)."""
    quantized = copy.deepcopy(model).eval()
    if has_lora(quantized):  # adapters first: folded into W (+ s·BA), then quantized
        merge_lora(quantized)
    for module in list(quantized.modules()):
        if hasattr(module, "fused_parts"):
            module.fused = False  # never stack the float weights: they are about to be int8
            if stack:
                stack_int8_parts(module, act_dtype)
    for name, child in list(quantized.named_modules()):
        if isinstance(child, Linear):
            parent, _, attr = name.rpartition(".")
            owner = quantized.get_submodule(parent) if parent else quantized
            setattr(owner, attr, Int8Linear(child.weight, act_dtype))
    rope = [(m, m.cos, m.sin) for m in quantized.modules() if isinstance(m, RotaryEmbedding)]
    quantized.to(act_dtype)  # embeddings and norms; the int8 weights are not floating point and stay
    for m, cos, sin in rope:  # RoPE's angle tables stay float32 (cast to the activations' dtype at use)
        m.cos, m.sin = cos, sin
    return quantized


def stack_int8_parts(module: nn.Module, act_dtype: torch.dtype) -> None:
    """Make `module.stacked_proj` one Int8Linear of its fused parts' stacked weight and drop the parts.

    Quantization is per output row, so a row gets the same int8 values and scale whether its matrix is
    quantized alone or stacked with others: x through the stack is the separate int8 matmuls' outputs
    side by side, in one kernel call instead of three (q|k|v) or two (w1|w3). A decode step of the
    6-layer benchmark shape makes 25 calls instead of 43. The parts become None, so the copy holds
    each int8 weight once. Parts that are not plain Linear layers are left as they are (`quantize_int8`
    has merged any LoRA adapters already)."""
    parts = module.fused_parts()
    if not all(type(part) is Linear for part in parts):
        return
    module.stacked_proj = Int8Linear(stacked_weight(module), act_dtype)
    for name, child in list(module.named_children()):
        if any(child is part for part in parts):
            setattr(module, name, None)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())


__all__ = ["Int8Linear", "quantize_int8", "stack_int8_parts", "is_quantized", "QUANTIZE_CHOICES", "HAS_INT8_MM"]
