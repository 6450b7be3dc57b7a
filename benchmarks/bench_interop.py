"""Interop benchmark: diyllm's HF export/import vs transformers' own save/load of the same model.

Measured side by side in one run, interleaved, medians reported (the CPU may be shared):
  * export:  diyllm `export_hf` (permute + safetensors + config/tokenizer files)
             vs `LlamaForCausalLM.save_pretrained` of the exported model;
  * import:  diyllm `load_hf_model` (safetensors -> DIYForCausalLM, no random init)
             vs `AutoModelForCausalLM.from_pretrained` of the same folder, each followed by one forward
             pass on 16 tokens (both memory-map the file; the forward makes every weight really read);
  * max |logits difference| of the two loaded models on random ids (the function is the same).

usage: python benchmarks/bench_interop.py [--d_model 512] [--layers 8] [--vocab 8192] [--repeat 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def forward(model) -> None:
    with torch.no_grad():
        model(torch.zeros(1, 16, dtype=torch.long))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d_model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv_heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    import transformers
    from transformers import AutoModelForCausalLM

    from diyllm.interop.hf import export_hf, load_hf_model
    from diyllm.model import DIYConfig, DIYForCausalLM

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    cfg = DIYConfig(vocab_size=args.vocab, context_length=256, d_model=args.d_model, num_layers=args.layers,
                    num_heads=args.heads, num_kv_heads=args.kv_heads)
    model = DIYForCausalLM(cfg).eval()
    n_params = model.num_parameters()
    tmp = Path(tempfile.mkdtemp(prefix="bench_interop."))
    try:
        src = export_hf(model, tmp / "src")
        hf_model = AutoModelForCausalLM.from_pretrained(src).eval()
        times: dict[str, list[float]] = {"diy_export": [], "hf_save": [], "diy_import": [], "hf_load": []}
        for i in range(args.repeat):  # interleaved, so background load hits both sides alike
            times["diy_export"].append(timed(lambda i=i: export_hf(model, tmp / f"e{i}")))
            times["hf_save"].append(timed(lambda i=i: hf_model.save_pretrained(tmp / f"s{i}")))
            times["diy_import"].append(timed(lambda: forward(load_hf_model(src)[0])))
            times["hf_load"].append(timed(lambda: forward(AutoModelForCausalLM.from_pretrained(src))))
        med = {k: statistics.median(v) for k, v in times.items()}
        ids = torch.randint(0, args.vocab, (2, 128))
        ours, _ = load_hf_model(src)
        with torch.no_grad():
            diff = (ours(ids).logits - hf_model(ids).logits).abs().max().item()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    mb = n_params * 4 / 1e6
    print(f"model: {n_params / 1e6:.1f}M params ({mb:.0f} MB float32), d_model={args.d_model}, "
          f"layers={args.layers}, heads={args.heads}/{args.kv_heads}, vocab={args.vocab}; median of {args.repeat}")
    print(f"export  diyllm export_hf      {med['diy_export']:.3f}s ({mb / med['diy_export']:.0f} MB/s)")
    print(f"        HF save_pretrained    {med['hf_save']:.3f}s   ratio diyllm/HF = "
          f"{med['diy_export'] / med['hf_save']:.2f}")
    print(f"import  diyllm load+forward   {med['diy_import']:.3f}s ({mb / med['diy_import']:.0f} MB/s)")
    print(f"        HF load+forward       {med['hf_load']:.3f}s   ratio diyllm/HF = "
          f"{med['diy_import'] / med['hf_load']:.2f}")
    print(f"max |logits diff| diyllm vs transformers: {diff:.2e}")


if __name__ == "__main__":
    main()
