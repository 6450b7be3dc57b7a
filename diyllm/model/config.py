"""DIYConfig: every number that decides the shape of a model, in one dataclass."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

ATTN_IMPLS = ("sdpa", "diy")
MLPS = ("swiglu", "relu2")


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
    # --- issue 19: speedrun options; the defaults are the plain Llama block (same state_dict keys) ---
    qk_norm: bool = False  # RMS-normalise q and k per head (no weights) before RoPE: bounded attention logits
    mlp: str = "swiglu"  # swiglu | relu2: w2(relu(w1·x)²), two matrices (w1, w2), d_ff default 4·d_model
    zero_init_proj: bool = False  # attention output_proj and MLP w2 start at 0: each block starts as the identity
    logit_softcap: float = 0.0  # > 0: logits = c·tanh(logits / c), so no logit exceeds c (0: off)

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model if self.mlp == "relu2" else default_d_ff(self.d_model)
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
        if self.mlp not in MLPS:
            problems.append(f"mlp={self.mlp!r} must be one of {MLPS}")
        if not self.logit_softcap >= 0:
            problems.append(f"logit_softcap={self.logit_softcap} must be >= 0 (0: off)")
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
