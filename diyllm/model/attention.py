"""Causal multi-head self-attention, from scratch and through PyTorch's fused kernels.

`attn_impl="diy"` spells out softmax(QKᵀ/√d + mask)V so a reader can follow every step;
`attn_impl="sdpa"` calls torch.nn.functional.scaled_dot_product_attention, which picks flash /
memory-efficient kernels on GPU. Tests prove the two agree.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from diyllm.model.config import DIYConfig
from diyllm.model.kv_cache import KVCache, StaticKVCache
from diyllm.model.layers import Linear, fused_projection, rms_normalize
from diyllm.model.rope import RotaryEmbedding, apply_rotary

# enable_gqa (query heads sharing k/v heads without copying them) arrived in torch 2.5.
_SDPA_HAS_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)


def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """exp(x - max) / sum(exp(x - max)): subtracting the max changes nothing but prevents overflow."""
    shifted = x - x.amax(dim=dim, keepdim=True)
    exp = torch.exp(shifted)
    return exp / exp.sum(dim=dim, keepdim=True)


def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """softmax(q kᵀ / √d_k) v over (..., queries, d_k) / (..., keys, d_k) / (..., keys, d_v).

    `mask` is boolean, True where a query may attend to a key. Dividing by √d_k keeps the scores'
    variance near 1 so the softmax does not saturate as d_k grows.
    """
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = softmax(scores, dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return probs @ v


def grouped_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`scaled_dot_product_attention` for one query token per row, q (B, H, 1, D) over k, v (B, Hkv, L, D)
    with H a multiple of Hkv: each k/v head serves its group of H / Hkv query heads as the rows of one
    matmul, so the cache is never copied per head. mask (boolean, True = visible) broadcasts to (B, H, 1, L)."""
    B, H, _, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    grouped = q.reshape(B, Hkv, H // Hkv, D)  # (B, Hkv, group, D): the group's queries as rows
    visible = mask.expand(B, H, 1, L).reshape(B, Hkv, H // Hkv, L)
    y = scaled_dot_product_attention(grouped, k, v, visible)
    return y.reshape(B, H, 1, D)


def causal_mask(num_queries: int, num_keys: int, device: torch.device | None = None) -> torch.Tensor:
    """(queries, keys) boolean mask where the queries are the *last* num_queries of num_keys positions."""
    offset = num_keys - num_queries
    q_idx = torch.arange(num_queries, device=device)[:, None] + offset
    return torch.arange(num_keys, device=device)[None, :] <= q_idx


class RotaryAngles(NamedTuple):
    """RoPE angles of the tokens in one forward, looked up once and shared by every layer.

    cos/sin: (T, 1, D/2), or (B, T, 1, D/2) for per-row positions (q/k are laid out (B, T, heads, D)).
    rotation: cos + i·sin for the eager complex-multiply path; None where that path is not taken.
    """

    cos: torch.Tensor
    sin: torch.Tensor
    rotation: torch.Tensor | None


def rotary_for(
    rope: RotaryEmbedding, positions: torch.Tensor | None, seq_len: int, past: int = 0
) -> RotaryAngles:
    """RoPE angles for `seq_len` tokens at `positions`; without explicit positions the tokens sit right
    after the `past` cached ones."""
    cos, sin = rope.cos_sin(positions, seq_len, offset=past)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    eager = cos.dtype in (torch.float32, torch.float64) and not torch.compiler.is_compiling()
    return RotaryAngles(cos, sin, torch.complex(cos, sin) if eager else None)


class CausalSelfAttention(nn.Module):
    """Multi-head attention where token t sees tokens 0..t, with RoPE on q and k.

    Grouped-query attention: with num_kv_heads < num_heads, each k/v head serves a group of
    num_heads/num_kv_heads query heads (smaller KV cache, same quality at scale).
    Rows of q/k/v_proj are laid out head by head: rows h·d_k … (h+1)·d_k−1 belong to head h.
    In an int8 copy (model/quantize.py) q/k/v_proj are None and `stacked_proj` holds all three.
    """

    def __init__(self, config: DIYConfig, rope: RotaryEmbedding | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.attn_impl, self.fused = config.attn_impl, config.fused_projections
        self.dropout = config.dropout
        self.qk_norm = config.qk_norm
        d = config.d_model
        self.q_proj = Linear(d, self.num_heads * self.head_dim)
        self.k_proj = Linear(d, self.num_kv_heads * self.head_dim)
        self.v_proj = Linear(d, self.num_kv_heads * self.head_dim)
        self.output_proj = Linear(self.num_heads * self.head_dim, d)
        self.rope = rope
        self.frozen_fused: torch.Tensor | None = None  # set by frozen_fused_weights
        self.stacked_proj: nn.Module | None = None  # q|k|v as one module, for good (int8 copies)

    def fused_parts(self) -> list[Linear]:
        return [self.q_proj, self.k_proj, self.v_proj]

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        layer_idx: int = 0,
        rotary: RotaryAngles | None = None,
    ) -> torch.Tensor:
        """x: (B, T, d_model). positions: (T,) or (B, T), default 0..T-1 after what the cache holds.

        attn_mask, when given, is the complete boolean mask (True = may attend), broadcastable to
        (B, heads, T, keys); without it the mask is causal (offset by the cached tokens). With a
        StaticKVCache it may be narrower than the cache: it covers the first columns, the rest are not read.
        rotary: the RoPE angles of these tokens from `rotary_for`; the model looks them up once
        per forward for all its layers, a standalone attention module computes its own.
        """
        B, T, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        if rotary is None and self.rope is not None:
            rotary = rotary_for(self.rope, positions, T, kv_cache.length if kv_cache is not None else 0)
        qkv = fused_projection(self, x)
        if qkv is not None:
            # split, not slicing: its backward writes the parts' gradients side by side in one cat,
            # where each slice's backward would fill a zero tensor of the whole width, to be summed.
            qk, v = qkv.view(B, T, H + 2 * Hkv, D).split([H + Hkv, Hkv], dim=2)
            if self.qk_norm:  # per head, before RoPE (a rotation keeps the norm anyway)
                qk = rms_normalize(qk)
            if rotary is not None:  # q and k side by side: one rotation for both
                qk = apply_rotary(qk, *rotary)
            q, k = qk.split([H, Hkv], dim=2)
        else:
            q, k = self.q_proj(x).view(B, T, H, D), self.k_proj(x).view(B, T, Hkv, D)
            v = self.v_proj(x).view(B, T, Hkv, D)
            if self.qk_norm:
                q, k = rms_normalize(q), rms_normalize(k)
            if rotary is not None:
                q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)

        if kv_cache is not None:
            k, v = kv_cache.update(layer_idx, k, v)
            if attn_mask is not None and isinstance(kv_cache, StaticKVCache):
                # A static cache hands back its whole buffer; its caller's mask is only as wide as the
                # columns that can be visible (generation/compiled.py), and the keys past it are not read.
                # (narrow: exactly that many columns, no clamping to the buffer for the compiler to guard on)
                k, v = k.narrow(2, 0, attn_mask.shape[-1]), v.narrow(2, 0, attn_mask.shape[-1])
        # Grouped-query attention: every query head reads its group's k/v head. SDPA can do that in
        # place (torch >= 2.5); used when decoding, where copying the whole cache per step is the cost.
        gqa_in_sdpa = Hkv != H and kv_cache is not None and self.attn_impl == "sdpa" and _SDPA_HAS_GQA
        # The compiled decode step (generation/compiled.py) reads the static cache's span under a mask;
        # CPU SDPA takes a slow masked path for that (143 us per call at 512 bf16 columns), while the
        # formula written out fuses into a few of inductor's loops (and groups heads without a copy).
        grouped_decode = T == 1 and attn_mask is not None and torch.compiler.is_compiling() and x.device.type == "cpu"
        if Hkv != H and not (gqa_in_sdpa or grouped_decode):
            k = k.repeat_interleave(H // Hkv, dim=1)
            v = v.repeat_interleave(H // Hkv, dim=1)

        # Without a mask: causal when queries and keys are the same tokens; one new token (decoding)
        # may see every cached key, so it needs no mask at all.
        mask, is_causal = attn_mask, attn_mask is None and T > 1
        if is_causal and k.shape[2] != T:  # several new tokens after cached ones: causal, offset
            mask, is_causal = causal_mask(T, k.shape[2], x.device), False
        dropout_p = self.dropout if self.training else 0.0
        if grouped_decode:
            y = grouped_decode_attention(q, k, v, attn_mask)
        elif self.attn_impl == "sdpa":
            if gqa_in_sdpa:
                y = F.scaled_dot_product_attention(q, k, v, mask, dropout_p, is_causal, enable_gqa=True)
            else:
                y = F.scaled_dot_product_attention(q, k, v, mask, dropout_p, is_causal)
        else:
            if is_causal:
                mask = causal_mask(T, T, x.device)
            y = scaled_dot_product_attention(q, k, v, mask, dropout_p)
        y = y.transpose(1, 2).reshape(B, T, H * D)
        return self.output_proj(y)
