"""What every post-training command does before the loop starts: load the starting model, give its
tokenizer the chat tokens, optionally add LoRA adapters, and keep a frozen reference.

    model, tok, setup = prepare_policy(cfg, cfg.init_from)

The reference model (DPO's πref, RL's KL anchor) is the starting model, frozen. With LoRA adapters
(and no fully trained matrices) it costs nothing: the same network with its adapters switched off.
Otherwise it is a frozen copy.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from diyllm.errors import UserError
from diyllm.model.lora import adapters_disabled, apply_lora, trainable_fraction, trained_full_targets
from diyllm.model.vocab import resize_vocabulary  # noqa: F401  (re-exported)
from diyllm.training.checkpointer import SingleFileCheckpointer


class Reference:
    """Logits of the frozen starting model, without gradients, in eval mode (no dropout)."""

    def __init__(self, policy: nn.Module, frozen_copy: nn.Module | None):
        self.policy, self.copy = policy, frozen_copy
        if frozen_copy is not None:
            frozen_copy.eval().requires_grad_(False)

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.copy is not None:
            return self.copy(x).logits
        was_training = self.policy.training
        self.policy.eval()
        try:
            with adapters_disabled(self.policy):
                return self.policy(x).logits
        finally:
            self.policy.train(was_training)

    def to(self, device: torch.device | str) -> Reference:
        if self.copy is not None:
            self.copy.to(device)
        return self


@dataclass
class PolicySetup:
    """What prepare_policy decided: the LoRA base reference (None without LoRA), added token ids, counts."""

    base_ref: dict[str, str] | None
    added_tokens: list[int]
    trainable: int
    total: int

    def describe(self) -> str:
        frac = self.trainable / max(1, self.total)
        mode = "LoRA" if self.base_ref else "full fine-tuning"
        return f"{mode}: {self.trainable:,} of {self.total:,} parameters trainable ({frac:.2%})"


def load_start(spec: str) -> tuple[nn.Module, Any]:
    """The model and tokenizer a fine-tuning run starts from (any checkpoint load_model reads)."""
    from diyllm.training.checkpoint import load_model

    if spec in ("", "scratch"):
        raise UserError("post-training starts from a trained model: pass --init_from=PATH/TO/sft/best.pt")
    model, tok, _ = load_model(spec)
    if tok is None:
        raise UserError(f"{spec} holds no tokenizer; fine-tuning needs the tokenizer the model was trained with")
    return model, tok


def prepare_policy(cfg: Any, spec: str, need_reference: bool = False, chat: bool = True
                   ) -> tuple[nn.Module, Any, PolicySetup, Reference | None]:
    """(model ready to train, tokenizer, setup, reference or None) for a run starting from `spec`.

    chat: make sure the chat tokens exist (new embedding rows = the mean row, see resize_vocabulary).
    With cfg.lora_rank > 0 the base is frozen and adapters are added to cfg.lora_targets; when chat
    tokens had to be added, lm_head and the embedding train in full as well (new rows must learn).
    """
    from diyllm.data.chat_template import add_chat_tokens
    from diyllm.training.lora_checkpoint import base_reference

    model, tok = load_start(spec)
    from diyllm.model.lora import merge_lora

    merge_lora(model)  # starting from an adapter checkpoint: its merged weights are the new base
    base_ref = base_reference(spec, model) if cfg.lora_rank else None
    added = add_chat_tokens(tok) if chat else []
    resize_vocabulary(model, max(tok.vocab_size, model.config.vocab_size))
    targets = cfg.lora_targets
    if cfg.lora_rank and added and "lm_head" not in targets:
        targets = f"{targets},lm_head,embed"
        print(f"LoRA: new tokens {added} were added, so lm_head and the embedding train in full too")
    reference = None
    if cfg.lora_rank:
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha or None, cfg.lora_dropout, targets, seed=cfg.seed)
        if need_reference:
            full = trained_full_targets(model)
            reference = Reference(model, _base_copy(model) if full else None)
    elif need_reference:
        reference = Reference(model, copy.deepcopy(model))
    trainable, total = trainable_fraction(model)
    model.train()
    return model, tok, PolicySetup(base_ref, added, trainable, total), reference


def _base_copy(model: nn.Module) -> nn.Module:
    """A frozen adapter-free copy of a LoRA model (when fully trained matrices make disabling not enough)."""
    from diyllm.model.lora import merge_lora

    clone = copy.deepcopy(model)
    with adapters_disabled(clone):
        merge_lora(clone)  # disabled adapters merge as zero: the base weights
    return clone


# ---- plugging a prepared run into the training loop ----------------------------------------------------

SHAPE_KEYS = ("vocab_size", "context_length", "d_model", "num_layers", "num_heads", "num_kv_heads", "d_ff",
              "rope_theta", "norm_eps", "tie_embeddings", "init_std")


def start_spec(cfg: Any) -> str:
    """The checkpoint the run starts from; for init_from=resume, the one the resumed run started from."""
    if cfg.init_from != "resume":
        return cfg.init_from
    from pathlib import Path

    from diyllm.training.checkpoint import read_checkpoint

    path = Path(cfg.out_dir) / "latest.pt"
    if not path.exists():
        raise UserError(f"init_from=resume but {path} does not exist; nothing to resume")
    start = read_checkpoint(path).get("post_training", {}).get("start")
    if not start:
        raise UserError(f"{path} was not written by a post-training command (no 'post_training' entry); "
                        "resume it with the command that wrote it")
    return start


def trainer_cfg(cfg: Any, model: nn.Module) -> Any:
    """cfg with the model's shape (the weights exist already) and init_from = scratch (the loop gets the
    model itself) or resume."""
    import dataclasses

    keys = {k: getattr(model.config, k) for k in SHAPE_KEYS}
    return dataclasses.replace(cfg, **keys, init_from="resume" if cfg.init_from == "resume" else "scratch")


class PostTrainingCheckpointer(SingleFileCheckpointer):
    """Single-file checkpoints plus what post-training adds: where the run started (for resume) and,
    with LoRA, only the adapters and the base reference instead of the whole model."""

    def __init__(self, out_dir: str, method: str, start: str, setup: PolicySetup | None):
        super().__init__(out_dir, current_dist())
        self.method, self.start, self.setup = method, start, setup

    def save(self, name: str, model: nn.Module, optimizer: torch.optim.Optimizer, iteration: int,
             **entries: Any) -> None:
        from diyllm.training.checkpoint import unwrap_model
        from diyllm.training.lora_checkpoint import adapter_entries

        entries["post_training"] = {"method": self.method, "start": self.start}
        if self.setup is not None and self.setup.base_ref is not None:
            lora = adapter_entries(unwrap_model(model), self.setup.base_ref)
            entries["model_state"], entries["lora"] = lora["model"], lora["lora"]
        super().save(name, model, optimizer, iteration, **entries)

    def restore(self, ckpt: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        from diyllm.training.checkpoint import unwrap_model

        if "lora" not in ckpt:
            return super().restore(ckpt, model, optimizer)
        _, unexpected = unwrap_model(model).load_state_dict(ckpt["model"], strict=False)
        if unexpected:
            raise UserError(f"{self.path('latest.pt')}: adapters do not fit this model "
                            f"(unexpected {sorted(unexpected)[:4]})")
        if optimizer is not None:
            optimizer.load_state_dict(ckpt["optimizer"])


def current_dist():
    """DistInfo of this process (the loop joins the process group itself; under torchrun the env says)."""
    import os

    from diyllm.training.distributed import DistInfo

    return DistInfo(rank=int(os.environ.get("RANK", 0)), local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                    world_size=int(os.environ.get("WORLD_SIZE", 1)))


def run_post_command(args: Any, prepare: Any) -> int:
    """The body of `diyllm dpo / rl / distill`: the config from the command line, then prepare(cfg) -> train."""
    from diyllm.training.config import load_config
    from diyllm.training.distributed import finish_worker

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(cfg.to_json())
        return 0
    train_post(prepare(cfg))
    return finish_worker(0)


def train_post(prep: dict[str, Any]):
    """Run the shared training loop on a prepared post-training run (prepare_dpo / prepare_rl / ...)."""
    from diyllm.training.trainer import train

    method = getattr(prep["objective"], "name", "sft")
    checkpointer = PostTrainingCheckpointer(prep["cfg"].out_dir, method, prep.get("start", ""), prep.get("setup"))
    return train(prep["cfg"], source=prep["source"], model=prep["model"], objective=prep["objective"],
                 checkpointer=checkpointer)
