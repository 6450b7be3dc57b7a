"""Sharded checkpoints: a folder written by every rank at once with torch.distributed.checkpoint (DCP).

Under FSDP no rank holds the whole model, so `latest/` and `best/` are folders instead of `.pt` files:

    latest/
      .metadata          DCP's index: every tensor's global shape, dtype and which file holds which slice
      __0_0.distcp ...   one data file per rank (its shards of the weights and AdamW moments)
      trainer_state.pt   rank 0: iteration, loop counters, configs, tokenizer, every rank's RNG + data position

Model and optimizer go through `get_state_dict` / `set_state_dict`, whose keys are the plain model's
parameter names (no FSDP/compile prefixes), so a folder saved by 2 ranks loads on 1 or 3 (DCP reslices
each tensor for the reader's sharding) and `consolidate` gives the ordinary single-file checkpoint.

Completion is atomic: everything is written into a temporary sibling folder, which replaces the old
checkpoint by a rename only after all ranks finished (diyllm.atomic.atomic_dir); a SIGKILL mid-save leaves
the previous checkpoint as it was. A folder without `.metadata` or `trainer_state.pt` is incomplete and
refused as such, never half-loaded.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from diyllm.atomic import atomic_dir, atomic_write
from diyllm.checkpoints import DCP_METADATA_FILE, DCP_STATE_FILE, is_dcp_folder, unwrap_model
from diyllm.errors import UserError

STATE_FILE, METADATA_FILE = DCP_STATE_FILE, DCP_METADATA_FILE


def dcp_api():
    """(dcp module, get_state_dict, set_state_dict, StateDictOptions), or a UserError naming the version."""
    try:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
    except ImportError:
        raise UserError(f"sharded checkpoints need torch.distributed.checkpoint with get_state_dict (PyTorch >= 2.4);"
                        f" this PyTorch is {torch.__version__}") from None
    return dcp, get_state_dict, set_state_dict, StateDictOptions


def check_complete(path: str | os.PathLike) -> None:
    p = Path(path)
    missing = [name for name in (METADATA_FILE, STATE_FILE) if not (p / name).is_file()]
    if missing:
        raise UserError(f"{p} is an incomplete sharded (DCP) checkpoint: {' and '.join(missing)} missing (the save "
                        "did not finish, or the folder was copied partly); nothing was loaded. Use another "
                        "checkpoint (e.g. best/ or a complete copy)")


def _no_dist_kwargs(fn) -> dict[str, Any]:
    """Without a process group DCP must be told to read/write alone (older versions do not guess)."""
    alone = not (dist.is_available() and dist.is_initialized())
    return {"no_dist": True} if alone and "no_dist" in inspect.signature(fn).parameters else {}


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _model_and_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    _, get_state_dict, _, _ = dcp_api()
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return {"model": get_model_state_dict(model)}
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optim_state}


def save_dcp_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                        trainer_state: dict[str, Any]) -> None:
    """Collective: every rank calls it with its shards; rank 0's `trainer_state` (picklable with
    weights_only, like a .pt checkpoint's extras) goes to trainer_state.pt. Atomic as described above."""
    dcp = dcp_api()[0]
    state = _model_and_optimizer_state(model, optimizer)
    rank = dist.get_rank() if _distributed() else 0

    def write(tmp: str) -> None:
        dcp.save(state, checkpoint_id=tmp, **_no_dist_kwargs(dcp.save))
        if rank == 0:
            with atomic_write(Path(tmp) / STATE_FILE) as f:
                torch.save(trainer_state, f)

    if rank == 0:
        with atomic_dir(path) as tmp:
            if _distributed():
                dist.broadcast_object_list([str(tmp)], src=0)
            write(str(tmp))
            if _distributed():
                dist.barrier()  # every rank's shards are on disk before the rename publishes them
    else:
        where = [None]
        dist.broadcast_object_list(where, src=0)
        write(where[0])
        dist.barrier()
    if _distributed():
        dist.barrier()  # nobody returns before the new folder is in place


def read_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    """trainer_state.pt of a complete DCP folder (weights_only=True)."""
    check_complete(path)
    try:
        return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"could not read {Path(path) / STATE_FILE}: {exc}") from exc


