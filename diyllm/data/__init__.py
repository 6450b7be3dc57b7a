"""Data: corpora -> token files (`prepare_dataset`), reading them back (`load_split`), batches (`get_batch`).

Imports are lazy so that worker processes and `diyllm prepare` do not pay for importing torch.
"""

from __future__ import annotations

from typing import Any

from diyllm.data.dataset import load_split, read_meta

__all__ = ["get_batch", "load_split", "prepare_dataset", "read_meta"]


def __getattr__(name: str) -> Any:
    if name == "get_batch":
        from diyllm.data.batch import get_batch

        return get_batch
    if name == "prepare_dataset":
        from diyllm.data.prepare import prepare_dataset

        return prepare_dataset
    raise AttributeError(f"module 'diyllm.data' has no attribute {name!r}")
