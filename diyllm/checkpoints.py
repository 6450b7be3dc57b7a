"""The diyllm checkpoint file: one `torch.save` dict per `.pt` file ("model", "optimizer", "iteration",
"model_config", "tokenizer", ... see docs/training.md), and the model it describes.

Checkpoints are written atomically (temp file + fsync + rename), so the previous good checkpoint
survives a crash mid-write, and loaded with `weights_only=True`, so opening a file never runs code.
Module state is always the plain model's (no `_orig_mod.` / `module.` prefixes from compile or DDP).
Opening any model reference (.pt, run folder, hf:DIR) is diyllm.loading; training's own use of these
files (what goes in, exact resume) is diyllm.training.resume and diyllm.training.checkpointer.
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
    model_state: dict[str, Any] | None = None,
    **extra: Any,
) -> None:
    """Write model, optimizer and iteration (plus any `extra` entries) to a path or a binary file.
    `model_state` replaces the model's full state_dict (a LoRA run saves only its adapters)."""
    state = {"model": unwrap_model(model).state_dict() if model_state is None else model_state,
             "iteration": int(iteration), **extra}
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



# ---- the model a checkpoint describes -----------------------------------------------------------------


def tokenizer_from_text(text: str | None, source: str = "<checkpoint>") -> Any:
    """Rebuild a tokenizer from the JSON text a checkpoint embeds; None when there is none.

    The checkpoint stores the tokenizer file's *text* so one .pt file is self-contained; the tokenizer
    package only reads files, so the text goes through a temporary file.
    """
    if not text:
        return None
    import tempfile
    import warnings

    try:
        from diyllm.tokenizers import load_tokenizer
    except ImportError as exc:  # the tokenizer package is optional for loading weights
        warnings.warn(f"{source}: could not import diyllm.tokenizers ({exc}); returning no tokenizer", stacklevel=2)
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tokenizer.json")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return load_tokenizer(path)


def model_config_from_checkpoint(ckpt: dict[str, Any], source: str = "<checkpoint>"):
    """The DIYConfig a checkpoint was trained with (its "model_config" entry)."""
    from diyllm.model import DIYConfig

    cfg = ckpt.get("model_config")
    if not isinstance(cfg, dict):
        raise UserError(
            f"{source} has no 'model_config' entry, so the model shape is unknown "
            "(was it written by save_checkpoint without extras? `diyllm train` checkpoints always have one)"
        )
    try:
        return DIYConfig.from_dict(cfg)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{source}: invalid model_config: {exc}") from exc


def model_from_checkpoint(ckpt: dict[str, Any], where: str, device: str | torch.device = "cpu") -> nn.Module:
    """The DIYForCausalLM a checkpoint dict describes, with its weights, in eval mode on `device`."""
    from diyllm.model import DIYForCausalLM

    config = model_config_from_checkpoint(ckpt, where)
    model = DIYForCausalLM(config)
    state = _strip_wrapper_prefixes(ckpt["model"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(
            f"{where}: weights do not match its model_config "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    if config.tie_embeddings:  # load_state_dict copies into both names; keep them one tensor
        model.token_embeddings.weight = model.lm_head.weight
    return model.to(device).eval()


def resolve_checkpoint_path(path: str | os.PathLike) -> str:
    """A .pt path as given, or for a run folder its best.pt (else latest.pt)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in ("best.pt", "latest.pt"):
            candidate = os.path.join(path, name)
            if os.path.exists(candidate):
                return candidate
        raise UserError(f"{path} is a folder without best.pt or latest.pt; pass a checkpoint file")
    return path


def _strip_wrapper_prefixes(state: dict[str, Any]) -> dict[str, Any]:
    """Tolerate state_dicts saved from a compiled/DDP model by other tools (ours never have prefixes)."""
    out = {}
    for key, value in state.items():
        for prefix in ("_orig_mod.", "module."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out
