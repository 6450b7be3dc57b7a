"""Export diyllm models to, and import them from, the Hugging Face Llama format (safetensors).

    export_checkpoint("runs/x/best.pt", "hf/x")         # -> config.json, model.safetensors, tokenizer.json ...
    model, tok = load_hf_model("hf/x")                  # a local LlamaForCausalLM folder -> DIYForCausalLM
    import_hf("hf/x", "imported.pt")                    # ... saved as a diyllm checkpoint (iteration 0)

The mapping itself (names, RoPE row permutation, config fields) is in hf_model.py, the tokenizer
conversion in hf_tokenizer.py; this module reads and writes the folders. Nothing here needs transformers or
tokenizers, and nothing touches the network: a folder path is all it takes. Weights are read with
safetensors (or torch.load(weights_only=True) for old pytorch_model.bin files), so loading never runs
pickled code.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diyllm.atomic import atomic_dir
from diyllm.errors import UserError
from diyllm.interop.hf_model import (
    diy_to_hf_config,
    diy_to_hf_state_dict,
)
from diyllm.interop.hf_read import (  # noqa: F401  (the import side; re-exported)
    _checkpoint_and_tokenizer,
    _resolve_dtype,
    hf_checkpoint_dict,
    load_hf_model,
    read_hf_folder,
)
from diyllm.interop.hf_tokenizer import (
    CHAT_TOKENS,
    has_chat_tokens,
    to_hf_tokenizer_config,
    to_hf_tokenizer_json,
)
from diyllm.model import DIYConfig


# ---------------------------------------------------------------------------------------------- export
def _chat_template() -> str | None:
    """diyllm's chat template (Jinja), owned by the SFT data code; None if that module is unavailable."""
    try:
        from diyllm.data.chat_template import CHAT_TEMPLATE_JINJA
    except ImportError:
        return None
    return CHAT_TEMPLATE_JINJA


def _special_id(tok: Any, token: str) -> int | None:
    return tok.special_token_id(token) if token in getattr(tok, "special_tokens", ()) else None


def export_hf(
    model: nn.Module,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `model` (a DIYForCausalLM) and its tokenizer as a transformers LlamaForCausalLM folder.

    Files: config.json, generation_config.json, model.safetensors, and with a tokenizer tokenizer.json +
    tokenizer_config.json (with the chat template when the tokenizer has <|im_start|>/<|im_end|>). The
    folder is built under a temporary name and renamed when complete. `dtype` (e.g. "bfloat16") casts the
    weights; default: as they are.
    """
    from safetensors.torch import save_file

    from diyllm.checkpoints import unwrap_model

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} is a file; --out must be a folder")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"{out_dir} exists and is not empty; pick a new folder or pass --overwrite to replace it")
    model = unwrap_model(model)
    cfg: DIYConfig = model.config
    torch_dtype = _resolve_dtype(dtype) if dtype is not None else next(model.parameters()).dtype
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {cfg.vocab_size} "
                        "embedding rows; they do not belong together")
    eot = _special_id(tokenizer, "<|endoftext|>") if tokenizer is not None else None
    im_end = _special_id(tokenizer, CHAT_TOKENS[1]) if tokenizer is not None else None
    chat = tokenizer is not None and has_chat_tokens(tokenizer)
    template = _chat_template() if chat else None
    if chat and template is None:
        warnings.warn("the tokenizer has chat tokens but diyllm.data.chat_template is unavailable; "
                      "tokenizer_config.json gets no chat_template", stacklevel=2)

    tensors = diy_to_hf_state_dict(model.state_dict(), cfg, torch_dtype)
    hf_config = diy_to_hf_config(cfg, torch_dtype, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)
    stop_ids = [i for i in (eot, im_end) if i is not None]
    generation_config = {
        "_from_model_config": False,
        "bos_token_id": eot,
        "eos_token_id": stop_ids if len(stop_ids) > 1 else (stop_ids[0] if stop_ids else None),
        "pad_token_id": eot,
    }
    with atomic_dir(out_dir) as tmp:
        _write_json(tmp / "config.json", hf_config)
        _write_json(tmp / "generation_config.json", generation_config)
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        if tokenizer is not None:
            _write_json(tmp / "tokenizer.json", to_hf_tokenizer_json(tokenizer))
            _write_json(tmp / "tokenizer_config.json", to_hf_tokenizer_config(tokenizer, cfg.context_length, template))
    return out_dir


def export_checkpoint(
    ckpt_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
) -> Path:
    """`export_hf` for anything diyllm.loading opens (a .pt, a run folder, a DCP folder, hf:DIR) with its
    embedded tokenizer; a LoRA adapter checkpoint is exported as base + adapters folded together."""
    from diyllm.loading import load_model
    from diyllm.model.lora import merge_lora

    model, tokenizer, _ = load_model(ckpt_path)
    merge_lora(model)  # a no-op for a plain model
    if tokenizer is None:
        warnings.warn(f"{ckpt_path} embeds no tokenizer; exporting the model without tokenizer files", stacklevel=2)
    return export_hf(model, out_dir, tokenizer, dtype=dtype, overwrite=overwrite)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def import_hf(
    folder: str | os.PathLike,
    out_path: str | os.PathLike,
    dtype: torch.dtype | str = torch.float32,
    context_length: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Convert a Llama-format folder into a diyllm checkpoint (model, model_config, tokenizer, iteration 0)
    that `diyllm sample --ckpt` and `--init_from=PATH` accept. Returns a summary dict (also the notes)."""
    from diyllm.atomic import atomic_write

    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        raise UserError(f"{out_path} exists; pick another --out or pass --overwrite to replace it")
    t0 = time.perf_counter()
    ckpt, tokenizer = _checkpoint_and_tokenizer(folder, dtype, context_length)
    with atomic_write(out_path) as f:
        torch.save(ckpt, f)
    cfg = DIYConfig.from_dict(ckpt["model_config"])
    num_params = sum(t.numel() for k, t in ckpt["model"].items() if not (cfg.tie_embeddings and k == "lm_head.weight"))
    return {
        "out": os.fspath(out_path),
        "num_params": num_params,
        "model_config": ckpt["model_config"],
        "tokenizer": None if tokenizer is None else repr(tokenizer),
        "notes": ckpt["import_notes"],
        "seconds": time.perf_counter() - t0,
    }
