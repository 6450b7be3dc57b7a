"""Import a local Hugging Face Llama-format folder (config.json + safetensors + tokenizer.json) as a diyllm
checkpoint, ready for `diyllm sample --ckpt` or as a starting point (`--init_from=PATH` or `hf:DIR`).

Only a path on disk is read, never the network. Sharded weights (model.safetensors.index.json) work.
Configs diyllm cannot run exactly (biases, RoPE scaling, another activation, ...) are refused with the
field named. Example:

    diyllm import --hf ~/models/tiny-llama-folder --out imported.pt
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hf", required=True, metavar="DIR", help="local folder with config.json and weights")
    parser.add_argument("--out", required=True, help="checkpoint file to write (.pt)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the stored weights (default float32, what diyllm trains in)")
    parser.add_argument("--context_length", type=int, default=None,
                        help="override max_position_embeddings (a smaller RoPE table for long-context models)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def run(args: argparse.Namespace) -> int:
    import sys

    from diyllm.interop.hf import import_hf

    summary = import_hf(args.hf, args.out, dtype=args.dtype, context_length=args.context_length,
                        overwrite=args.overwrite)
    for note in summary["notes"]:
        print(f"note: {note}", file=sys.stderr)
    c = summary["model_config"]
    print(f"imported {args.hf} -> {summary['out']} in {summary['seconds']:.2f}s: {summary['num_params'] / 1e6:.2f}M "
          f"params, {c['num_layers']} layers, d_model={c['d_model']}, heads={c['num_heads']}/{c['num_kv_heads']} "
          f"(q/kv), vocab={c['vocab_size']}, context={c['context_length']}; tokenizer: {summary['tokenizer']}")
    print(f"try it: diyllm sample --ckpt {summary['out']}")
    return 0
