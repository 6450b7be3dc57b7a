"""DIYForCausalLM: a Llama-style decoder-only transformer (pre-norm, RMSNorm, RoPE, SwiGLU, no biases).

    ids -> token_embeddings -> [x + attn(ln1(x)); x + ffn(ln2(x))] x num_layers -> ln_final -> lm_head

One `forward` serves training (targets -> loss) and inference (optional KV cache); there is no second
copy of the network for generation.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from diyllm.model.attention import CausalSelfAttention, RotaryAngles, rotary_for
from diyllm.model.config import DIYConfig
from diyllm.model.kv_cache import KVCache
from diyllm.model.layers import Embedding, Linear, RMSNorm, SwiGLU
from diyllm.model.loss import cross_entropy
from diyllm.model.rope import RotaryEmbedding


class CausalLMOutput(NamedTuple):
    logits: torch.Tensor
    loss: torch.Tensor | None = None


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout, skipped entirely when it would do nothing (p = 0 or eval): in decoding, where a step is
    a few hundred tiny ops, even a no-op call costs time."""
    return F.dropout(x, p) if training and p else x


class TransformerBlock(nn.Module):
    """Pre-norm residual block: normalising the branch input (not the sum) keeps the residual
    stream an identity path, which is what makes deep stacks trainable without warm-up tricks."""

    def __init__(self, config: DIYConfig, rope: RotaryEmbedding | None = None):
        super().__init__()
        self.ln1 = RMSNorm(config.d_model, eps=config.norm_eps)
        self.attn = CausalSelfAttention(config, rope)
        self.ln2 = RMSNorm(config.d_model, eps=config.norm_eps)
        self.ffn = SwiGLU(config.d_model, config.d_ff, fused=config.fused_projections)
        self.dropout = config.dropout

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        layer_idx: int = 0,
        rotary: RotaryAngles | None = None,
    ) -> torch.Tensor:
        h = self.attn(self.ln1(x), positions, attn_mask, kv_cache, layer_idx, rotary)
        x = x + dropout(h, self.dropout, self.training)
        return x + dropout(self.ffn(self.ln2(x)), self.dropout, self.training)


class DIYForCausalLM(nn.Module):
    def __init__(self, config: DIYConfig):
        super().__init__()
        self.config = config
        self.token_embeddings = Embedding(config.vocab_size, config.d_model)
        # One RoPE table shared by every layer (its buffers are not saved in the state_dict).
        self.rope = RotaryEmbedding(config.rope_theta, config.head_dim, config.context_length)
        self.layers = nn.ModuleList(TransformerBlock(config, self.rope) for _ in range(config.num_layers))
        self.ln_final = RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = Linear(config.d_model, config.vocab_size)
        if config.init_std is not None:
            self._init_gpt2_style(config.init_std)
        if config.tie_embeddings:
            # One matrix both reads tokens in and scores them out. An N(0, 1) embedding would give
            # logits of std √d_model, so the shared matrix takes the output layer's small init.
            self.token_embeddings.weight = self.lm_head.weight

    def _init_gpt2_style(self, std: float) -> None:
        """N(0, std) everywhere; residual-branch outputs get std/√(2·layers) so the residual stream's
        variance does not grow with depth."""
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue
            residual_out = name.endswith(("output_proj.weight", "w2.weight"))
            scale = std / math.sqrt(2 * self.config.num_layers) if residual_out else std
            nn.init.trunc_normal_(p, 0.0, scale, -3 * scale, 3 * scale)

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        last_logits_only: bool = False,
    ) -> CausalLMOutput:
        """input_ids (B, T). targets (B, T) are the next tokens (ignore_index -100 where none);
        loss_mask (B, T) zeros tokens that must not be trained on. positions (T,) or (B, T) default to
        0..T-1 after the cached tokens; attn_mask (bool, True = may attend) replaces the causal mask,
        e.g. for left-padded batches. `last_logits_only` skips the vocabulary projection for all but the
        last position (generation needs nothing else)."""
        self._check_input(input_ids, kv_cache)
        x = self.token_embeddings(input_ids)
        x = dropout(x, self.config.dropout, self.training)
        # RoPE's cos/sin depend only on the positions: look them up once for all layers.
        rotary = rotary_for(self.rope, positions, input_ids.shape[1], kv_cache.length if kv_cache is not None else 0)
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, attn_mask, kv_cache, i, rotary)
        if kv_cache is not None:
            kv_cache.advance(input_ids.shape[1])
        x = self.ln_final(x)
        if last_logits_only:
            x = x[:, -1:]
        logits = self.lm_head(x)
        loss = None if targets is None else cross_entropy(logits, targets, loss_mask=loss_mask)
        return CausalLMOutput(logits, loss)

    def _check_input(self, input_ids: torch.Tensor, kv_cache: KVCache | None) -> None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        total = input_ids.shape[1] + (kv_cache.length if kv_cache is not None else 0)
        if total > self.config.context_length:
            raise ValueError(
                f"sequence of {total} tokens exceeds context_length={self.config.context_length}; "
                "crop the input (e.g. ids[:, -context_length:]) or train a model with a longer context"
            )
        # Checking ids costs a host/device sync; skip it in the hot CUDA training path and under
        # torch.compile (an out-of-range id still fails there, as a device-side assert).
        if torch.compiler.is_compiling() or (input_ids.is_cuda and self.training):
            return
        lo, hi = torch.aminmax(input_ids) if input_ids.numel() else (0, 0)
        if int(lo) < 0 or int(hi) >= self.config.vocab_size:
            bad = input_ids[(input_ids < 0) | (input_ids >= self.config.vocab_size)][0].item()
            raise ValueError(
                f"token id {bad} is out of range for vocab_size={self.config.vocab_size}; "
                "was the data prepared with a different tokenizer than this model's?"
            )

    # ---- sizes -------------------------------------------------------------------------------------
    def num_parameters(self, include_embeddings: bool = True) -> int:
        """Unique parameters (a tied matrix counts once). Without embeddings: the input lookup table is
        excluded (it does no FLOPs); an untied lm_head is kept, since it is a real matmul."""
        n = sum(p.numel() for p in self.parameters())
        if not include_embeddings:
            n -= self.token_embeddings.weight.numel()
            if self.config.tie_embeddings:
                n += self.lm_head.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6 per matmul weight (2 forward + 4 backward) plus attention's
        QKᵀ and AV, 12·layers·d_model·T (the estimate of the PaLM paper, appendix B)."""
        T = seq_len or self.config.context_length
        c = self.config
        return 6 * self.num_parameters(include_embeddings=False) + 12 * c.num_layers * c.d_model * T
