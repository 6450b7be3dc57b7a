"""Adapter-only checkpoints: a LoRA run saves its adapters plus a reference to the base weights.

A LoRA checkpoint is an ordinary diyllm checkpoint whose "model" entry holds only the adapter tensors
("….lora_A", "….lora_B", plus any fully trained matrix such as lm_head when new tokens were added)
and whose "lora" entry says how to rebuild the model:

    {"rank": 8, "alpha": 16.0, "dropout": 0.0, "targets": "q,k,v,o,w1,w2,w3",
     "base": "/abs/path/to/sft/best.pt", "base_sha256": "…"}

base_sha256 hashes the base model's tensors (diyllm.model.lora.state_dict_sha256), so adapters are
never silently applied to weights they were not trained on. `load_lora_model` rebuilds base + adapters
(unmerged); `diyllm lora merge` folds them into a plain checkpoint every command reads.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from diyllm.errors import UserError
from diyllm.model.lora import (
    apply_lora,
    lora_config,
    lora_state_dict,
    merge_lora,
    state_dict_sha256,
    trained_full_targets,
)


def base_reference(spec: str, model: nn.Module) -> dict[str, str]:
    """{"base": where the base weights come from, "base_sha256": their hash} for `model` loaded from `spec`
    (before any adapter is added)."""
    path = spec if spec.startswith("hf:") else os.path.abspath(spec)
    return {"base": path, "base_sha256": state_dict_sha256(model.state_dict())}


def adapter_entries(model: nn.Module, base_ref: dict[str, str]) -> dict[str, Any]:
    """The "model" and "lora" entries of a LoRA checkpoint of `model`."""
    return {"model": lora_state_dict(model), "lora": {**lora_config(model, trained_full_targets(model)), **base_ref}}


def load_base(lora: dict[str, Any], where: str, device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """The base model an adapter checkpoint refers to, checked against its hash (merged if it is itself
    a LoRA checkpoint)."""
    from diyllm.training.checkpoint import load_model

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
    from diyllm.training.sft_cli import resize_vocabulary

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
