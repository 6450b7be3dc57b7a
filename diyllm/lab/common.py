"""Small helpers the lab commands share: tiny mode, building a model and batches from a TrainConfig.

Tiny mode (environment variable DIYLLM_TINY=1) shrinks the model, the data and the number of steps of
`demo`, `sweep` and `lr-find` so every documented command can be run by the test suite in seconds
(tests/test_docs_commands.py sets it). Results in tiny mode are meaningless; only the plumbing runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diyllm.errors import UserError
from diyllm.model import DIYConfig, DIYForCausalLM

TINY_ENV = "DIYLLM_TINY"
# Overrides appended (last wins) to any training config in tiny mode.
TINY_OVERRIDES = [
    "--context_length=32", "--d_model=32", "--num_layers=1", "--num_heads=2", "--num_kv_heads=none", "--d_ff=64",
    "--batch_size=4", "--gradient_accumulation_steps=1", "--max_iters=6", "--warmup_iters=2", "--lr_decay_iters=0",
    "--eval_interval=3", "--eval_iters=2", "--log_interval=1", "--checkpoint_interval=0", "--progress=false",
    "--compile=false", "--device=cpu", "--dtype=float32",
]
TINY_MAX_BYTES = 150_000  # corpus cap when preparing data in tiny mode
MODEL_KEYS = ("context_length", "d_model", "num_layers", "num_heads", "num_kv_heads", "d_ff", "rope_theta",
              "norm_eps", "dropout", "tie_embeddings", "attn_impl", "fused_projections", "init_std")


def save_png(fig: Any, out: str | os.PathLike, dpi: int = 90) -> Path:
    """Write a matplotlib figure to `out` atomically (a crash never leaves half a PNG) and close it."""
    import matplotlib.pyplot as plt

    from diyllm.atomic import atomic_write

    out = Path(out)
    with atomic_write(out) as f:
        fig.savefig(f, format="png", dpi=dpi)
    plt.close(fig)
    return out


def tiny_mode() -> bool:
    return os.environ.get(TINY_ENV, "").strip().lower() not in ("", "0", "false", "no")


def with_tiny(overrides: list[str]) -> list[str]:
    """`overrides` followed by the tiny-mode ones when DIYLLM_TINY is set (the user's keys except
    the shape/step ones are kept: e.g. a grid's learning_rate still varies)."""
    return [*overrides, *TINY_OVERRIDES] if tiny_mode() else list(overrides)


def config_dict(cfg: Any) -> dict[str, Any]:
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))


def data_vocab_size(data_dir: str) -> int:
    from diyllm.data.dataset import read_meta

    return int(read_meta(data_dir)["vocab_size"])


def build_model(cfg: Any, vocab_size: int | None = None) -> DIYForCausalLM:
    """A fresh DIYForCausalLM with the shape of a TrainConfig (vocab from the data when cfg says 0)."""
    d = config_dict(cfg)
    vocab = vocab_size or d.get("vocab_size") or data_vocab_size(d["data_dir"])
    return DIYForCausalLM(DIYConfig(vocab_size=int(vocab), **{k: d[k] for k in MODEL_KEYS if k in d}))


def count_params(cfg: Any, vocab_size: int | None = None) -> int:
    """Parameter count of the model a config describes (built on the meta device: no memory, instant)."""
    with torch.device("meta"):
        return build_model(cfg, vocab_size).num_parameters()


def train_batches(cfg: Any, split: str = "train", seed: int = 0) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """A function returning random (x, y) windows of a prepared data folder, seeded."""
    from diyllm.data.batch import get_batch
    from diyllm.data.dataset import load_split

    d = config_dict(cfg)
    data = load_split(d["data_dir"], split, verify_checksums=bool(d.get("verify_data", True)))  # as train does
    T, B = int(d["context_length"]), int(d["batch_size"])
    if len(data) <= T:
        raise UserError(f"{d['data_dir']}/{split}.bin has {len(data)} tokens, fewer than context_length+1 = {T + 1}")
    rng = np.random.default_rng(seed)
    return lambda: get_batch(data, B, T, generator=rng)
