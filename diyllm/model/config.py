"""DIYConfig: every number that decides the shape of a model, in one dataclass."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

ATTN_IMPLS = ("sdpa", "diy")


def default_d_ff(d_model: int) -> int:
    """SwiGLU has three matrices instead of two, so 8/3·d keeps the parameter count of a 4·d MLP.

    Rounded up to a multiple of 64 because matmuls are fastest on such sizes.
    """
    return 64 * math.ceil(8 * d_model / 3 / 64)


@dataclass
class DIYConfig:
    vocab_size: int = 256
    context_length: int = 256
    d_model: int = 384
    num_layers: int = 6
    num_heads: int = 6
    num_kv_heads: int | None = None  # None: same as num_heads (plain multi-head attention)
    d_ff: int | None = None  # None: default_d_ff(d_model)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    tie_embeddings: bool = False
    attn_impl: str = "sdpa"  # "sdpa": torch's fused kernels; "diy": the from-scratch reference
    # One matmul for q|k|v and for w1|w3 (same weights, same keys): True, False, or None = on GPU only.
    fused_projections: bool | None = None
    init_std: float | None = None  # None: per-layer init (see layers.py); a float: GPT-2 style N(0, std)

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.d_ff is None:
            self.d_ff = default_d_ff(self.d_model)
        problems = []
        for name in ("vocab_size", "context_length", "d_model", "num_layers", "num_heads", "num_kv_heads", "d_ff"):
            if int(getattr(self, name)) <= 0:
                problems.append(f"{name} must be positive (got {getattr(self, name)})")
        if not problems:
            if self.d_model % self.num_heads:
                problems.append(f"d_model={self.d_model} must be divisible by num_heads={self.num_heads}")
            elif (self.d_model // self.num_heads) % 2:
                problems.append(f"head size d_model/num_heads={self.d_model // self.num_heads} must be even for RoPE")
            if self.num_heads % self.num_kv_heads:
                problems.append(
                    f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads} "
                    "(grouped-query attention shares each k/v head among num_heads/num_kv_heads query heads)"
                )
        if self.attn_impl not in ATTN_IMPLS:
            problems.append(f"attn_impl={self.attn_impl!r} must be one of {ATTN_IMPLS}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout={self.dropout} must be in [0, 1)")
        if problems:
            raise ValueError("invalid DIYConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DIYConfig:
        """Build from a dict, ignoring keys this version does not know (e.g. from newer checkpoints)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
