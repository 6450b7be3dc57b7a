"""CS336-style function API (Stanford CS336, spring 2025, assignment 1 `tests/adapters.py` names).

Every function is a thin wrapper that loads the given weights into the real diyllm module and calls it:
there is no second implementation here. Argument names and order follow the assignment, so its test
suite (or yours) can drive diyllm directly.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import IO, BinaryIO

import numpy.typing as npt
import torch
from torch import Tensor

from diyllm.checkpoints import load_checkpoint, save_checkpoint
from diyllm.data.batch import get_batch
from diyllm.model.attention import CausalSelfAttention, scaled_dot_product_attention, softmax
from diyllm.model.config import DIYConfig
from diyllm.model.layers import Embedding, Linear, RMSNorm, SwiGLU, silu
from diyllm.model.loss import cross_entropy
from diyllm.model.rope import RotaryEmbedding
from diyllm.model.transformer import DIYForCausalLM, TransformerBlock
from diyllm.training.optim import AdamW, clip_grad_norm_
from diyllm.training.schedule import cosine_lr


def _attention_config(d_model: int, num_heads: int, max_seq_len: int = 1, theta: float = 10000.0, **kw) -> DIYConfig:
    return DIYConfig(vocab_size=1, context_length=max_seq_len, d_model=d_model, num_layers=1,
                     num_heads=num_heads, rope_theta=theta, attn_impl="diy", fused_projections=False, **kw)


def run_linear(d_in: int, d_out: int, weights: Tensor, in_features: Tensor) -> Tensor:
    layer = Linear(d_in, d_out)
    layer.load_state_dict({"weight": weights})
    return layer(in_features)


def run_embedding(vocab_size: int, d_model: int, weights: Tensor, token_ids: Tensor) -> Tensor:
    layer = Embedding(vocab_size, d_model)
    layer.load_state_dict({"weight": weights})
    return layer(token_ids)


def run_swiglu(d_model: int, d_ff: int, w1_weight: Tensor, w2_weight: Tensor, w3_weight: Tensor,
               in_features: Tensor) -> Tensor:
    ffn = SwiGLU(d_model, d_ff, fused=False)
    ffn.load_state_dict({"w1.weight": w1_weight, "w2.weight": w2_weight, "w3.weight": w3_weight})
    return ffn(in_features)


def run_scaled_dot_product_attention(Q: Tensor, K: Tensor, V: Tensor, mask: Tensor | None = None) -> Tensor:
    return scaled_dot_product_attention(Q, K, V, mask=mask)


def _run_attention(config: DIYConfig, rope: RotaryEmbedding | None, weights: dict[str, Tensor],
                   in_features: Tensor, token_positions: Tensor | None) -> Tensor:
    attn = CausalSelfAttention(config, rope)
    attn.load_state_dict(weights)
    lead, (T, d) = in_features.shape[:-2], in_features.shape[-2:]
    x = in_features.reshape(-1, T, d)  # the module wants one batch axis
    if token_positions is not None:
        token_positions = token_positions.reshape(-1, T)
        if token_positions.shape[0] == 1:
            token_positions = token_positions[0]
        elif token_positions.shape[0] != x.shape[0]:
            token_positions = token_positions.expand(*lead, T).reshape(-1, T)
    return attn(x, positions=token_positions).reshape(*lead, T, -1)


def _attention_weights(q: Tensor, k: Tensor, v: Tensor, o: Tensor) -> dict[str, Tensor]:
    return {"q_proj.weight": q, "k_proj.weight": k, "v_proj.weight": v, "output_proj.weight": o}


def run_multihead_self_attention(d_model: int, num_heads: int, q_proj_weight: Tensor, k_proj_weight: Tensor,
                                 v_proj_weight: Tensor, o_proj_weight: Tensor, in_features: Tensor) -> Tensor:
    config = _attention_config(d_model, num_heads, max_seq_len=in_features.shape[-2])
    weights = _attention_weights(q_proj_weight, k_proj_weight, v_proj_weight, o_proj_weight)
    return _run_attention(config, None, weights, in_features, None)


def run_multihead_self_attention_with_rope(
    d_model: int, num_heads: int, max_seq_len: int, theta: float, q_proj_weight: Tensor, k_proj_weight: Tensor,
    v_proj_weight: Tensor, o_proj_weight: Tensor, in_features: Tensor, token_positions: Tensor | None = None,
) -> Tensor:
    config = _attention_config(d_model, num_heads, max_seq_len, theta)
    rope = RotaryEmbedding(theta, config.head_dim, max_seq_len)
    weights = _attention_weights(q_proj_weight, k_proj_weight, v_proj_weight, o_proj_weight)
    return _run_attention(config, rope, weights, in_features, token_positions)


def run_rope(d_k: int, theta: float, max_seq_len: int, in_query_or_key: Tensor, token_positions: Tensor) -> Tensor:
    return RotaryEmbedding(theta, d_k, max_seq_len)(in_query_or_key, token_positions)


def run_transformer_block(d_model: int, num_heads: int, d_ff: int, max_seq_len: int, theta: float,
                          weights: dict[str, Tensor], in_features: Tensor) -> Tensor:
    config = _attention_config(d_model, num_heads, max_seq_len, theta, d_ff=d_ff)
    block = TransformerBlock(config, RotaryEmbedding(theta, config.head_dim, max_seq_len))
    block.load_state_dict(weights)
    return block(in_features)


def run_transformer_lm(vocab_size: int, context_length: int, d_model: int, num_layers: int, num_heads: int,
                       d_ff: int, rope_theta: float, weights: dict[str, Tensor], in_indices: Tensor) -> Tensor:
    config = DIYConfig(vocab_size=vocab_size, context_length=context_length, d_model=d_model,
                       num_layers=num_layers, num_heads=num_heads, d_ff=d_ff, rope_theta=rope_theta)
    model = DIYForCausalLM(config)
    model.load_state_dict(weights)
    return model(in_indices).logits


def run_rmsnorm(d_model: int, eps: float, weights: Tensor, in_features: Tensor) -> Tensor:
    norm = RMSNorm(d_model, eps=eps)
    norm.load_state_dict({"weight": weights})
    return norm(in_features)


def run_silu(in_features: Tensor) -> Tensor:
    return silu(in_features)


def run_get_batch(dataset: npt.NDArray, batch_size: int, context_length: int, device: str) -> tuple[Tensor, Tensor]:
    return get_batch(dataset, batch_size, context_length, device)


def run_softmax(in_features: Tensor, dim: int) -> Tensor:
    return softmax(in_features, dim=dim)


def run_cross_entropy(inputs: Tensor, targets: Tensor) -> Tensor:
    return cross_entropy(inputs, targets)


def run_gradient_clipping(parameters: Iterable[torch.nn.Parameter], max_l2_norm: float) -> None:
    clip_grad_norm_(list(parameters), max_l2_norm)


def get_adamw_cls() -> type[torch.optim.Optimizer]:
    return AdamW


def run_get_lr_cosine_schedule(it: int, max_learning_rate: float, min_learning_rate: float, warmup_iters: int,
                               cosine_cycle_iters: int) -> float:
    return cosine_lr(it, max_learning_rate, min_learning_rate, warmup_iters, cosine_cycle_iters)


def run_save_checkpoint(model: torch.nn.Module, optimizer: torch.optim.Optimizer, iteration: int,
                        out: str | os.PathLike | BinaryIO | IO[bytes]) -> None:
    save_checkpoint(model, optimizer, iteration, out)


def run_load_checkpoint(src: str | os.PathLike | BinaryIO | IO[bytes], model: torch.nn.Module,
                        optimizer: torch.optim.Optimizer) -> int:
    return load_checkpoint(src, model, optimizer)


# ---- tokenizer adapters (the BPE tokenizer lives in diyllm/tokenizers/) ------------------------------


def get_tokenizer(vocab: dict[int, bytes], merges: list[tuple[bytes, bytes]],
                  special_tokens: list[str] | None = None):  # noqa: ANN201 - a BPETokenizer
    from diyllm.tokenizers import BPETokenizer

    return BPETokenizer(vocab, merges, special_tokens)


def run_train_bpe(input_path: str | os.PathLike, vocab_size: int, special_tokens: list[str],
                  **kwargs) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    from diyllm.tokenizers import train_bpe

    return train_bpe(input_path, vocab_size, special_tokens, **kwargs)
