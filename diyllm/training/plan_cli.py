"""Size a training run before renting the GPUs: memory per rank, tokens per step, FLOPs, time.

  diyllm plan llama_200m --nproc 8 --gpu-memory 80GB
  diyllm plan gpt2_small --nproc 1 --gpu H100 --mfu 0.35 --batch_size=8
  diyllm plan shakespeare_char_cpu --vocab_size=65

Prints the same memory estimate `diyllm train` prints before it starts (see
diyllm/training/memory_plan.py), the global batch in tokens, the training FLOPs per token
(6 x non-embedding parameters + attention) and the wall time of max_iters steps at the given model
FLOPs utilisation (MFU) of the named GPU's bf16 peak. Nothing is allocated: the model is built on
PyTorch's `meta` device. `--key=value` overrides work as in `diyllm train`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diyllm.errors import UserError

ACCEPTS_OVERRIDES = True
DEFAULT_VOCAB = 50304


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a TOML file or the name of a shipped config (diyllm train --list-configs)")
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs) in total, as torchrun would start")
    parser.add_argument("--gpu-memory", default="", help="memory of one device, e.g. 80GB (default: this "
                        "machine's CUDA device when there is one, else not checked)")
    parser.add_argument("--gpu", default="H100", help="GPU model whose bf16 peak FLOP/s sets the ETA (default H100)")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation to assume (default 0.4)")


def data_vocab_size(data_dir: str) -> int:
    meta = Path(data_dir) / "meta.json"
    if meta.is_file():
        try:
            return int(json.loads(meta.read_text(encoding="utf-8")).get("vocab_size") or 0)
        except (ValueError, OSError):
            return 0
    return 0


def gpu_peak(name: str) -> float:
    from diyllm.training.metrics import GPU_PEAK_FLOPS

    for key, flops in GPU_PEAK_FLOPS:
        if key.lower() in name.lower():
            return flops
    known = ", ".join(k for k, _ in GPU_PEAK_FLOPS)
    raise UserError(f"--gpu {name!r}: unknown GPU; known: {known} (or set --peak_flops=FLOPS)")


def human_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def run(args: argparse.Namespace) -> int:
    import torch

    from diyllm.model import DIYForCausalLM
    from diyllm.training.config import load_config
    from diyllm.training.memory_plan import (
        device_memory,
        estimate_for_train_config,
        format_estimate,
        parse_bytes,
        suggestions,
    )
    from diyllm.training.trainer import model_config_from

    cfg = load_config(args.config, args.overrides)
    if args.nproc < 1:
        raise UserError(f"--nproc must be >= 1 (got {args.nproc})")
    if cfg.gradient_accumulation_steps % args.nproc:
        suggested = args.nproc * max(1, round(cfg.gradient_accumulation_steps / args.nproc))
        raise UserError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} is not divisible by "
                        f"--nproc {args.nproc}; the global batch is split across ranks, so use a multiple of "
                        f"{args.nproc} (e.g. --gradient_accumulation_steps={suggested})")
    if not 0 < args.mfu <= 1:
        raise UserError(f"--mfu must be in (0, 1] (got {args.mfu})")
    notes = []
    vocab = cfg.vocab_size or data_vocab_size(cfg.data_dir)
    if not vocab:
        vocab = DEFAULT_VOCAB
        notes.append(f"vocab_size comes from the data, which is not prepared at {cfg.data_dir}: assuming "
                     f"{DEFAULT_VOCAB} (pass --vocab_size=N)")
    dtype = cfg.dtype if cfg.dtype != "auto" else "bfloat16"
    est = estimate_for_train_config(cfg, vocab, args.nproc, compute_dtype=dtype)
    if args.gpu_memory:
        device_bytes, where = parse_bytes(args.gpu_memory), "--gpu-memory"
    elif torch.cuda.is_available():
        device_bytes, where = device_memory(torch.device("cuda"))
    else:
        device_bytes, where = 0, ""
    with torch.device("meta"):
        model = DIYForCausalLM(model_config_from(cfg, vocab))
    flops_per_token = model.flops_per_token(cfg.context_length)
    tokens_per_step = cfg.tokens_per_iter()
    peak = cfg.peak_flops or gpu_peak(args.gpu)
    step_s = tokens_per_step * flops_per_token / (args.nproc * peak * args.mfu)
    parallel = cfg.parallelism if args.nproc > 1 else "single process"
    print(f"plan for {args.config}: {args.nproc} process(es), {parallel}, dtype {dtype}, "
          f"activation_checkpointing={str(cfg.activation_checkpointing).lower()}")
    print(f"model: {model.num_parameters() / 1e6:.1f}M parameters ({model.num_parameters(False) / 1e6:.1f}M "
          f"without the input embedding), vocab {vocab}, context {cfg.context_length}")
    print(format_estimate(est, device_bytes, where))
    if device_bytes and est.total > 0.95 * device_bytes:
        print("to fit, try:\n  - " + "\n  - ".join(suggestions(cfg, est, args.nproc)))
    accum = cfg.gradient_accumulation_steps // args.nproc
    print(f"tokens per step: {tokens_per_step:,} ({cfg.batch_size} seqs x {accum} micro-steps x {args.nproc} "
          f"processes x {cfg.context_length} tokens)")
    print(f"training FLOPs per token: {flops_per_token / 1e6:.1f} MFLOP; "
          f"per step {tokens_per_step * flops_per_token:.3g}")
    total_tokens = tokens_per_step * cfg.max_iters
    print(f"{cfg.max_iters:,} steps = {total_tokens / 1e9:.3g}B tokens; ETA at {100 * args.mfu:.0f}% MFU of "
          f"{args.nproc} x {args.gpu if not cfg.peak_flops else 'peak_flops'} ({peak / 1e12:.0f} TFLOP/s bf16): "
          f"{human_duration(step_s * cfg.max_iters)} ({1000 * step_s:.0f} ms/step, "
          f"{tokens_per_step / step_s / args.nproc:,.0f} tokens/s per GPU)")
    for note in notes:
        print(f"note: {note}")
    return 0
