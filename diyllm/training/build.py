"""Building what the loop trains: numeric settings, the model (from the config or a checkpoint's shape),
the optimizer, and torch.compile with its eager fallback. Used by the trainer's setup stages."""

from __future__ import annotations

import dataclasses
import os
import random
from typing import Any

import numpy as np
import torch
from torch import nn

from diyllm.errors import UserError
from diyllm.model import DIYConfig
from diyllm.model.config import SHAPE_FIELDS
from diyllm.training.config import TrainConfig
from diyllm.training.host_malloc import keep_freed_memory
from diyllm.training.optim import AdamW, muon_optimizer

CUBLAS_DETERMINISTIC = ":4096:8"  # cuBLAS's documented workspace setting for reproducible results


def configure_numerics(cfg: TrainConfig, device: torch.device) -> None:
    """Threads, malloc tuning on CPU, TF32 on GPUs, and (deterministic=true) torch's deterministic-algorithms mode.

    CPU training is deterministic without it: every op the model uses has a fixed reduction order for a
    given thread count. On CUDA several kernels (atomics in index/scatter backwards, some cuBLAS paths)
    are not; deterministic mode picks slower reproducible ones and raises on an op that has none.
    """
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if device.type == "cpu" and cfg.keep_freed_memory:
        keep_freed_memory()  # fewer page faults per step (training/host_malloc.py)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
    if cfg.deterministic:
        # cuBLAS reads this when it creates its handle: set it before the first matmul on the GPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC)
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def seed_everything(seed: int, rank: int) -> None:
    """Python/NumPy per rank; torch the same on every rank, so every rank builds the same initial weights
    (reseeded per rank after the model is built: `seed_dropout`)."""
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed)


def seed_dropout(seed: int, rank: int) -> None:
    """Different dropout masks per rank (rank 0 keeps the stream it built the model with)."""
    if rank:
        torch.manual_seed(seed + rank)


def model_config_from(cfg: TrainConfig, vocab_size: int) -> DIYConfig:
    """The model the config's model keys describe (they are DIYConfig's own fields), with this vocabulary."""
    try:
        return DIYConfig(**{**cfg.model_values(), "vocab_size": vocab_size})
    except ValueError as exc:
        raise UserError(str(exc)) from exc


def checkpoint_shape(cfg: TrainConfig, ckpt: dict[str, Any], log) -> tuple[TrainConfig, DIYConfig]:
    """init_from=PATH: the weights decide the shape, the config's training-time knobs (dropout, attention
    kernel, fusion) still apply. Returns the config with the checkpoint's shape fields, and the model config."""
    saved = ckpt.get("model_config")
    if not isinstance(saved, dict):
        raise UserError(f"{cfg.init_from} has no model_config; cannot rebuild its model")
    mc = DIYConfig.from_dict({**saved, "dropout": cfg.dropout, "attn_impl": cfg.attn_impl,
                              "fused_projections": cfg.fused_projections})
    shape = {k: getattr(mc, k) for k in SHAPE_FIELDS}
    changed = {k: v for k, v in shape.items()
               if getattr(cfg, k) not in (v, None) and not (k == "vocab_size" and cfg.vocab_size == 0)}
    if changed:
        log(f"note: model shape taken from {cfg.init_from}: {changed}")
    return dataclasses.replace(cfg, **shape), mc


def optimizer_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (embeddings, projections) but not vectors (norm gains): shrinking a gain towards 0
    only fights the normalisation. A tied matrix appears once (parameters() de-duplicates)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "muon":  # issue 19: Muon on the hidden matrices, AdamW on the rest
        return muon_optimizer(cfg, model, optimizer_groups(model, cfg.weight_decay))
    return AdamW(optimizer_groups(model, cfg.weight_decay), lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                 eps=cfg.eps, foreach=True)


def compile_failure_message(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (f"torch.compile is not usable here ({type(exc).__name__}: {first[:200]}); "
            "continuing in eager mode (same results, slower). Set compile=false to silence this.")


def try_compile(model: nn.Module, warn) -> nn.Module | None:
    """torch.compile(model), or None (with a warning) when this machine cannot compile. Most failures
    surface only at the first call; the trainer's first micro-step handles those."""
    try:
        return torch.compile(model)
    except Exception as exc:  # noqa: BLE001 - any failure means: run eager
        warn(compile_failure_message(exc))
        return None
