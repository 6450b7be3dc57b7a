"""Direct preference optimisation: the shared training loop with preference pairs and the DPO objective.

  diyllm dpo dpo_synthetic --init_from=runs/sft_synthetic/best.pt [--data=prefs.jsonl] [--lora_rank=8]
  diyllm dpo dpo_synthetic --init_from=resume          # continue the DPO run in out_dir

--data (or data_dir) is preference JSONL ({"prompt", "chosen", "rejected"}; see
diyllm/data/preference.py), val_data the held-out pairs (else ~5% are held out). The reference model
is the init_from checkpoint, frozen (with LoRA: the same network with its adapters off). Logged:
loss (log 2 = 0.693 at the start), pref_acc, margin, chosen/rejected log-probabilities. See
docs/post_training.md.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch
from torch import nn

ACCEPTS_OVERRIDES = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", default=None, help="a TOML file or the name of a shipped config")
    parser.add_argument("--data", default=None, help="preference JSONL file/folder/glob (default: data_dir)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


@torch.no_grad()
def preference_accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, mask: np.ndarray,
                        batch_size: int = 64) -> float:
    """Fraction of pairs ((N, 2, T) arrays: [:, 0] chosen) to which `model` gives the chosen reply the
    higher log-probability: what the model prefers, independent of any reference."""
    from diyllm.training.post_losses import sequence_logps

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    wins = 0
    for i in range(0, len(x), batch_size):
        xb, yb, mb = (torch.from_numpy(a[i : i + batch_size]).to(device) for a in (x, y, mask))
        n = xb.shape[0]
        lp = sequence_logps(model(xb.flatten(0, 1)).logits, yb.flatten(0, 1), mb.flatten(0, 1)).view(n, 2)
        wins += int((lp[:, 0] > lp[:, 1]).sum())
    model.train(was_training)
    return wins / max(1, len(x))


def prepare_dpo(cfg: Any, data: str | None = None) -> dict[str, Any]:
    """Everything `train` needs for a DPO run: cfg, source, model, objective (and the setup summary)."""
    from diyllm.data.preference import PreferenceSource
    from diyllm.training.finetune import prepare_policy, start_spec, trainer_cfg
    from diyllm.training.post_objectives import DPOObjective

    spec = start_spec(cfg)
    model, tok, setup, reference = prepare_policy(cfg, spec, need_reference=True)
    cfg = trainer_cfg(cfg, model)
    source = PreferenceSource(cfg, tok, data)
    print(f"DPO from {spec}: {source.pairs['train']} train / {source.pairs['val']} val pairs; {setup.describe()}")
    objective = DPOObjective(reference, cfg.dpo_beta, cfg.dpo_label_smoothing)
    return {"cfg": cfg, "source": source, "model": model, "objective": objective, "setup": setup, "start": spec}


def run(args: argparse.Namespace) -> int:
    from diyllm.training.finetune import run_post_command

    return run_post_command(args, lambda cfg: prepare_dpo(cfg, args.data))

