"""Supervised fine-tuning on conversations: the pretraining loop, an SFT data source, assistant-only loss.

  diyllm sft configs/sft_synthetic.toml --init_from=runs/pretrain/best.pt
  diyllm sft sft_synthetic --init_from=runs/pretrain/best.pt --max_iters=300 --learning_rate=1e-4
  diyllm sft sft_synthetic --init_from=resume                 # continue the SFT run in out_dir
  diyllm sft sft_minimind --init_from=runs/minimind_64m/best.pt  # MiniMind's sft_mini_512.jsonl from the Hub

data_dir holds the conversations ({"conversations": [{"role", "content"}, ...]}): a JSONL (.gz/.zst) or
Parquet file, a folder, a glob, or hf:OWNER/DATASET/GLOB (diyllm/data/sft.py; conversations_field names
another key/column); val_data the held-out conversations (else ~5% are held out). The tokenizer is the
checkpoint's: if it lacks the chat tokens <|im_start|>/<|im_end|> they are added and the model's
embedding and lm_head get new rows initialised to the mean of the existing rows (a neutral start: no
token is favoured). A tokenizer_path that does not match the checkpoint's tokenizer is an error.
Character tokenizers are refused (see diyllm/data/chat_template.py). See docs/sft.md.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from torch import nn

from diyllm.errors import UserError
from diyllm.model.config import SHAPE_FIELDS
from diyllm.model.vocab import resize_vocabulary  # noqa: F401  (re-exported: callers import it here)

ACCEPTS_OVERRIDES = True
SHAPE_KEYS = SHAPE_FIELDS + ("init_std",)  # what the SFT run takes from the checkpoint it starts from


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", default=None, help="a TOML file or the name of a shipped sft config")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")



def check_tokenizer_matches(checkpoint_tok: Any, given_tok: Any, given_path: str, ckpt_path: str) -> None:
    """The tokenizer used for SFT must be the pretraining one (chat tokens aside)."""
    from diyllm.data.chat_template import CHAT_SPECIAL_TOKENS

    def core(tok):
        specials = [s for s in getattr(tok, "special_tokens", []) if s not in CHAT_SPECIAL_TOKENS]
        base = tok.vocab_size - sum(1 for s in getattr(tok, "special_tokens", []) if s in CHAT_SPECIAL_TOKENS)
        return getattr(tok, "kind", None), base, specials

    if core(checkpoint_tok) != core(given_tok):
        raise UserError(
            f"tokenizer_path={given_path} does not match the tokenizer of {ckpt_path} "
            f"(kind/size/special tokens {core(given_tok)} vs {core(checkpoint_tok)}): fine-tuning must use the "
            "pretraining tokenizer; drop tokenizer_path to use the checkpoint's"
        )


def prepare_sft(cfg: Any) -> tuple[Any, Any, nn.Module | None]:
    """(cfg for the trainer, SFTSource, model or None) for an SFT run described by `cfg`."""
    from diyllm.checkpoints import read_checkpoint, tokenizer_from_text
    from diyllm.data.sft import SFTSource
    from diyllm.loading import load_model
    from diyllm.tokenizers import load_tokenizer

    cfg = dataclasses.replace(cfg, data_format="sft")
    if cfg.init_from == "scratch":
        raise UserError("sft fine-tunes a pretrained model: pass --init_from=PATH/TO/pretrain/best.pt "
                        "(or --init_from=resume to continue an SFT run)")
    if cfg.init_from == "resume":
        from pathlib import Path

        path = Path(cfg.out_dir) / "latest.pt"
        ckpt = read_checkpoint(path)
        tok = tokenizer_from_text(ckpt.get("tokenizer"), str(path))
        cfg = dataclasses.replace(cfg, **{k: ckpt["model_config"][k] for k in SHAPE_KEYS if k in ckpt["model_config"]})
        return cfg, SFTSource.from_config(cfg, tokenizer=tok), None

    path = cfg.init_from
    model, tok, _ = load_model(path)  # a .pt, a run folder, or hf:DIR
    from diyllm.model.lora import merge_lora

    merge_lora(model)  # an adapter checkpoint (base + LoRA) continues as one plain model
    if tok is None:
        raise UserError(f"{path} holds no tokenizer; SFT needs the pretraining tokenizer inside the checkpoint")
    if cfg.tokenizer_path:
        check_tokenizer_matches(tok, load_tokenizer(cfg.tokenizer_path), cfg.tokenizer_path, path)
    # The model's shape wins over the config's (the weights exist already); sequences must fit its context.
    cfg = dataclasses.replace(cfg, **{k: getattr(model.config, k) for k in SHAPE_KEYS if k != "vocab_size"})
    source = SFTSource.from_config(cfg, tokenizer=tok)
    added = resize_vocabulary(model, source.vocab_size)
    if added:
        print(f"added chat tokens {added} to the tokenizer; embedding/lm_head rows initialised to the mean row")
    # The trainer gets the (resized) model itself; init_from=scratch stops it from reloading the old weights.
    cfg = dataclasses.replace(cfg, init_from="scratch", vocab_size=model.config.vocab_size)
    print(f"fine-tuning {path}: {sum(source.trained_tokens.values())} trained tokens in "
          f"{len(source.rows['train'])} train / {len(source.rows['val'])} val conversations "
          f"(dropped, no assistant token within context: {source.dropped})")
    model.train()
    return cfg, source, model


def prepare_lora_sft(cfg: Any) -> dict[str, Any]:
    """An SFT run with LoRA adapters (cfg.lora_rank > 0): the frozen base is the init_from checkpoint
    (for init_from=resume: the one the run started from); checkpoints hold only the adapters."""
    from diyllm.model.lora import apply_lora, merge_lora, trainable_fraction
    from diyllm.training.checkpoint import load_model
    from diyllm.training.finetune import PolicySetup, start_spec
    from diyllm.training.lora_checkpoint import base_reference

    resume = cfg.init_from == "resume"
    spec = start_spec(cfg)
    base, _, _ = load_model(spec)
    base_ref = base_reference(spec, merge_lora(base))
    cfg, source, model = prepare_sft(dataclasses.replace(cfg, init_from=spec))
    targets = cfg.lora_targets
    if source.added_tokens and "lm_head" not in targets:
        targets = f"{targets},lm_head,embed"
        print(f"LoRA: new tokens {source.added_tokens} were added, so lm_head and the embedding train in full too")
    apply_lora(model, cfg.lora_rank, cfg.lora_alpha or None, cfg.lora_dropout, targets, seed=cfg.seed)
    setup = PolicySetup(base_ref, source.added_tokens, *trainable_fraction(model))
    print(setup.describe())
    if resume:
        cfg = dataclasses.replace(cfg, init_from="resume")
    return {"cfg": cfg, "source": source, "model": model, "objective": None, "setup": setup, "start": spec}


def run(args: argparse.Namespace) -> int:
    from diyllm.training.config import load_config
    from diyllm.training.distributed import finish_worker
    from diyllm.training.trainer import train

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(cfg.to_json())
        return 0
    if cfg.lora_rank:
        from diyllm.training.finetune import train_post

        train_post(prepare_lora_sft(cfg))
        return finish_worker(0)
    cfg, source, model = prepare_sft(cfg)
    result = train(cfg, source=source, model=model)
    # a run stopped by SIGTERM/SIGINT (checkpoint saved) exits 128 + signal (143 / 130), not 0
    return finish_worker(128 + result.stop_signal if result.stop_signal else 0)
