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
    DTYPES,
    diy_to_hf_config,
    diy_to_hf_state_dict,
    hf_to_diy_config,
    hf_to_diy_state_dict,
    read_hf_weights,
    read_json,
)
from diyllm.interop.hf_tokenizer import (
    CHAT_TOKENS,
    from_hf_tokenizer_json,
    has_chat_tokens,
    to_hf_tokenizer_config,
    to_hf_tokenizer_json,
)
from diyllm.model import DIYConfig, DIYForCausalLM


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
    """`export_hf` for a diyllm checkpoint file (or run folder: its best.pt) with its embedded tokenizer.

    Reads the file with diyllm.checkpoints, not diyllm.loading (whose hf: references come back here)."""
    from diyllm.checkpoints import model_from_checkpoint, read_checkpoint, resolve_checkpoint_path, tokenizer_from_text

    path = resolve_checkpoint_path(ckpt_path)
    ckpt = read_checkpoint(path)
    if "lora" in ckpt:
        raise UserError(f"{path} holds LoRA adapters only; fold them into a plain checkpoint first: "
                        f"diyllm lora merge --ckpt {ckpt_path} --out merged.pt, then export merged.pt")
    model, tokenizer = model_from_checkpoint(ckpt, path), tokenizer_from_text(ckpt.get("tokenizer"), path)
    if tokenizer is None:
        warnings.warn(f"{ckpt_path} embeds no tokenizer; exporting the model without tokenizer files", stacklevel=2)
    return export_hf(model, out_dir, tokenizer, dtype=dtype, overwrite=overwrite)


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


# ---------------------------------------------------------------------------------------------- import
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
