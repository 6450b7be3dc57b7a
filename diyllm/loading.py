"""Open a model from any reference: the one place sample, chat, lab, export, SFT and init_from start.

    model, tokenizer, ckpt = load_model("runs/shakespeare_char_cpu")   # a run folder: best.pt, else latest.pt
    model, tokenizer, ckpt = load_model("runs/x/latest.pt")            # a checkpoint file
    model, tokenizer, ckpt = load_model("hf:exported/x")               # a local Hugging Face Llama folder

A reference is a `.pt` file, a run folder, a sharded (DCP) checkpoint folder (consolidated in memory),
or "hf:DIR" (converted on the fly by diyllm.interop.hf and
read as if it were a diyllm checkpoint at iteration 0). The file format itself is diyllm.checkpoints.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from diyllm.checkpoints import model_from_checkpoint, read_checkpoint, resolve_checkpoint_path, tokenizer_from_text

HF_PREFIX = "hf:"


def read_model_reference(spec: str | os.PathLike) -> tuple[dict[str, Any], str]:
    """(checkpoint dict, where it came from) for what init_from / --ckpt name: a .pt file, a run folder,
    a sharded (DCP) checkpoint folder, or "hf:DIR", a local Hugging Face Llama folder read as if it were a
    diyllm checkpoint (iteration 0)."""
    spec = os.fspath(spec)
    if spec.startswith(HF_PREFIX):
        from diyllm.interop.hf_read import hf_checkpoint_dict

        return hf_checkpoint_dict(spec[len(HF_PREFIX):]), spec
    path = resolve_checkpoint_path(spec)
    if os.path.isdir(path):  # a sharded (DCP) checkpoint folder of an FSDP run: assembled in memory
        from diyllm.sharded_checkpoints import consolidated_checkpoint

        return consolidated_checkpoint(path), path
    return read_checkpoint(path, map_location="cpu"), path


def load_model(ckpt_path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, Any, dict]:
    """Load a model reference as (model in eval mode on `device`, tokenizer or None, checkpoint dict).

    The model is the plain DIYForCausalLM: checkpoints never hold compile/DDP prefixes, so no renaming is
    needed.
    """
    ckpt, path = read_model_reference(ckpt_path)
    if "lora" in ckpt:  # adapters + a reference to their base (see diyllm/training/lora_checkpoint.py)
        model = load_lora_model(ckpt, os.fspath(path), device)
    else:
        model = model_from_checkpoint(ckpt, os.fspath(path), device)
    return model, tokenizer_from_text(ckpt.get("tokenizer"), os.fspath(path)), ckpt


def load_lora_base(lora: dict[str, Any], where: str, device: str | torch.device = "cpu") -> nn.Module:
    """The base model an adapter checkpoint refers to (merged if it is itself an adapter checkpoint),
    checked against the hash of the weights the adapters were trained on."""
    from diyllm.errors import UserError
    from diyllm.model.lora import merge_lora, state_dict_sha256

    base_path = lora.get("base")
    if not base_path:
        raise UserError(f"{where}: LoRA checkpoint without a base reference ('lora.base'); cannot rebuild it")
    candidates = [base_path, os.path.join(os.path.dirname(os.path.abspath(where)), os.path.basename(base_path))]
    found = next((p for p in candidates if p.startswith(HF_PREFIX) or os.path.exists(p)), None)
    if found is None:
        raise UserError(f"{where}: its base model {base_path} does not exist; LoRA checkpoints hold only the "
                        "adapters, so keep the base checkpoint (or merge with `diyllm lora merge` beforehand)")
    model = merge_lora(load_model(found, device=device)[0])
    if lora.get("base_sha256") and state_dict_sha256(model.state_dict()) != lora["base_sha256"]:
        raise UserError(f"{where}: the base model {found} has changed since the adapters were trained "
                        "(its weights' hash differs); use the original base checkpoint")
    return model


def load_lora_model(ckpt: dict[str, Any], where: str, device: str | torch.device = "cpu") -> nn.Module:
    """Base + adapters of the adapter checkpoint `ckpt` (read from `where`), unmerged, in eval mode."""
    from diyllm.model.lora import apply_lora, load_lora_state

    lora = ckpt["lora"]
    model = load_lora_base(lora, where, device)
    apply_lora(model, int(lora["rank"]), float(lora["alpha"]), float(lora.get("dropout", 0.0)), lora["targets"])
    load_lora_state(model, ckpt["model"], where)
    return model.to(device).eval()


read_init_checkpoint = read_model_reference  # the name diyllm.training.checkpoint has always exported
