"""Checkpointers: where a run's checkpoints live and how they are written. The seam for sharded (DCP)
checkpoints.

The loop says *what* to save and when; a checkpointer decides *how*:

    checkpointer.save("latest.pt", model, optimizer, iteration, **entries)  # every rank calls it
    ckpt = checkpointer.load("latest.pt")                                   # the checkpoint dict
    checkpointer.restore(ckpt, model, optimizer)                            # weights + optimizer state in place

`entries` are the plain-Python parts of the training state (configs, tokenizer, counters, RNGs, data
positions; see diyllm.training.resume.training_entries). `save` is called on every rank, because a
sharded checkpointer needs every rank to write its shard; it returns once the checkpoint is complete on
disk for every rank, so a process that starts reading it right after finds it whole.

`SingleFileCheckpointer` is today's format: one `.pt` file (diyllm.checkpoints.save_checkpoint)
written atomically by rank 0, holding the plain model's state_dict and the optimizer's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diyllm.checkpoints import read_checkpoint, save_checkpoint, unwrap_model
from diyllm.training.distributed import DistInfo


class Checkpointer:
    """The interface; see the module docstring."""

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def path(self, name: str) -> Path:
        raise NotImplementedError

    def save(self, name: str, model: nn.Module, optimizer: torch.optim.Optimizer, iteration: int,
             **entries: Any) -> None:
        raise NotImplementedError

    def load(self, name: str) -> dict[str, Any]:
        raise NotImplementedError

    def restore(self, ckpt: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        raise NotImplementedError


class SingleFileCheckpointer(Checkpointer):
    """out_dir/NAME: one file per checkpoint, written by rank 0 only (all ranks hold the same weights)."""

    def __init__(self, out_dir: str | os.PathLike, dist: DistInfo | None = None):
        self.out_dir = Path(out_dir)
        self.dist = dist or DistInfo()

    def path(self, name: str) -> Path:
        return self.out_dir / name

    def exists(self, name: str) -> bool:
        return self.path(name).exists()

    def save(self, name: str, model: nn.Module, optimizer: torch.optim.Optimizer, iteration: int,
             **entries: Any) -> None:
        if self.dist.is_main:
            save_checkpoint(model, optimizer, iteration, self.path(name), **entries)
        if self.dist.enabled:  # no rank may go on (e.g. to a next run resuming it) before the file is whole
            torch.distributed.barrier()

    def load(self, name: str) -> dict[str, Any]:
        return read_checkpoint(self.path(name))

    def restore(self, ckpt: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        unwrap_model(model).load_state_dict(ckpt["model"])
        if optimizer is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
