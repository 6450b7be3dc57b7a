"""Weights and config: diyllm's DIYForCausalLM <-> Hugging Face's LlamaForCausalLM.

The two networks are the same function (pre-norm RMSNorm, RoPE, SwiGLU, no biases, optional GQA and tied
embeddings); only the parameter names and one layout detail differ:

- names: `layers.3.attn.q_proj.weight` is `model.layers.3.self_attn.q_proj.weight`, w1/w3/w2 of the
  SwiGLU are gate_proj/up_proj/down_proj, and so on (`_LAYER_KEYS`, `_GLOBAL_KEYS`);
- RoPE: diyllm rotates interleaved feature pairs (x0, x1), (x2, x3), ...; transformers rotates halves
  (x_k, x_{k+d/2}). Pair k turns at the same frequency in both, so reordering the rows of q_proj and
  k_proj inside each head (even features first, then odd ones) makes the halves layout compute exactly
  what the interleaved one did. Attention only sees q·k, which a common permutation leaves unchanged.

Everything here works on plain dicts of tensors so it can be tested without transformers installed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from diyllm.errors import UserError
from diyllm.model import DIYConfig

HF_ARCHITECTURE = "LlamaForCausalLM"

# diyllm name inside layer i -> transformers name inside model.layers.i
_LAYER_KEYS = {
    "ln1.weight": "input_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.output_proj.weight": "self_attn.o_proj.weight",
    "ln2.weight": "post_attention_layernorm.weight",
    "ffn.w1.weight": "mlp.gate_proj.weight",
    "ffn.w3.weight": "mlp.up_proj.weight",
    "ffn.w2.weight": "mlp.down_proj.weight",
}
_GLOBAL_KEYS = {
    "token_embeddings.weight": "model.embed_tokens.weight",
    "ln_final.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
# Buffers that some older transformers versions saved; they are recomputed from the config.
_IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------- RoPE
def _halves_order(num_heads: int, head_dim: int) -> torch.Tensor:
    """Row index list: for each head, its even rows (first pair members) then its odd rows."""
    within = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    return (torch.arange(num_heads)[:, None] * head_dim + within).flatten()


def interleaved_to_halves(weight: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """Reorder q/k projection rows of every head from diyllm's pair layout to transformers' halves layout.

    Inside a head, diyllm row 2p+j (pair p, member j) becomes row j·head_dim/2 + p: the first members of
    all pairs come first, then the second members.
    """
    return weight[_halves_order(num_heads, head_dim).to(weight.device)]


def halves_to_interleaved(weight: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """Inverse of `interleaved_to_halves` (used on import)."""
    order = _halves_order(num_heads, head_dim).to(weight.device)
    return weight[torch.argsort(order)]


# ---------------------------------------------------------------------------------------------- config
def diy_to_hf_config(
    cfg: DIYConfig,
    dtype: torch.dtype = torch.float32,
    bos_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
) -> dict[str, Any]:
    """The config.json of the equivalent LlamaForCausalLM.

    RoPE is written both the transformers-4 way (rope_theta, rope_scaling) and the transformers-5 way
    (rope_parameters), and the dtype both as torch_dtype and dtype, so either major version reads it.
    """
    # issue 19's speedrun options have no Llama equivalent: refuse rather than export a different model.
    not_llama = [f"{k}={v!r}" for k, v in (("qk_norm", cfg.qk_norm), ("mlp", cfg.mlp),
                 ("logit_softcap", cfg.logit_softcap)) if v not in (False, "swiglu", 0.0)]
    if not_llama:
        raise UserError(f"this model uses {', '.join(not_llama)}, which a Hugging Face Llama cannot express; "
                        "export needs the plain Llama block (qk_norm=false, mlp=\"swiglu\", logit_softcap=0)")
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": [HF_ARCHITECTURE],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.context_length,
        "rope_theta": float(cfg.rope_theta),
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        "rms_norm_eps": cfg.norm_eps,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": bool(cfg.tie_embeddings),
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
        "use_cache": True,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
    }


def _rope_theta(hf: dict[str, Any], where: str) -> float:
    """rope_theta from either config style; refuse any RoPE variant other than the plain one."""
    theta = hf.get("rope_theta")
    for field in ("rope_scaling", "rope_parameters"):
        rope = hf.get(field)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            raise UserError(f"{where}: field {field!r} must be an object or null, got {rope!r}")
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise UserError(
                f"{where}: {field}.rope_type={kind!r} is not supported; diyllm implements only plain RoPE "
                "(rope_type 'default', no rope scaling such as Llama 3's 'llama3', 'linear', 'dynamic' or 'yarn')"
            )
        if field == "rope_scaling" and set(rope) - {"rope_type", "type", "rope_theta"}:
            raise UserError(f"{where}: rope_scaling={rope!r} is not supported (diyllm has no RoPE scaling)")
        if "rope_theta" in rope:
            theta = rope["rope_theta"]
    return float(theta if theta is not None else 10000.0)


def hf_to_diy_config(hf: dict[str, Any], where: str = "config.json", context_length: int | None = None) -> DIYConfig:
    """DIYConfig for a Llama config.json dict, refusing (with the field named) anything diyllm cannot run.

    `context_length` overrides max_position_embeddings (models announce 128k contexts that a CPU run
    never needs; the RoPE table is sized from it).
    """
    model_type = hf.get("model_type")
    if model_type != "llama":
        raise UserError(f"{where}: model_type={model_type!r} is not supported; only 'llama' models can be imported")
    archs = hf.get("architectures")
    if archs is not None and list(archs) != [HF_ARCHITECTURE]:
        raise UserError(f"{where}: architectures={archs!r} is not supported; expected [{HF_ARCHITECTURE!r}]")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise UserError(f"{where}: hidden_act={act!r} is not supported; diyllm's SwiGLU uses 'silu'")
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field, False):
            raise UserError(f"{where}: {field}=true is not supported; diyllm's linear layers have no biases")
    missing = [f for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if hf.get(f) is None]
    if missing:
        raise UserError(f"{where}: missing required field(s) {', '.join(missing)}")
    hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    if hidden % heads:
        raise UserError(f"{where}: hidden_size={hidden} is not divisible by num_attention_heads={heads}")
    head_dim = hf.get("head_dim")
    if head_dim is not None and int(head_dim) != hidden // heads:
        raise UserError(
            f"{where}: head_dim={head_dim} differs from hidden_size/num_attention_heads={hidden // heads}; "
            "diyllm derives the head size from d_model/num_heads"
        )
    theta = _rope_theta(hf, where)
    kv_heads = hf.get("num_key_value_heads")
    try:
        return DIYConfig(
            vocab_size=int(hf["vocab_size"]),
            context_length=int(context_length or hf.get("max_position_embeddings") or 2048),
            d_model=hidden,
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(kv_heads) if kv_heads is not None else heads,
            d_ff=int(hf["intermediate_size"]),
            rope_theta=theta,
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )
    except ValueError as exc:
        raise UserError(f"{where}: {exc}") from None


# ---------------------------------------------------------------------------------------------- weights
def _expected_diy_keys(cfg: DIYConfig) -> list[str]:
    keys = [f"layers.{i}.{k}" for i in range(cfg.num_layers) for k in _LAYER_KEYS]
    return ["token_embeddings.weight", *keys, "ln_final.weight", "lm_head.weight"]


def _to_hf_name(diy_key: str) -> str:
    if diy_key in _GLOBAL_KEYS:
        return _GLOBAL_KEYS[diy_key]
    _, idx, rest = diy_key.split(".", 2)
    return f"model.layers.{idx}.{_LAYER_KEYS[rest]}"


def diy_to_hf_state_dict(
    state: dict[str, torch.Tensor], cfg: DIYConfig, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """transformers-named, RoPE-permuted, contiguous tensors ready for safetensors.

    With tied embeddings the shared matrix is stored once, as model.embed_tokens.weight (what
    transformers' own save_pretrained writes; it re-ties lm_head on load).
    """
    expected = _expected_diy_keys(cfg)
    missing = [k for k in expected if k not in state]
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(
            "the model state does not match its model_config: "
            + (f"missing {missing[:5]} " if missing else "")
            + (f"unexpected {unexpected[:5]}" if unexpected else "")
        )
    out: dict[str, torch.Tensor] = {}
    for key in expected:
        if key == "lm_head.weight" and cfg.tie_embeddings:
            continue
        t = state[key].detach().to("cpu")
        if key.endswith("attn.q_proj.weight"):
            t = interleaved_to_halves(t, cfg.num_heads, cfg.head_dim)
        elif key.endswith("attn.k_proj.weight"):
            t = interleaved_to_halves(t, cfg.num_kv_heads, cfg.head_dim)
        if dtype is not None:
            t = t.to(dtype)
        # Every tensor is its own parameter (the tied one is skipped above), so no two share storage,
        # which safetensors would refuse; copy only a view that does not cover its whole storage.
        t = t.contiguous()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        out[_to_hf_name(key)] = t
    return out


def hf_to_diy_state_dict(tensors: dict[str, torch.Tensor], cfg: DIYConfig, where: str = "the weights") -> dict:
    """diyllm state_dict from transformers-named tensors (inverse of `diy_to_hf_state_dict`)."""
    shapes = _expected_shapes(cfg)
    state: dict[str, torch.Tensor] = {}
    used = set()
    for key in _expected_diy_keys(cfg):
        hf_key = _to_hf_name(key)
        if hf_key not in tensors and key == "lm_head.weight" and cfg.tie_embeddings:
            hf_key = "model.embed_tokens.weight"
        if hf_key not in tensors:
            hint = " (tie_word_embeddings is false, so it must be stored)" if key == "lm_head.weight" else ""
            raise UserError(f"{where}: tensor {hf_key!r} is missing{hint}")
        t = tensors[hf_key]
        used.add(hf_key)
        if tuple(t.shape) != shapes[key]:
            raise UserError(f"{where}: tensor {hf_key!r} has shape {tuple(t.shape)}, config.json implies {shapes[key]}")
        if key.endswith("attn.q_proj.weight"):
            t = halves_to_interleaved(t, cfg.num_heads, cfg.head_dim)
        elif key.endswith("attn.k_proj.weight"):
            t = halves_to_interleaved(t, cfg.num_kv_heads, cfg.head_dim)
        state[key] = t
    unexpected = sorted(k for k in set(tensors) - used if not k.endswith(_IGNORED_HF_SUFFIXES))
    if unexpected:
        raise UserError(f"{where}: unexpected tensors {unexpected[:5]} (is this really a {HF_ARCHITECTURE}?)")
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["token_embeddings.weight"]
    return state


def _expected_shapes(cfg: DIYConfig) -> dict[str, tuple[int, ...]]:
    d, hd, ff = cfg.d_model, cfg.head_dim, cfg.d_ff
    per_layer = {
        "ln1.weight": (d,), "ln2.weight": (d,),
        "attn.q_proj.weight": (cfg.num_heads * hd, d),
        "attn.k_proj.weight": (cfg.num_kv_heads * hd, d),
        "attn.v_proj.weight": (cfg.num_kv_heads * hd, d),
        "attn.output_proj.weight": (d, cfg.num_heads * hd),
        "ffn.w1.weight": (ff, d), "ffn.w3.weight": (ff, d), "ffn.w2.weight": (d, ff),
    }
    shapes = {f"layers.{i}.{k}": s for i in range(cfg.num_layers) for k, s in per_layer.items()}
    shapes.update({"token_embeddings.weight": (cfg.vocab_size, d), "ln_final.weight": (d,),
                   "lm_head.weight": (cfg.vocab_size, d)})
    return shapes


# ---------------------------------------------------------------------------------------------- files
def read_json(path: Path, what: str = "") -> Any:
    """A JSON file, with a UserError that names the file when it is missing or malformed."""
    if not path.is_file():
        raise UserError(f"{path} not found{what}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one .safetensors file (a UserError naming the file when it is truncated or not one)."""
    from safetensors import safe_open

    if not path.is_file():
        raise UserError(f"weights file {path} not found")
    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as exc:  # SafetensorError, OSError, ...: all mean a file we cannot use
        raise UserError(f"cannot read {path}: {exc} (truncated or not a safetensors file?)") from None


def _read_torch_bin(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"weights file {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # never runs pickled code
    except Exception as exc:
        raise UserError(f"cannot read {path}: {exc} (truncated, or pickled objects other than tensors?)") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} does not hold a dict of tensors")
    return state


def read_hf_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face model folder: one or sharded safetensors files (preferred), or
    pytorch_model.bin files read with weights_only=True."""
    folder = Path(folder)
    for index_name, reader in (("model.safetensors.index.json", read_safetensors),
                               ("pytorch_model.bin.index.json", _read_torch_bin)):
        index_path = folder / index_name
        if index_path.is_file():
            return _read_sharded(index_path, reader)
    if (folder / "model.safetensors").is_file():
        return read_safetensors(folder / "model.safetensors")
    if (folder / "pytorch_model.bin").is_file():
        return _read_torch_bin(folder / "pytorch_model.bin")
    raise UserError(
        f"no weights in {folder}: expected model.safetensors, model.safetensors.index.json (sharded) "
        "or pytorch_model.bin"
    )


def _read_sharded(index_path: Path, reader) -> dict[str, torch.Tensor]:
    index = read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise UserError(f"{index_path}: no 'weight_map' object mapping tensor names to shard files")
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise UserError(f"shard {shard_path} is listed in {index_path.name} but missing")
        tensors.update(reader(shard_path))
    absent = [k for k, shard in weight_map.items() if k not in tensors]
    if absent:
        raise UserError(f"{index_path.name} lists {absent[0]!r} in {weight_map[absent[0]]} but that shard lacks it")
    return tensors
