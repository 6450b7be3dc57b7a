"""Export a checkpoint to GGUF, the single-file format of llama.cpp (and Ollama, LM Studio, ...).

The file holds the Llama architecture's metadata, the tokenizer and the weights, written with the `gguf`
package (the llama.cpp project's own writer; `pip install -e ".[gguf]"`).

Weight layout. llama.cpp's "llama" graph rotates interleaved feature pairs (x0, x1), (x2, x3), ... (its
"normal" RoPE), exactly as diyllm does. Its converter from Hugging Face therefore undoes the halves
permutation the HF export applies to q_proj/k_proj; going straight from diyllm, the two permutations cancel
and the rows are written as they are (the test checks `permute(interleaved_to_halves(w)) == w` with the
converter's permutation). Names follow llama.cpp: token_embd, blk.N.attn_q, ..., output_norm, output (left
out for tied embeddings: llama.cpp then reuses token_embd).

Tokenizer. A byte-level BPE tokenizer is GGUF's "gpt2" model: tokens written with GPT-2's byte-to-unicode
alphabet, merges as "a b" strings, special tokens typed as control tokens, <|endoftext|> as bos/eos
(<|im_end|> as eos for chat models, so llama.cpp ends a reply there), and the chat template string. A
character tokenizer is written the same way: each character is one token, and a character of several
UTF-8 bytes gets the merges that join its bytes.

dtypes: f32, f16, or q8_0 (blocks of 32 weights with one f16 scale; a matrix whose rows are not a multiple
of 32 falls back to f16). Norm weights always stay f32, as llama.cpp's converter keeps them.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diyllm.errors import UserError

GGUF_DTYPES = ("f32", "f16", "q8_0")
ARCH = "llama"
# diyllm name inside layer i -> llama.cpp name inside blk.i
LAYER_TENSORS = {
    "ln1.weight": "attn_norm.weight",
    "attn.q_proj.weight": "attn_q.weight",
    "attn.k_proj.weight": "attn_k.weight",
    "attn.v_proj.weight": "attn_v.weight",
    "attn.output_proj.weight": "attn_output.weight",
    "ln2.weight": "ffn_norm.weight",
    "ffn.w1.weight": "ffn_gate.weight",
    "ffn.w3.weight": "ffn_up.weight",
    "ffn.w2.weight": "ffn_down.weight",
}
GLOBAL_TENSORS = {"token_embeddings.weight": "token_embd.weight", "ln_final.weight": "output_norm.weight",
                  "lm_head.weight": "output.weight"}
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_UNUSED = 1, 3, 5


def _gguf():
    try:
        import gguf
    except ImportError:
        raise UserError('GGUF export needs the gguf package: pip install -e ".[gguf]" (or pip install gguf)') from None
    return gguf


def gguf_tensor_names(state: dict[str, torch.Tensor], tie_embeddings: bool) -> dict[str, str]:
    """diyllm state_dict key -> GGUF tensor name, for every tensor that goes into the file."""
    names = {}
    for key in state:
        if key in GLOBAL_TENSORS:
            if key == "lm_head.weight" and tie_embeddings:
                continue
            names[key] = GLOBAL_TENSORS[key]
        elif key.startswith("layers."):
            _, i, rest = key.split(".", 2)
            if rest not in LAYER_TENSORS:
                raise UserError(f"no GGUF name for {key}: this model has a part llama.cpp's llama graph lacks")
            names[key] = f"blk.{i}.{LAYER_TENSORS[rest]}"
        else:
            raise UserError(f"no GGUF name for {key}")
    return names


def tokenizer_vocab(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """tokens, token types, merges, pre-tokenizer name and special ids of `tokenizer` in GGUF's terms.

    The list is padded to the model's `vocab_size` (embedding rows) with unused [PADi] tokens."""
    from diyllm.tokenizers.gpt2_bytes import encode_token
    from diyllm.tokenizers.pretokenize import GPT2_PATTERN

    kind = getattr(tokenizer, "kind", None)
    if tokenizer.vocab_size > vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {vocab_size} rows")
    tokens, types, merges = [], [], []
    if kind == "bpe":
        if tokenizer.pattern != GPT2_PATTERN:
            raise UserError("GGUF export supports BPE tokenizers with GPT-2's pre-tokenizer pattern; this one has "
                            f"{tokenizer.pattern!r}, which llama.cpp would split differently")
        specials = set(tokenizer.special_tokens)
        for i in range(tokenizer.vocab_size):
            raw = tokenizer.token_bytes(i)
            text = raw.decode("utf-8") if raw.decode("utf-8", "replace") in specials else None
            tokens.append(text if text is not None else encode_token(raw))
            types.append(TOKEN_CONTROL if text is not None else TOKEN_NORMAL)
        merges = [f"{encode_token(a)} {encode_token(b)}" for a, b in tokenizer.merges]
        pre = "gpt-2"
    elif kind == "char":
        seen_merges: set[str] = set()
        for i in range(tokenizer.vocab_size):
            raw = tokenizer.token_bytes(i)
            tokens.append(encode_token(raw))
            types.append(TOKEN_NORMAL)
            for k in range(1, len(raw)):  # join a multi-byte character: (b0, b1), (b0b1, b2), ...
                merge = f"{encode_token(raw[:k])} {encode_token(raw[k:k + 1])}"
                if merge not in seen_merges:
                    seen_merges.add(merge)
                    merges.append(merge)
        pre = "gpt-2"
    else:
        raise UserError(f"GGUF export supports the bpe and char tokenizers, not {kind!r}")
    if len(set(tokens)) != len(tokens):
        raise UserError("the tokenizer has two ids for the same text, which GGUF's token list cannot hold")
    for i in range(tokenizer.vocab_size, vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(TOKEN_UNUSED)

    def special(text: str) -> int | None:
        try:
            return tokenizer.special_token_id(text)
        except (AttributeError, KeyError):
            return None

    eot, im_end = special("<|endoftext|>"), special("<|im_end|>")
    return {"tokens": tokens, "types": types, "merges": merges, "pre": pre, "bos": eot,
            "eos": im_end if im_end is not None else eot, "eot": eot, "im_end": im_end}


def _tensor_data(gguf, name: str, t: torch.Tensor, dtype: str) -> tuple[np.ndarray, Any]:
    """(array, raw quantization type or None) for one tensor in the requested dtype."""
    array = t.detach().to(torch.float32).cpu().numpy()
    if array.ndim == 1 or dtype == "f32":
        return array, None
    if dtype == "q8_0" and array.shape[-1] % 32 == 0:
        q = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(array, q), q
    return array.astype(np.float16), None


def export_gguf(ckpt: str | os.PathLike, out: str | os.PathLike, dtype: str = "f32", overwrite: bool = False,
                name: str | None = None) -> Path:
    """Write `ckpt` (anything `load_model` reads) as one GGUF file at `out` (atomically)."""
    from diyllm.loading import load_model
    from diyllm.model.lora import merge_lora

    gguf = _gguf()
    if dtype not in GGUF_DTYPES:
        raise UserError(f"--dtype {dtype!r} is not a GGUF dtype; use one of {', '.join(GGUF_DTYPES)}")
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give the .gguf file to write")
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it")
    model, tokenizer, _ = load_model(ckpt)
    merge_lora(model)  # a LoRA checkpoint loads as base + adapters; a no-op for a plain model
    if tokenizer is None:
        raise UserError(f"{ckpt} holds no tokenizer; GGUF files carry one, so there is nothing to export it with")
    cfg = model.config
    vocab = tokenizer_vocab(tokenizer, cfg.vocab_size)
    state = model.state_dict()
    names = gguf_tensor_names(state, cfg.tie_embeddings)

    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, ARCH)
        writer.add_name(name or Path(os.fspath(ckpt)).stem)
        writer.add_context_length(cfg.context_length)
        writer.add_embedding_length(cfg.d_model)
        writer.add_block_count(cfg.num_layers)
        writer.add_feed_forward_length(cfg.d_ff)
        writer.add_head_count(cfg.num_heads)
        writer.add_head_count_kv(cfg.num_kv_heads)
        writer.add_rope_freq_base(float(cfg.rope_theta))
        writer.add_rope_dimension_count(cfg.head_dim)
        writer.add_layer_norm_rms_eps(float(cfg.norm_eps))
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_file_type(file_type)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(vocab["pre"])
        writer.add_token_list(vocab["tokens"])
        writer.add_token_types(vocab["types"])
        if vocab["merges"]:
            writer.add_token_merges(vocab["merges"])
        if vocab["bos"] is not None:
            writer.add_bos_token_id(vocab["bos"])
        if vocab["eos"] is not None:
            writer.add_eos_token_id(vocab["eos"])
        if vocab["im_end"] is not None:
            writer.add_eot_token_id(vocab["im_end"])
        writer.add_add_bos_token(False)  # diyllm never prepends a token to a prompt
        writer.add_add_eos_token(False)
        if vocab["im_end"] is not None:
            from diyllm.data.chat_template import CHAT_TEMPLATE_JINJA

            writer.add_chat_template(CHAT_TEMPLATE_JINJA)
        for key, gguf_name in names.items():
            data, raw = _tensor_data(gguf, gguf_name, state[key], dtype)
            writer.add_tensor(gguf_name, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return out


def ollama_modelfile(gguf_name: str, context_length: int, chat: bool) -> str:
    """A Modelfile for `ollama create NAME -f Modelfile` next to the GGUF file.

    The TEMPLATE is Ollama's Go-template spelling of the ChatML layout diyllm trains on; the stop
    parameter ends replies at <|im_end|>."""
    lines = [f"FROM ./{gguf_name}", f"PARAMETER num_ctx {context_length}", "PARAMETER temperature 0.7"]
    if chat:
        lines += [
            'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
            '<|im_start|>assistant\n"""',
            'PARAMETER stop "<|im_end|>"',
        ]
    lines.append('PARAMETER stop "<|endoftext|>"')
    return "\n".join(lines) + "\n"
