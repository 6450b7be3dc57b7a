"""Reading a local Hugging Face Llama-format folder into diyllm: its config, weights and tokenizer, as a
model (`load_hf_model`) or as the checkpoint dict every loader understands (`hf_checkpoint_dict`, what
`init_from=hf:DIR` and `--ckpt hf:DIR` use). The write side (export, import to a .pt) is in hf.py; this
half imports nothing from it, so diyllm.loading can open hf: references while hf.py's export opens any
model reference through diyllm.loading.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from diyllm.errors import UserError
from diyllm.interop.hf_model import DTYPES, hf_to_diy_config, hf_to_diy_state_dict, read_hf_weights, read_json
from diyllm.interop.hf_tokenizer import from_hf_tokenizer_json
from diyllm.model import DIYConfig, DIYForCausalLM


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]



def read_hf_folder(
    folder: str | os.PathLike, dtype: torch.dtype | str = torch.float32, context_length: int | None = None
) -> tuple[DIYConfig, dict[str, torch.Tensor], Any, str | None, list[str]]:
    """Everything an import needs: (config, diyllm state_dict, tokenizer or None, its JSON text, notes).

    `notes` explain what was left out (no or an unsupported tokenizer, a BOS post-processor, ...).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; pass a local Hugging Face model folder (no downloads)")
    hf_config = read_json(folder / "config.json", " (a Hugging Face model folder needs its config.json)")
    if not isinstance(hf_config, dict):
        raise UserError(f"{folder / 'config.json'} must hold a JSON object")
    cfg = hf_to_diy_config(hf_config, os.fspath(folder / "config.json"), context_length)
    tensors = read_hf_weights(folder)
    state = hf_to_diy_state_dict(tensors, cfg, where=os.fspath(folder))
    target = _resolve_dtype(dtype)
    state = {k: v.to(target) for k, v in state.items()}
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["token_embeddings.weight"]

    tokenizer, text, notes = None, None, []
    tok_path = folder / "tokenizer.json"
    if not tok_path.is_file():
        notes.append(f"{folder} has no tokenizer.json; the model is imported without a tokenizer")
    else:
        data = read_json(tok_path)
        try:
            tokenizer, tok_notes = from_hf_tokenizer_json(data, os.fspath(tok_path))
            notes += tok_notes
            text = json.dumps(tokenizer.to_dict(), ensure_ascii=False)
        except UserError as exc:
            notes.append(f"tokenizer not imported: {exc}")
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        notes.append(f"tokenizer not imported: its {tokenizer.vocab_size} tokens exceed vocab_size={cfg.vocab_size}")
        tokenizer, text = None, None
    return cfg, state, tokenizer, text, notes


def load_hf_model(
    folder: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    context_length: int | None = None,
) -> tuple[DIYForCausalLM, Any]:
    """A local Llama-format folder as (DIYForCausalLM in eval mode, diyllm tokenizer or None).

    This is what `--init_from=hf:DIR` calls. Unsupported configs raise UserError naming the field;
    tokenizer problems only drop the tokenizer (with a warning), since the weights are still usable.
    """
    cfg, state, tokenizer, _, notes = read_hf_folder(folder, dtype, context_length)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    model = _build_model(cfg, state)
    return model.to(device).eval(), tokenizer


def _build_model(cfg: DIYConfig, state: dict[str, torch.Tensor]) -> DIYForCausalLM:
    from diyllm.model.rope import RotaryEmbedding

    with torch.device("meta"):  # skip the random init of weights that are overwritten right away
        model = DIYForCausalLM(cfg)
    model.load_state_dict(state, assign=True)
    if cfg.tie_embeddings:
        model.token_embeddings.weight = model.lm_head.weight
    # RoPE cos/sin are buffers computed at construction (not in the state_dict): compute them for real.
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            real = RotaryEmbedding(module.theta, module.d_k, module.max_seq_len)
            module.cos, module.sin = real.cos, real.sin
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"internal error: tensors {left[:3]} were not loaded")
    return model


def hf_checkpoint_dict(
    folder: str | os.PathLike, dtype: torch.dtype | str = torch.float32, context_length: int | None = None
) -> dict[str, Any]:
    """A local Llama-format folder as a diyllm checkpoint dict (what `read_checkpoint` returns for a .pt):
    "model", "model_config", "tokenizer" (JSON text or None), "iteration" 0, "imported_from", and
    "import_notes" (what was left out). Lets `init_from=hf:DIR` reuse the code path of `init_from=PATH`."""
    return _checkpoint_and_tokenizer(folder, dtype, context_length)[0]


def _checkpoint_and_tokenizer(folder, dtype, context_length) -> tuple[dict[str, Any], Any]:
    cfg, state, tokenizer, text, notes = read_hf_folder(folder, dtype, context_length)
    ckpt = {"model": state, "model_config": cfg.to_dict(), "tokenizer": text, "iteration": 0,
            "imported_from": os.fspath(Path(folder).resolve()), "import_notes": notes}
    return ckpt, tokenizer


