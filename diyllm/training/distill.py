"""Knowledge distillation: the shared training loop with a teacher's soft targets in the objective.

  diyllm distill distill_synthetic --teacher=runs/big/best.pt --data_dir=data/corpus.jsonl
  diyllm distill distill_synthetic --teacher=runs/big/best.pt --init_from=runs/small/best.pt

The student is built from the config's shape (or loaded with init_from=PATH; LoRA keys apply too) and
trained on the config's data (any data_format) with
    distill_alpha · T² · KL(teacher_T ‖ student_T) + (1 − distill_alpha) · CE,   T = distill_temperature.
The teacher is any checkpoint load_model reads, frozen, in eval mode; it must share the data's tokenizer
(checked before training). See docs/post_training.md.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

ACCEPTS_OVERRIDES = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", default=None, help="a TOML file or the name of a shipped config")
    parser.add_argument("--teacher", required=False, default=None, help="teacher checkpoint (file, run folder, hf:DIR)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def load_teacher(spec: str, data_tokenizer: Any, device: str = "cpu"):
    """The frozen teacher; a UserError before any training when its tokenizer is not the data's."""
    from diyllm.errors import UserError
    from diyllm.model.lora import merge_lora
    from diyllm.training.checkpoint import load_model
    from diyllm.training.resume import tokenizer_differences

    teacher, tok, _ = load_model(spec, device=device)
    merge_lora(teacher)
    if tok is None:
        raise UserError(f"--teacher={spec} holds no tokenizer, so it cannot be checked against the data's; "
                        "distillation needs the same tokenizer for teacher and student")
    diffs = tokenizer_differences(tok, data_tokenizer) if data_tokenizer is not None else []
    if diffs:
        raise UserError(f"--teacher={spec} uses a different tokenizer than the training data:\n  - "
                        + "\n  - ".join(diffs) + "\n(distillation compares next-token distributions id by id, "
                        "so teacher and student must share one tokenizer)")
    return teacher.eval().requires_grad_(False)


def prepare_distill(cfg: Any, teacher_spec: str | None) -> dict[str, Any]:
    from diyllm.errors import UserError
    from diyllm.training.data_source import make_source
    from diyllm.training.post_objectives import DistillObjective

    if not teacher_spec:
        raise UserError("distill needs a teacher: pass --teacher=PATH/TO/checkpoint")
    source = make_source(cfg)
    teacher = load_teacher(teacher_spec, getattr(source, "tokenizer", None))
    if cfg.vocab_size and cfg.vocab_size != teacher.config.vocab_size:
        raise UserError(f"vocab_size={cfg.vocab_size} differs from the teacher's {teacher.config.vocab_size}; "
                        "drop vocab_size (the student takes the teacher's)")
    if int(source.context_length) > teacher.config.context_length:
        raise UserError(f"context_length={source.context_length} exceeds the teacher's "
                        f"{teacher.config.context_length}; use context_length <= {teacher.config.context_length}")
    cfg = dataclasses.replace(cfg, vocab_size=teacher.config.vocab_size)
    objective = DistillObjective(teacher, cfg.distill_alpha, cfg.distill_temperature)
    print(f"distilling {teacher_spec} ({sum(p.numel() for p in teacher.parameters()) / 1e6:.2f}M parameters) "
          f"with alpha={cfg.distill_alpha}, T={cfg.distill_temperature}")
    return {"cfg": cfg, "source": source, "model": None, "objective": objective, "setup": None,
            "start": cfg.init_from, "teacher": teacher}


def run(args: argparse.Namespace) -> int:
    from diyllm.training.finetune import run_post_command

    return run_post_command(args, lambda cfg: prepare_distill(cfg, args.teacher))
