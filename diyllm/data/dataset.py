"""Reading a prepared dataset folder (train.bin / val.bin / meta.json / tokenizer.json).

The .bin files are raw little-endian token ids with no header; meta.json says the dtype. Keeping them
headerless means `np.memmap` reads them directly and any tool can too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from diyllm.errors import UserError

SPLITS = ("train", "val")


def read_meta(data_dir: str | os.PathLike) -> dict[str, Any]:
    """The dataset's meta.json, with a clear error when the folder is not a prepared dataset."""
    path = Path(data_dir) / "meta.json"
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{data_dir} is not a prepared dataset (no meta.json); run `diyllm prepare` first") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is corrupt: {exc}") from None
    if not isinstance(meta, dict) or "dtype" not in meta:
        raise UserError(f"{path} has no 'dtype' field; re-run `diyllm prepare`")
    return meta


def load_split(data_dir: str | os.PathLike, split: str) -> np.memmap | np.ndarray:
    """Memory-map `split` ("train" or "val") as a read-only 1-D array of token ids.

    Only the windows that are indexed get read from disk, so corpora larger than RAM are fine. An empty
    split (e.g. prepared with --val_fraction 0) comes back as an empty ndarray, since mmap cannot map 0 bytes.
    """
    if split not in SPLITS:
        raise UserError(f"split must be one of {SPLITS}, not {split!r}")
    meta = read_meta(data_dir)
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    path = Path(data_dir) / f"{split}.bin"
    if not path.is_file():
        raise UserError(f"{path} is missing; the dataset folder is incomplete, re-run `diyllm prepare`")
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise UserError(f"{path} has {size} bytes, not a multiple of {dtype.itemsize} ({dtype}); the file is damaged")
    expected = meta.get(f"{split}_tokens")
    if expected is not None and expected != size // dtype.itemsize:
        raise UserError(f"{path} holds {size // dtype.itemsize} tokens but meta.json says {expected}")
    if size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def tokenizer_path(data_dir: str | os.PathLike) -> Path:
    """Where the dataset's tokenizer lives (load it with diyllm.tokenizers.load_tokenizer)."""
    meta = read_meta(data_dir)
    return Path(data_dir) / meta.get("tokenizer_file", "tokenizer.json")
