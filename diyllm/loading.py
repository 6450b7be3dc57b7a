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
    or "hf:DIR", a local Hugging Face Llama folder read as if it were a diyllm checkpoint (iteration 0)."""
    spec = os.fspath(spec)
    if spec.startswith(HF_PREFIX):
        from diyllm.interop.hf import hf_checkpoint_dict

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
    model = model_from_checkpoint(ckpt, os.fspath(path), device)
    return model, tokenizer_from_text(ckpt.get("tokenizer"), os.fspath(path)), ckpt


read_init_checkpoint = read_model_reference  # the name diyllm.training.checkpoint has always exported
