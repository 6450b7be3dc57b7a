"""The `diyllm` command line: a thin dispatcher over the library.

Each subcommand lives in the module that owns the concept (training, data, lab, ...). A command module
exposes ``add_arguments(parser)`` and ``run(args) -> int | None``; modules are imported lazily so that
`diyllm --help` stays instant and a broken optional feature cannot break unrelated commands.
A module that sets ``ACCEPTS_OVERRIDES = True`` receives the unparsed ``--key=value`` words in
``args.overrides`` (the training commands use them for config overrides).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from diyllm.errors import UserError

# name -> (module, one-line help). Order is the order shown in --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("diyllm.info", "print versions, device and thread count"),
    "demo": ("diyllm.lab.demo", "offline end-to-end demo: prepare, train, plot, sample"),
    "overfit": ("diyllm.training.overfit", "the minimal training loop: overfit one tiny batch"),
    "prepare": ("diyllm.data.prepare", "tokenize a corpus into a sharded dataset (resumable)"),
    "inspect-data": ("diyllm.data.inspect", "look inside a prepared dataset"),
    "train": ("diyllm.training.cli", "pretrain a model from a config file plus --key=value overrides"),
    "sft": ("diyllm.training.sft_cli", "supervised fine-tuning on conversations (same loop as train)"),
    "plan": ("diyllm.training.plan_cli", "estimate memory per rank, tokens/step, FLOPs and time of a run"),
    "checkpoint": ("diyllm.training.checkpoint_cli", "checkpoint tools: consolidate a sharded (DCP) checkpoint"),
    "sample": ("diyllm.generation.cli", "generate text from a checkpoint"),
    "chat": ("diyllm.generation.chat", "talk to a fine-tuned checkpoint in the terminal"),
    # --- issue 16: post-training ---
    "dpo": ("diyllm.training.dpo", "preference tuning (DPO) on chosen/rejected pairs (same loop as train)"),
    "rl": ("diyllm.training.rl", "RL with a verifiable reward (GRPO rollouts, same loop as train)"),
    "distill": ("diyllm.training.distill", "train a student on a teacher's soft targets (same loop as train)"),
    "lora": ("diyllm.training.lora_cli", "LoRA adapters: `diyllm lora merge --ckpt RUN --out merged.pt`"),
    "show-sft-sample": ("diyllm.data.show_sft", "render one SFT conversation with its trained tokens marked"),
    "plot": ("diyllm.lab.plot", "plot loss curves of one or more runs to a PNG"),
    "compare": ("diyllm.lab.compare", "table comparing runs (loss, gap, speed, size)"),
    "sweep": ("diyllm.lab.sweep", "run a grid of configs and compare them"),
    "lr-find": ("diyllm.lab.lr_find", "learning-rate range test"),
    "diagnose": ("diyllm.lab.diagnose", "per-layer gradient/update statistics of a checkpoint"),
    "primer": ("diyllm.lab.primer", "gradient descent by hand, with autograd, and with AdamW"),
    "lab": ("diyllm.lab.experiments", "ready-made experiments (e.g. `diyllm lab pretrain-vs-sft`)"),
    "export": ("diyllm.interop.cli_export", "export a checkpoint to the Hugging Face Llama format"),
    "import": ("diyllm.interop.cli_import", "import a Hugging Face Llama-format folder"),
    "serve": ("diyllm.serving.cli", "OpenAI-compatible API server with a web chat page"),
    "eval": ("diyllm.eval.cli", "evaluate a checkpoint on benchmarks (HellaSwag, ARC, MMLU, ...) and a CORE score"),
}


def _top_parser() -> argparse.ArgumentParser:
    from diyllm import __version__

    parser = argparse.ArgumentParser(
        prog="diyllm",
        description="Train language models from scratch: tokenizer -> data -> model -> pretraining -> SFT -> chat.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {n:<16} {h}" for n, (_, h) in COMMANDS.items())
        + "\n\nRun `diyllm COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"diyllm {__version__}")
    parser.add_argument("command", nargs="?", choices=list(COMMANDS), metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        top = _top_parser()
        args = top.parse_args(argv[:1])  # --help / --version / unknown command errors
        top.print_help()
        return 0
    name, rest = argv[0], argv[1:]
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(
        prog=f"diyllm {name}",
        description=(module.__doc__ or help_text).strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(parser)
    if getattr(module, "ACCEPTS_OVERRIDES", False):
        args, extra = parser.parse_known_args(rest)
    else:
        args, extra = parser.parse_args(rest), []
    args.overrides = extra
    try:
        rc = module.run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `diyllm ... | head`: the reader has gone; stop quietly, as Unix tools do
        _silence_stdout()
        return 141
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk or a read-only folder is the user's to fix too, without a traceback
        if exc.errno not in WRITE_ERRNOS:
            raise
        print(f"error: {describe_os_error(exc)}", file=sys.stderr)
        return 2
    return int(rc or 0)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush does not fail on the closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout is not a file (e.g. captured in a test)
        pass


# errno values that mean "this machine's disk/permissions", not a bug: shown as one error line
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG)


def describe_os_error(exc: OSError) -> str:
    where = f" {exc.filename}" if exc.filename else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return f"disk full while writing{where}; files written before are intact; free some space and run again"
    return f"cannot write{where}: {exc.strerror} (read-only folder or not yours?); choose a writable location"


if __name__ == "__main__":
    raise SystemExit(main())
