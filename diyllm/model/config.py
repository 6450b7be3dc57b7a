"""DIYConfig: every number that decides the shape of a model, in one dataclass (fields declared once, in
ModelFields, which the training config shares)."""

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


# The fields that decide the weights' shapes and meaning: a checkpoint must agree on all of them to be
# loaded into a model (the others, e.g. dropout or attn_impl, are how the same weights are run).
SHAPE_FIELDS = ("vocab_size", "context_length", "d_model", "num_layers", "num_heads", "num_kv_heads", "d_ff",
                "tie_embeddings", "rope_theta", "norm_eps")


@dataclass
class ModelFields:
    """Every model option, declared once: DIYConfig is these (validated); the training config
    (diyllm.training.config.TrainConfig) inherits them as its model keys."""

    vocab_size: int = 256
    context_length: int = 256
    d_model: int = 384
    num_layers: int = 6
    num_heads: int = 6
    num_kv_heads: int | None = None  # None: same as num_heads; fewer: grouped-query attention
    d_ff: int | None = None  # None: default_d_ff(d_model), 8/3·d_model rounded up to a multiple of 64
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    tie_embeddings: bool = False
    attn_impl: str = "sdpa"  # "sdpa": torch's fused kernels; "diy": the from-scratch reference
    # One matmul for q|k|v and for w1|w3 (same weights, same keys): True, False, or None = on GPU only.
    fused_projections: bool | None = None
    init_std: float | None = None  # None: per-layer init (see layers.py); a float: GPT-2 style N(0, std)

    def model_values(self) -> dict[str, Any]:
        """These fields' values (from a DIYConfig or a TrainConfig alike)."""
        return {f.name: getattr(self, f.name) for f in fields(ModelFields)}


def shape_problems(values: dict[str, Any]) -> list[str]:
    """Everything impossible about a model's options, as messages (empty: fine). The one place model
    options are validated; `None` for num_kv_heads / d_ff means their defaults."""
    problems = []
    kv = values["num_heads"] if values["num_kv_heads"] is None else values["num_kv_heads"]
    sizes = {**{k: values[k] for k in ("vocab_size", "context_length", "d_model", "num_layers", "num_heads")},
             "num_kv_heads": kv, "d_ff": 1 if values["d_ff"] is None else values["d_ff"]}
    for name, value in sizes.items():
        if int(value) <= 0:
            problems.append(f"{name} must be positive (got {value})")
    if not problems:
        d_model, heads = values["d_model"], values["num_heads"]
        if d_model % heads:
            problems.append(f"d_model={d_model} must be divisible by num_heads={heads}")
        elif (d_model // heads) % 2:
            problems.append(f"head size d_model/num_heads={d_model // heads} must be even for RoPE")
        if heads % kv:
            problems.append(
                f"num_heads={heads} must be a multiple of num_kv_heads={kv} "
                "(grouped-query attention shares each k/v head among num_heads/num_kv_heads query heads)"
            )
    if values["attn_impl"] not in ATTN_IMPLS:
        problems.append(f"attn_impl={values['attn_impl']!r} must be one of {ATTN_IMPLS}")
    if not 0.0 <= values["dropout"] < 1.0:
        problems.append(f"dropout={values['dropout']} must be in [0, 1)")
    return problems


@dataclass
class DIYConfig(ModelFields):
    """Every number that decides the shape of a model (and how it runs), validated on construction."""

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.d_ff is None:
            self.d_ff = default_d_ff(self.d_model)
        problems = shape_problems(self.model_values())
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
