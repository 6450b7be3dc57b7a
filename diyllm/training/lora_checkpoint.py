"""Adapter-only checkpoints: a LoRA run saves its adapters plus a reference to the base weights.

A LoRA checkpoint is an ordinary diyllm checkpoint whose "model" entry holds only the adapter tensors
("….lora_A", "….lora_B", plus any fully trained matrix such as lm_head when new tokens were added)
and whose "lora" entry says how to rebuild the model:

    {"rank": 8, "alpha": 16.0, "dropout": 0.0, "targets": "q,k,v,o,w1,w2,w3",
     "base": "/abs/path/to/sft/best.pt", "base_sha256": "…"}

base_sha256 hashes the base model's tensors (diyllm.model.lora.state_dict_sha256), so adapters are
never silently applied to weights they were not trained on. `diyllm.loading.load_model` rebuilds
base + adapters (unmerged); `diyllm lora merge` folds them into a plain checkpoint every command reads.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from diyllm.model.lora import lora_config, lora_state_dict, state_dict_sha256, trained_full_targets


def base_reference(spec: str, model: nn.Module) -> dict[str, str]:
    """{"base": where the base weights come from, "base_sha256": their hash} for `model` loaded from `spec`
    (before any adapter is added)."""
    path = spec if spec.startswith("hf:") else os.path.abspath(spec)
    return {"base": path, "base_sha256": state_dict_sha256(model.state_dict())}


def adapter_entries(model: nn.Module, base_ref: dict[str, str]) -> dict[str, Any]:
    """The "model" and "lora" entries of a LoRA checkpoint of `model`."""
    return {"model": lora_state_dict(model), "lora": {**lora_config(model, trained_full_targets(model)), **base_ref}}
