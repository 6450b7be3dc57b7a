"""Checkpoint checksums: damage to a checkpoint is detected when it is loaded, never trained on.

A flipped run of bytes inside `latest.pt` used to load silently (torch.load does not check the zip's
CRCs) and training went on from garbage. So every checkpoint carries the SHA-256 of its own contents in
an "integrity" entry, computed over everything else in the dict in a canonical order (tensor dtype, shape
and bytes; plain values by repr). Loading recomputes it and refuses a mismatch with an error naming the
file. The digest lives *inside* the one .pt file (no sidecar that could be out of step after a crash),
and the file stays an ordinary `torch.load`-able dict: tools that ignore the entry keep working, and
checkpoints from before this entry existed load as before (unverified).

The digest is over the loaded *values*, so corruption anywhere that changes what a reader gets — weights,
optimizer moments, iteration, RNG states, config — is caught; damage that torch.load itself trips over
is reported as an unreadable file by the caller.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch

from diyllm.errors import UserError

INTEGRITY_KEY = "integrity"
ALGORITHM = "sha256-v1"


class CheckpointCorrupted(UserError):
    """A checkpoint whose contents do not match the checksum stored when it was written."""


def state_digest(state: dict[str, Any]) -> str:
    """SHA-256 (hex) over every entry of `state` except the integrity entry itself."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != INTEGRITY_KEY})
    return h.hexdigest()


def seal(state: dict[str, Any]) -> dict[str, Any]:
    """Add the integrity entry to `state` (in place) and return it."""
    state[INTEGRITY_KEY] = {"algorithm": ALGORITHM, "sha256": state_digest(state)}
    return state


def verify(state: dict[str, Any], name: str) -> bool:
    """Check the stored checksum; True if verified, False if the checkpoint predates checksums.

    Raises CheckpointCorrupted naming `name` on a mismatch.
    """
    entry = state.get(INTEGRITY_KEY)
    if entry is None:
        return False
    if not isinstance(entry, dict) or entry.get("algorithm") != ALGORITHM or not isinstance(entry.get("sha256"), str):
        raise CheckpointCorrupted(f"checkpoint {name} has an unreadable integrity entry {entry!r}; the file is damaged "
                                  "or written by a newer diyllm")
    actual = state_digest(state)
    if actual != entry["sha256"]:
        raise CheckpointCorrupted(
            f"checkpoint {name} is corrupted: its contents do not match the checksum stored when it was "
            f"written (sha256 {actual[:12]}… instead of {entry['sha256'][:12]}…); do not use it — resume "
            "from previous.pt or another copy"
        )
    return True


def _feed(h: Any, value: Any) -> None:
    """Hash `value` with its type so that e.g. 1, 1.0, "1" and [1] all differ."""
    if isinstance(value, torch.Tensor):
        t = value.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(value, dict):
        h.update(f"D{len(value)}:".encode())
        for key in sorted(value, key=lambda k: (type(k).__name__, repr(k))):
            _feed(h, key)
            _feed(h, value[key])
    elif isinstance(value, (list, tuple)):
        h.update(f"{'L' if isinstance(value, list) else 'U'}{len(value)}:".encode())
        for item in value:
            _feed(h, item)
    elif isinstance(value, float):
        h.update(b"F" + (b"nan" if math.isnan(value) else value.hex().encode()) + b";")
    elif isinstance(value, (bool, int, str, bytes, type(None))):
        h.update(f"{type(value).__name__}:{value!r};".encode())
    else:  # torch.dtype, torch.Size, numpy scalars...: their repr is stable
        h.update(f"{type(value).__name__}:{value!r};".encode())
