"""Export a diyllm checkpoint to the Hugging Face Llama format (config.json + model.safetensors + tokenizer).

The folder loads with transformers' AutoModelForCausalLM / AutoTokenizer.from_pretrained(DIR), and from
there in vLLM, llama.cpp's convert_hf_to_gguf.py or the Hub. Example:

    diyllm export --ckpt runs/shakespeare/best.pt --out hf/shakespeare --format hf
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="checkpoint file, or a run folder (uses its best.pt)")
    parser.add_argument("--out", required=True, help="folder to write (must be new or empty, see --overwrite)")
    parser.add_argument("--format", default="hf", choices=["hf"], help="output format (default: hf)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="cast the weights (default: keep the checkpoint's dtype)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --out folder")


def run(args: argparse.Namespace) -> int:
    from diyllm.interop.hf import export_checkpoint

    t0 = time.perf_counter()
    out = export_checkpoint(args.ckpt, args.out, dtype=args.dtype, overwrite=args.overwrite)
    size = sum(f.stat().st_size for f in Path(out).iterdir())
    seconds = time.perf_counter() - t0
    files = ", ".join(sorted(f.name for f in Path(out).iterdir()))
    print(f"exported {args.ckpt} -> {out} ({size / 1e6:.1f} MB in {seconds:.2f}s, "
          f"{size / 1e6 / max(seconds, 1e-9):.0f} MB/s): {files}")
    print(f"load it with: AutoModelForCausalLM.from_pretrained({str(out)!r}); AutoTokenizer.from_pretrained(...)")
    return 0