def saved_tensor_shapes(path: str | os.PathLike, prefix: str = "model.") -> dict[str, tuple[int, ...]]:
    """Global shapes of the saved tensors whose (flattened) key starts with `prefix`, from .metadata."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    check_complete(path)
    meta = FileSystemReader(os.fspath(path)).read_metadata()
    return {k[len(prefix):]: tuple(v.size) for k, v in meta.state_dict_metadata.items()
            if k.startswith(prefix) and isinstance(v, TensorStorageMetadata)}


def shape_mismatches(path: str | os.PathLike, model: nn.Module) -> list[str]:
    """'name: checkpoint (a, b) vs model (c, d)' for every weight whose saved shape differs (or is missing)."""
    saved = saved_tensor_shapes(path)
    diffs = []
    for name, tensor in model.state_dict().items():
        shape = tuple(tensor.shape)
        if name not in saved:
            diffs.append(f"{name}: not in the checkpoint")
        elif saved[name] != shape:
            diffs.append(f"{name}: checkpoint {saved[name]} vs model {shape}")
    return diffs


SHAPE_CONFIG_FIELDS = ("vocab_size", "context_length", "d_model", "num_layers", "num_heads", "num_kv_heads", "d_ff",
                       "tie_embeddings")


def config_differences(saved: dict | None, current: Any) -> list[str]:
    """'d_ff: checkpoint 96 vs model 128' for the shape fields of two model configs."""
    if not isinstance(saved, dict) or current is None:
        return []
    now = current.to_dict() if hasattr(current, "to_dict") else dict(current)
    return [f"{k}: checkpoint {saved.get(k)!r} vs model {now.get(k)!r}" for k in SHAPE_CONFIG_FIELDS
            if k in saved and saved.get(k) != now.get(k)]


def load_dcp_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
                        ) -> dict[str, Any]:
    """Collective: load weights (and optimizer state) into `model` (plain or sharded, any world size)
    and return trainer_state. Refuses incomplete folders and different shapes before reading a byte."""
    dcp, _, set_state_dict, _ = dcp_api()
    trainer_state = read_trainer_state(path)
    plain = _plain_module(model)
    diffs = shape_mismatches(path, plain)
    if diffs:
        fields = config_differences(trainer_state.get("model_config"), getattr(plain, "config", None))
        shown = fields + diffs[:5] + ([f"... {len(diffs) - 5} more weights"] if len(diffs) > 5 else [])
        raise UserError(f"checkpoint {path} was written for a different model shape:\n  - " + "\n  - ".join(shown)
                        + "\n(use a config with the checkpoint's shape, or init_from=scratch)")
    state = _model_and_optimizer_state(model, optimizer)
    dcp.load(state, checkpoint_id=os.fspath(path), **_no_dist_kwargs(dcp.load))
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return trainer_state


def _plain_module(model: nn.Module) -> nn.Module:
    return unwrap_model(model)


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


def consolidate(path: str | os.PathLike, out: str | os.PathLike) -> dict[str, Any]:
    """Write consolidated_checkpoint(path) atomically to `out` (a .pt every diyllm command reads)."""
    ckpt = consolidated_checkpoint(path)
    with atomic_write(out) as f:
        torch.save(ckpt, f)
    return ckpt


class ShardedCheckpointer:
    """The training loop's checkpointer for parallelism = "fsdp": RUN/latest/ and RUN/best/ DCP folders.

    save(name, model, optimizer, iteration, **entries) is collective; load(name) returns the plain-Python
    entries (no weights: "model" is absent) and restore(ckpt, model, optimizer) reads this rank's slices.
    Names may carry a ".pt" suffix (the single-file checkpointer's names); it is dropped."""

    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = Path(out_dir)

    def path(self, name: str) -> Path:
        return self.out_dir / name.removesuffix(".pt")

    def exists(self, name: str) -> bool:
        return is_dcp_folder(self.path(name))

    def save(self, name: str, model: nn.Module, optimizer: torch.optim.Optimizer, iteration: int,
             **entries: Any) -> None:
        save_dcp_checkpoint(self.path(name), model, optimizer, {**entries, "iteration": int(iteration)})

    def load(self, name: str) -> dict[str, Any]:
        return {**read_trainer_state(self.path(name)), DCP_PATH_KEY: str(self.path(name))}

    def restore(self, ckpt: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        load_dcp_checkpoint(ckpt[DCP_PATH_KEY], model, optimizer)

    def load_for_resume(self, warn) -> tuple[dict[str, Any], Path]:
        """The checkpointer seam's resume entry (see diyllm.training.checkpointer.Checkpointer): latest/."""
        if not self.exists("latest.pt"):
            hint = ""
            if (self.out_dir / "latest.pt").exists():
                hint = (" (it holds latest.pt from a DDP run: resume it with parallelism=ddp, or start from its "
                        "weights with init_from=PATH/latest.pt)")
            raise UserError(f"init_from=resume but {self.path('latest.pt')} does not exist; nothing to resume{hint} "
                            "(use init_from=scratch to start a new run)")
        return self.load("latest.pt"), self.path("latest.pt")


DCP_PATH_KEY = "dcp_folder"  # in load()'s dict: where restore() reads the tensors from


__all__ = ["ShardedCheckpointer", "save_dcp_checkpoint", "load_dcp_checkpoint", "read_trainer_state",
           "consolidated_checkpoint", "consolidate", "is_dcp_folder", "check_complete", "shape_mismatches",
           "saved_tensor_shapes"]
