"""Saving and loading training state.

Checkpoints are written atomically (temp file + fsync + rename), so the previous good checkpoint
survives a crash mid-write, and loaded with `weights_only=True`, so opening a file never runs code.
Module state is always the plain model's (no `_orig_mod.` / `module.` prefixes from compile or DDP).
"""

from __future__ import annotations

import os
from typing import IO, Any, BinaryIO

import torch
from torch import nn

from diyllm.atomic import atomic_write
from diyllm.errors import UserError


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP / FSDP
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            return model


def save_checkpoint(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    iteration: int,
    out: str | os.PathLike | BinaryIO | IO[bytes],
    **extra: Any,
) -> None:
    """Write model, optimizer and iteration (plus any `extra` entries) to a path or a binary file."""
    state = {"model": unwrap_model(model).state_dict(), "iteration": int(iteration), **extra}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if isinstance(out, (str, os.PathLike)):
        with atomic_write(out) as f:
            torch.save(state, f)
    else:
        torch.save(state, out)


def read_checkpoint(src: str | os.PathLike | BinaryIO | IO[bytes], map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint dict safely (weights_only=True), with a clear error for a bad file."""
    name = os.fspath(src) if isinstance(src, (str, os.PathLike)) else getattr(src, "name", "<file object>")
    if isinstance(src, (str, os.PathLike)) and not os.path.exists(src):
        raise UserError(f"checkpoint {name} does not exist")
    try:
        state = torch.load(src, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise UserError(f"could not read checkpoint {name}: {exc} (is it a complete diyllm checkpoint?)") from exc
    if not isinstance(state, dict) or "model" not in state:
        raise UserError(f"{name} is not a diyllm checkpoint (no 'model' entry)")
    return state


def load_checkpoint(
    src: str | os.PathLike | BinaryIO | IO[bytes],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
) -> int:
    """Restore model (and optimizer) state from `src`; return the saved iteration."""
    state = read_checkpoint(src)
    unwrap_model(model).load_state_dict(state["model"])
    if optimizer is not None and "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    return int(state["iteration"])

