"""Random training windows from a flat token array: the simplest data loader there is."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch


def get_batch(
    data: npt.NDArray | torch.Tensor,
    batch_size: int,
    context_length: int,
    device: str | torch.device = "cpu",
    generator: np.random.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample `batch_size` windows of `context_length + 1` tokens; x is each window's head, y its tail.

    `data` may be a np.memmap over a token file, so only the sampled windows are read from disk.
    Pass a seeded `generator` for reproducible batches (the trainer does, so resumes are exact).
    """
    n = len(data)
    if n < context_length + 1:
        raise ValueError(
            f"dataset has {n} tokens but one window needs context_length + 1 = {context_length + 1}; "
            "use a smaller context_length or more data"
        )
    rng = generator if generator is not None else np.random.default_rng()
    starts = rng.integers(0, n - context_length, size=batch_size)
    return windows_at(data, starts, context_length, device)


def windows_at(
    data: npt.NDArray | torch.Tensor, starts: npt.NDArray, context_length: int, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) for the windows of `context_length + 1` tokens starting at `starts`: x the head, y the tail.

    Only those windows are read, so `data` may be a memmap (or several shards read as one); on CUDA the
    copy goes through pinned memory."""
    if isinstance(data, torch.Tensor):
        offsets = torch.arange(context_length + 1)
        windows = data[torch.as_tensor(starts)[:, None] + offsets].long()
    else:
        rows = [np.asarray(data[s : s + context_length + 1]) for s in starts]
        windows = torch.from_numpy(np.stack(rows).astype(np.int64))
    x, y = windows[:, :-1], windows[:, 1:]
    device = torch.device(device)
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.contiguous().to(device), y.contiguous().to(device)
