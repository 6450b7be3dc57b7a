"""Export a diyllm checkpoint to the Hugging Face Llama format (config.json + model.safetensors + tokenizer).

The folder loads with transformers' AutoModelForCausalLM / AutoTokenizer.from_pretrained(DIR), and from
there in vLLM, llama.cpp's convert_hf_to_gguf.py or the Hub. Example:

    diyllm export --ckpt runs/shakespeare/best.pt --out hf/shakespeare --format hf

GGUF (one file for llama.cpp; needs the gguf extra) and Ollama (the GGUF plus a Modelfile beside it):

    diyllm export --format gguf --ckpt runs/sft --out model.gguf --dtype q8_0
    diyllm export --format ollama --ckpt runs/sft --out ollama/model.gguf    # then: ollama create NAME -f ...
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="checkpoint file, or a run folder (uses its best.pt)")
    parser.add_argument("--out", required=True, help="folder to write (must be new or empty, see --overwrite); "
                        "for gguf/ollama the .gguf file")
    parser.add_argument("--format", default="hf", choices=["hf", "gguf", "ollama"], help="output format (default: hf)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16", "f32", "f16", "q8_0"],
                        help="hf: cast the weights (default: keep the checkpoint's dtype); gguf/ollama: f32 "
                        "(default), f16 or q8_0")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --out folder")


def run_gguf(args: argparse.Namespace) -> int:
    from diyllm.errors import UserError
    from diyllm.interop.gguf_export import export_gguf, ollama_modelfile

    dtype = args.dtype or "f32"
    if dtype not in ("f32", "f16", "q8_0"):
        raise UserError(f"--dtype {dtype} is for --format hf; GGUF takes f32, f16 or q8_0")
    out = Path(args.out)
    modelfile = out.parent / "Modelfile"
    if args.format == "ollama" and modelfile.exists() and not args.overwrite:
        raise UserError(f"{modelfile} exists; pass --overwrite to replace it")
    t0 = time.perf_counter()
    export_gguf(args.ckpt, out, dtype=dtype, overwrite=args.overwrite)
    size = out.stat().st_size
    print(f"exported {args.ckpt} -> {out} ({dtype}, {size / 1e6:.1f} MB in {time.perf_counter() - t0:.2f}s)")
    if args.format == "ollama":
        from diyllm.atomic import atomic_write
        from diyllm.loading import load_model

        model, tokenizer, _ = load_model(args.ckpt)
        chat = "<|im_end|>" in getattr(tokenizer, "special_tokens", [])
        with atomic_write(modelfile, "w", encoding="utf-8") as f:
            f.write(ollama_modelfile(out.name, model.config.context_length, chat))
        print(f"wrote {modelfile}; create the model with: ollama create mymodel -f {modelfile}")
    else:
        print(f"run it with llama.cpp: llama-cli -m {out} -p 'Hello'")
    return 0


def run(args: argparse.Namespace) -> int:
    from diyllm.interop.hf import export_checkpoint

    if args.format in ("gguf", "ollama"):
        return run_gguf(args)
    if args.dtype in ("f32", "f16", "q8_0"):
        from diyllm.errors import UserError

        raise UserError(f"--dtype {args.dtype} is a GGUF dtype; --format hf takes float32, bfloat16 or float16")

    t0 = time.perf_counter()
    out = export_checkpoint(args.ckpt, args.out, dtype=args.dtype, overwrite=args.overwrite)
    size = sum(f.stat().st_size for f in Path(out).iterdir())
    seconds = time.perf_counter() - t0
    files = ", ".join(sorted(f.name for f in Path(out).iterdir()))
    print(f"exported {args.ckpt} -> {out} ({size / 1e6:.1f} MB in {seconds:.2f}s, "
          f"{size / 1e6 / max(seconds, 1e-9):.0f} MB/s): {files}")
    print(f"load it with: AutoModelForCausalLM.from_pretrained({str(out)!r}); AutoTokenizer.from_pretrained(...)")
    return 0
