"""A checkpoint's loss over a prepared dataset's val split: what `final_val_tokens` reports at the end of
training, for any checkpoint afterwards (`diyllm eval --ckpt RUN --val_split DIR`).

Every token of the split (up to `max_tokens`) is scored once, in consecutive windows of the model's context
length, by the trainer's own scorer (training/components.FinalSplitEval), so the two numbers are the same
for the same weights. Bits per byte count the UTF-8 bytes of exactly the scored tokens.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from diyllm.errors import UserError


def score_val_split(model: nn.Module, data_dir: str | os.PathLike, tokenizer: Any = None,
                    max_tokens: int = 10**9, batch_size: int = 16) -> dict[str, Any]:
    """{"val_loss", "val_bpb", "val_tokens"} of `model` over the val split of `data_dir`.

    `tokenizer` (the checkpoint's, when it has one) must be the one the data was prepared with: a
    different one would make the ids mean other text, and the loss a number about nothing."""
    from diyllm.data.dataset import open_dataset, tokenizer_path
    from diyllm.training.components import FinalSplitEval
    from diyllm.training.data_source import load_tokenizer_file
    from diyllm.training.distributed import DistInfo
    from diyllm.training.objective import NextTokenLoss
    from diyllm.training.resume import tokenizer_differences

    dataset = open_dataset(data_dir, require_val=True)
    tok_file = tokenizer_path(data_dir)
    data_tokenizer = load_tokenizer_file(tok_file) if tok_file.exists() else None
    diffs = tokenizer_differences(tokenizer, data_tokenizer)
    if diffs:
        raise UserError(f"the checkpoint's tokenizer is not the one {data_dir} was prepared with:\n  - "
                        + "\n  - ".join(diffs))
    if dataset.vocab_size > model.config.vocab_size:
        raise UserError(f"{data_dir} holds token ids up to {dataset.vocab_size - 1}, but the model's vocab_size is "
                        f"{model.config.vocab_size}: the data was tokenized for another model")
    device = next(model.parameters()).device
    context = model.config.context_length
    val = dataset.split("val")
    scorer = FinalSplitEval(val, context, max_tokens, batch_size, NextTokenLoss(), device, torch.float32,
                            DistInfo(), data_tokenizer or tokenizer, dataset.meta)
    if scorer.num_tokens == 0:
        raise UserError(f"--max_tokens={max_tokens} is less than one window of the model's context_length={context}"
                        f" tokens (or the val split of {data_dir} is that short)")
    return scorer.evaluate(model)


__all__ = ["score_val_split"]
