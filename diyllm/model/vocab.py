"""Growing a model's vocabulary: new embedding / lm_head rows for tokens added to its tokenizer (the
chat markers SFT adds). A model operation, used by SFT, LoRA loading and the lab experiments."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def resize_vocabulary(model: nn.Module, new_size: int) -> list[int]:
    """Grow the embedding and lm_head to `new_size` rows; new rows = mean of the old ones. Returns new ids.

    The mean embedding is a vector the network has effectively seen (it is the centre of all inputs), and
    a mean lm_head row gives each new token the average logit, so adding tokens does not disturb what the
    model already predicts for the old ones.
    """
    old = model.config.vocab_size
    if new_size < old:
        raise ValueError(f"cannot shrink the vocabulary from {old} to {new_size}")
    if new_size == old:
        return []
    extra = new_size - old
    head = model.lm_head.weight
    new_head = torch.cat([head, head.mean(0, keepdim=True).expand(extra, -1)])
    model.lm_head.weight = nn.Parameter(new_head)
    model.lm_head.out_features = new_size
    if model.config.tie_embeddings:
        model.token_embeddings.weight = model.lm_head.weight
    else:
        emb = model.token_embeddings.weight
        model.token_embeddings.weight = nn.Parameter(torch.cat([emb, emb.mean(0, keepdim=True).expand(extra, -1)]))
    model.token_embeddings.num_embeddings = new_size
    model.config.vocab_size = new_size
    return list(range(old, new_size))

