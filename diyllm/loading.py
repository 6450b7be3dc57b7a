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
from diyllm.errors import UserError
from diyllm.model.lora import apply_lora, lora_state_dict, merge_lora, state_dict_sha256
from diyllm.model.vocab import resize_vocabulary

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
        return load_lora_model(ckpt, os.fspath(path), device), tokenizer_from_text(ckpt.get("tokenizer"), path), ckpt
    model = model_from_checkpoint(ckpt, os.fspath(path), device)
    return model, tokenizer_from_text(ckpt.get("tokenizer"), os.fspath(path)), ckpt


read_init_checkpoint = read_model_reference  # the name diyllm.training.checkpoint has always exported


# ---- LoRA adapter checkpoints: base + adapters, unmerged -------------------------------------------


def load_base(lora: dict[str, Any], where: str, device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """The base model an adapter checkpoint refers to, checked against its hash (merged if it is itself
    a LoRA checkpoint)."""
    base_path = lora.get("base")
    if not base_path:
        raise UserError(f"{where}: LoRA checkpoint without a base reference ('lora.base'); cannot rebuild it")
    candidates = [base_path, os.path.join(os.path.dirname(os.path.abspath(where)), os.path.basename(base_path))]
    found = next((p for p in candidates if p.startswith("hf:") or os.path.exists(p)), None)
    if found is None:
        raise UserError(f"{where}: its base model {base_path} does not exist; LoRA checkpoints hold only the "
                        "adapters, so keep the base checkpoint (or merge with `diyllm lora merge` beforehand)")
    model, tok, _ = load_model(found, device=device)
    merge_lora(model)  # a no-op unless the base is an adapter checkpoint itself
    if lora.get("base_sha256") and state_dict_sha256(model.state_dict()) != lora["base_sha256"]:
        raise UserError(f"{where}: the base model {found} has changed since the adapters were trained "
                        "(its weights' hash differs); use the original base checkpoint")
    return model, tok


def load_lora_model(ckpt: dict[str, Any], where: str, device: str | torch.device = "cpu") -> nn.Module:
    """Base + adapters of the LoRA checkpoint `ckpt` (read from `where`), unmerged, in eval mode."""
    lora = ckpt["lora"]
    model, _ = load_base(lora, where, device)
    vocab = int(ckpt.get("model_config", {}).get("vocab_size", model.config.vocab_size))
    if vocab > model.config.vocab_size:  # chat tokens were added in the LoRA run (deterministic mean rows)
        resize_vocabulary(model, vocab)
    apply_lora(model, int(lora["rank"]), float(lora["alpha"]), float(lora.get("dropout", 0.0)), lora["targets"])
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    wanted = set(lora_state_dict(model))
    if unexpected or wanted - set(ckpt["model"]):
        raise UserError(f"{where}: adapters do not fit the base model (unexpected {sorted(unexpected)[:4]}, "
                        f"missing {sorted(wanted - set(ckpt['model']))[:4]})")
    if model.config.tie_embeddings:
        model.token_embeddings.weight = model.lm_head.weight
    return model.to(device).eval()
