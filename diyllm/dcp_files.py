"""Reading a sharded (DCP) checkpoint folder: is it one, is it complete, its trainer state, and its
weights assembled into the ordinary single-file checkpoint dict.

These only read files, so every command that opens a model (sample, chat, export, eval, data's tokenizer
lookup) can accept a DCP folder without reaching into diyllm.training; writing one (a collective save by
every rank) and the training loop's checkpointer stay in diyllm/training/dcp_checkpoint.py.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch

from diyllm.errors import UserError

STATE_FILE = "trainer_state.pt"
METADATA_FILE = ".metadata"


def dcp_api():
    """(dcp module, get_state_dict, set_state_dict, StateDictOptions), or a UserError naming the version."""
    try:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
    except ImportError:
        raise UserError(f"sharded checkpoints need torch.distributed.checkpoint with get_state_dict (PyTorch >= 2.4);"
                        f" this PyTorch is {torch.__version__}") from None
    return dcp, get_state_dict, set_state_dict, StateDictOptions


def is_dcp_folder(path: str | os.PathLike) -> bool:
    """True for a folder that is (or was meant to be) a DCP checkpoint."""
    p = Path(path)
    if not p.is_dir():
        return False
    return (p / METADATA_FILE).exists() or (p / STATE_FILE).exists() or any(p.glob("*.distcp"))


def check_complete(path: str | os.PathLike) -> None:
    p = Path(path)
    missing = [name for name in (METADATA_FILE, STATE_FILE) if not (p / name).is_file()]
    if missing:
        raise UserError(f"{p} is an incomplete sharded (DCP) checkpoint: {' and '.join(missing)} missing (the save "
                        "did not finish, or the folder was copied partly); nothing was loaded. Use another "
                        "checkpoint (e.g. best/ or a complete copy)")


def read_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    """trainer_state.pt of a complete DCP folder (weights_only=True)."""
    check_complete(path)
    try:
        return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"could not read {Path(path) / STATE_FILE}: {exc}") from exc


def consolidated_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The single-file checkpoint dict (as save_checkpoint writes it, without optimizer state) of a DCP
    folder, read in one process: full weights under "model", plus iteration, configs and tokenizer."""
    dcp = dcp_api()[0]
    trainer_state = read_trainer_state(path)
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = FileSystemReader(os.fspath(path)).read_metadata()
    weights: dict[str, torch.Tensor] = {}
    for key, item in meta.state_dict_metadata.items():
        if key.startswith("model.") and isinstance(item, TensorStorageMetadata):
            weights[key[len("model."):]] = torch.empty(tuple(item.size), dtype=item.properties.dtype)
    if not weights:
        raise UserError(f"{path}: the DCP checkpoint holds no model weights")
    dcp.load({"model": weights}, checkpoint_id=os.fspath(path), **_single_reader())
    out = {k: v for k, v in trainer_state.items() if k not in ("rank_states",)}
    out["model"] = weights
    out.setdefault("iteration", 0)
    return out


def _single_reader() -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    return {"no_dist": True} if "no_dist" in inspect.signature(dcp.load).parameters else {}
