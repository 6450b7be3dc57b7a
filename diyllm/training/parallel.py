"""Parallel wrappers: how the one training loop runs on one process or many. The seam for FSDP.

A wrapper answers the three questions the loop has about parallelism, and nothing else:

    train_model = parallel.wrap(model)                 # the module the hot loop calls (DDP(model), ...)
    with parallel.sync_gradients(train_model, sync):   # sync=False on all but the last micro-step
        loss.backward()
    norm = parallel.clip_grad_norm(params, max_norm)   # the global gradient norm (clipped if max_norm > 0)

`wrap` is called after the model is on its device (and compiled, if asked) and *before* the optimizer
is built, because a sharding wrapper (FSDP) replaces the parameters the optimizer must hold.
`SingleProcess` (no wrapper) and `DataParallel` (DistributedDataParallel) live here, FSDP in fsdp.py;
`default_parallel` picks one of the first two from the process group torchrun set up (the model stage
chooses FSDP when parallelism = "fsdp").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from contextlib import AbstractContextManager

import torch
from torch import nn

from diyllm.training.distributed import DistInfo
from diyllm.training.optim import clip_grad_norm_, global_norm


class ParallelWrapper:
    """One process, no wrapping: the base every wrapper refines."""

    name = "none"

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def sync_gradients(self, train_model: nn.Module, sync: bool) -> AbstractContextManager:
        """Context for one micro-step's backward; sync=False may skip the gradient all-reduce."""
        return contextlib.nullcontext()

    @torch.no_grad()
    def clip_grad_norm(self, params: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
        """Global L2 norm of the gradients before clipping; clip them to max_norm when max_norm > 0."""
        params = list(params)
        if max_norm > 0:
            return clip_grad_norm_(params, max_norm)
        return global_norm([p.grad for p in params if p.grad is not None])


SingleProcess = ParallelWrapper


class DataParallel(ParallelWrapper):
    """DistributedDataParallel: every rank holds the whole model; backward averages the gradients.

    Gradients are identical on every rank after the synced backward, so clipping needs no communication.
    """

    name = "ddp"

    def __init__(self, device: torch.device):
        self.device = device

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(model, device_ids=ids)

    def sync_gradients(self, train_model: nn.Module, sync: bool) -> AbstractContextManager:
        # Accumulating micro-steps need no all-reduce: only the last one's backward syncs the sum.
        return contextlib.nullcontext() if sync else train_model.no_sync()


def default_parallel(dist: DistInfo, device: torch.device) -> ParallelWrapper:
    """DDP when torchrun started several processes, else no wrapper."""
    return DataParallel(device) if dist.enabled else SingleProcess()
