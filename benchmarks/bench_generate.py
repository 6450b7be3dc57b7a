"""Decode speed: diyllm with and without the KV cache, and Hugging Face generate() on the same shape.

    python benchmarks/bench_generate.py                  # both shapes below
    python benchmarks/bench_generate.py --shapes medium --rounds 7 --threads 1
    python benchmarks/bench_generate.py --quick          # a tiny model, for a smoke run

Shapes (vocab 4096, context 512 so that prompt + new tokens fit without sliding):
  * small:  d_model 128, 4 layers, 4 heads, d_ff 344 (the shape of the shipped CPU configs, 1.8M params)
  * medium: d_model 384, 6 layers, 6 heads, d_ff 1024 (13.8M params)
Greedy decoding of --new tokens after a --prompt-token prompt, batch 1, float32 on CPU. The three
contenders run interleaved round by round (the machine may be shared), and the medians are compared:
  * cache speedup = diyllm with KV cache / diyllm without cache (target >= 5x)
  * vs HF          = diyllm with KV cache / transformers LlamaForCausalLM.generate(use_cache=True) (>= 1.5x)
  * compiled / HF  = generate(compile=True) (static KV cache, torch.compile'd step) / HF generate (>= 3x);
                     also with quantize="int8" (int8 weights, bf16 activations: model/quantize.py) and
                     quantize="w8a8" (int8 activations too), eager and compiled, against the same float32
                     HF generate
  * % of bound     = compiled tok/s / (copy bandwidth / weight bytes per token): a decode step must read
                     every weight once (the embedding table: one row), so memory bandwidth caps tok/s
                     (target >= 50%). The bandwidth is measured here: a large tensor copy_, read + write.
  Also printed: the one-off compile time and the break-even number of new tokens after which compiling
  has paid for itself against the eager cached path.
The HF model is built with the identical shape (hidden size, intermediate = diyllm's d_ff, heads, RMSNorm
eps, rope theta, untied head) and runs without an end-of-sequence token (eos_token_id=None), as diyllm
runs without stop ids, so both produce exactly --new tokens with no stop-token work per step (forcing the
length with min_new_tokens instead would add a logits processor to HF's loop, about 5% of its time).
A decode step is a fixed cost per op plus reading every weight once; the smaller the model, the more the
per-op cost (where diyllm is leaner) dominates, so the ratio to HF is larger on the small shape.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from diyllm.generation.compiled import compile_seconds
from diyllm.generation.generate import generate, quantized_copy
from diyllm.model import DIYConfig, DIYForCausalLM


def hf_model(cfg: DIYConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    hc = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                     num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                     num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.context_length,
                     rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=False)
    return LlamaForCausalLM(hc).eval()


def copy_bandwidth(mb: int = 256, repeats: int = 5) -> float:
    """Bytes/s moved by dst.copy_(src) over a buffer far larger than the caches (best of `repeats`)."""
    src = torch.ones(mb * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(timed(lambda: dst.copy_(src)) for _ in range(repeats))
    return 2 * src.numel() * 4 / best  # read src + write dst


def gemv_bandwidth(model: DIYForCausalLM, repeats: int = 5) -> float:
    """Bytes/s of weights read by one matrix-vector product per 2-D weight of `model` in a row (what a
    decode step does at batch 1, without attention or any other op): how fast this machine's BLAS can
    actually stream the weights, which is often well below the copy bandwidth on few cores."""
    mats = [p.detach() for p in model.parameters() if p.dim() == 2 and p is not model.token_embeddings.weight]
    vecs = {m.shape[1]: torch.ones(1, m.shape[1], dtype=m.dtype) for m in mats}

    def sweep():
        for m in mats:
            torch.nn.functional.linear(vecs[m.shape[1]], m)

    sweep()
    best = min(timed(sweep) for _ in range(repeats))
    return sum(m.numel() * m.element_size() for m in mats) / best


def weight_bytes_per_token(model: DIYForCausalLM) -> int:
    """Bytes of weights one decode step reads: all of them (int8 copies: the int8 matrices and their
    scales), except the embedding table (one row)."""
    emb = model.token_embeddings.weight
    tensors = [*model.parameters(), *(b for n, b in model.named_buffers() if n.endswith(("weight_int8", "scale")))]
    total = sum(t.numel() * t.element_size() for t in tensors)
    if not model.config.tie_embeddings:
        total -= (emb.shape[0] - 1) * emb.shape[1] * emb.element_size()
    return total


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


QUANTIZED = ("int8", "w8a8")  # the quantize= choices timed (eager and compiled) with --int8, the default

SHAPES = {
    "small": dict(d_model=128, num_layers=4, num_heads=4, d_ff=344),
    "medium": dict(d_model=384, num_layers=6, num_heads=6, d_ff=1024),
}


def bench(cfg: DIYConfig, args) -> dict[str, float]:
    """Tokens/s (medians) of diyllm with cache, without cache, and HF generate, on one shape."""
    torch.manual_seed(0)
    model = DIYForCausalLM(cfg).eval()
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt,)).tolist()
    hf = None if args.no_hf else hf_model(cfg)
    hf_ids = torch.tensor([prompt])

    def ours(use_cache: bool):
        out = generate(model, prompt, args.new, temperature=0, use_cache=use_cache)
        assert len(out[0]) == args.new

    def theirs():
        with torch.inference_mode():
            out = hf.generate(hf_ids, do_sample=False, max_new_tokens=args.new, eos_token_id=None,
                              use_cache=True, pad_token_id=0)
        assert out.shape[1] == args.prompt + args.new

    # warm-up (allocator, lazy init; the compile), then interleaved rounds
    generate(model, prompt, 8, temperature=0)
    generate(model, prompt, 8, temperature=0, use_cache=False)
    if args.compile:
        first = timed(lambda: generate(model, prompt, 8, temperature=0, compile=True))
        took = compile_seconds(model)
        print(f"compile: {took if took is not None else float('nan'):.1f}s (first compiled call {first:.1f}s)")
    if hf is not None:
        with torch.inference_mode():
            hf.generate(hf_ids, do_sample=False, max_new_tokens=8, eos_token_id=None, pad_token_id=0)
    schemes = QUANTIZED if args.int8 else ()
    for scheme in schemes:
        generate(model, prompt, 8, temperature=0, quantize=scheme)
        if args.compile:
            first = timed(lambda s=scheme: generate(model, prompt, 8, temperature=0, quantize=s, compile=True))
            took = compile_seconds(quantized_copy(model, scheme))
            print(f"{scheme} compile: {took if took is not None else float('nan'):.1f}s "
                  f"(first compiled call {first:.1f}s)")
    times: dict[str, list[float]] = {"cache": [], "no cache": [], "hf": [], "compiled": [],
                                     **{k: [] for s in QUANTIZED for k in (s, f"{s}+comp")}}
    for r in range(args.rounds):
        times["cache"].append(timed(lambda: ours(True)))
        if args.compile:
            times["compiled"].append(timed(lambda: generate(model, prompt, args.new, temperature=0, compile=True)))
        for scheme in schemes:
            times[scheme].append(timed(lambda s=scheme: generate(model, prompt, args.new, temperature=0, quantize=s)))
            if args.compile:
                times[f"{scheme}+comp"].append(timed(lambda s=scheme: generate(model, prompt, args.new, temperature=0,
                                                                               quantize=s, compile=True)))
        if r < max(1, args.rounds // 2):  # the slow reference: fewer rounds are enough
            times["no cache"].append(timed(lambda: ours(False)))
        if hf is not None:
            times["hf"].append(timed(theirs))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {args.new / v[-1]:.0f} tok/s"
                                                           for k, v in times.items() if v), flush=True)
    tps = {k: args.new / statistics.median(v) for k, v in times.items() if v}
    print(f"\nmodel d_model={cfg.d_model} layers={cfg.num_layers} heads={cfg.num_heads} ctx={cfg.context_length} "
          f"vocab={cfg.vocab_size} ({model.num_parameters():,} params); prompt {args.prompt}, {args.new} new "
          f"tokens, greedy, batch 1, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for k, v in tps.items():
        print(f"  {k:<9} {v:8.1f} tokens/s (median of {len(times[k])})")
    print(f"  KV-cache speedup: {tps['cache'] / tps['no cache']:.1f}x (target >= 5x)")
    if "hf" in tps:
        print(f"  diyllm / HF generate: {tps['cache'] / tps['hf']:.2f}x (target >= 1.5x)")
    if "compiled" in tps:
        bw, wb = copy_bandwidth(), weight_bytes_per_token(model)
        bound = bw / wb
        tps["bound"] = bound
        print(f"  memory-bandwidth bound: {wb / 1e6:.1f} MB of weights per token / {bw / 1e9:.1f} GB/s copy "
              f"bandwidth = {bound:.0f} tokens/s; compiled reaches {100 * tps['compiled'] / bound:.0f}% "
              "(target >= 50%)")
        gemv = gemv_bandwidth(model)
        print(f"  weights streamed by matrix-vector products alone: {gemv / 1e9:.1f} GB/s = {gemv / wb:.0f} "
              f"tokens/s; compiled reaches {100 * tps['compiled'] * wb / gemv:.0f}% of that")
        if "hf" in tps:
            print(f"  compiled / HF generate: {tps['compiled'] / tps['hf']:.2f}x (target >= 3x)")
        if "int8+comp" in tps:
            q_bytes = weight_bytes_per_token(quantized_copy(model))
            q_bound = bw / q_bytes
            print(f"  int8 weights (bf16 activations): {q_bytes / 1e6:.1f} MB per token, bound {q_bound:.0f} tokens/s; "
                  f"compiled int8 reaches {100 * tps['int8+comp'] / q_bound:.0f}% (target >= 50%)")
            if "hf" in tps:
                print(f"  compiled int8 / HF generate (float32): {tps['int8+comp'] / tps['hf']:.2f}x (target >= 3x); "
                      f"eager int8 / HF: {tps['int8'] / tps['hf']:.2f}x")
        if "w8a8+comp" in tps:  # the same bytes per token as int8 (the activations' scales are computed)
            q_bound = tps["q_bound"] = bw / weight_bytes_per_token(quantized_copy(model, "w8a8"))
            vs_hf = (f", {tps['w8a8+comp'] / tps['hf']:.2f}x HF generate; eager w8a8 / HF: "
                     f"{tps['w8a8'] / tps['hf']:.2f}x") if "hf" in tps else ""
            print(f"  w8a8 (int8 weights and activations): compiled reaches {100 * tps['w8a8+comp'] / q_bound:.0f}% "
                  f"of the same bound (target >= 50%){vs_hf}")
        took = compile_seconds(model)
        saved = 1 / tps["cache"] - 1 / tps["compiled"]  # seconds saved per token vs the eager cached path
        if took is not None and saved > 0:
            print(f"  compile {took:.1f}s, paid back after {took / saved:,.0f} new tokens (vs eager KV cache)")
    return tps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip compiled decoding")
    p.add_argument("--no-int8", dest="int8", action="store_false", help="skip int8-weight decoding")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.new, args.prompt, args.rounds = 64, 32, 3
        configs = {"quick": DIYConfig(vocab_size=1024, context_length=256, d_model=128, num_layers=2, num_heads=4)}
    else:
        configs = {name: DIYConfig(vocab_size=4096, context_length=512, **SHAPES[name]) for name in args.shapes}
    results = {}
    for name, cfg in configs.items():
        print(f"\n[{name}]")
        results[name] = bench(cfg, args)
    summary = []
    for name, r in results.items():
        vs_hf = f", vs HF {r['cache'] / r['hf']:.2f}x" if "hf" in r else ""
        compiled = ""
        if "compiled" in r:
            compiled = f", compiled {100 * r['compiled'] / r['bound']:.0f}% of bound"
            compiled += f" and {r['compiled'] / r['hf']:.2f}x HF" if "hf" in r else ""
        if "w8a8+comp" in r:
            compiled += f", compiled w8a8 {100 * r['w8a8+comp'] / r['q_bound']:.0f}% of its bound"
            compiled += f" and {r['w8a8+comp'] / r['hf']:.2f}x HF" if "hf" in r else ""
        summary.append(f"{name}: cache {r['cache'] / r['no cache']:.1f}x{vs_hf}{compiled}")
    print("\nsummary: " + "; ".join(summary) + " (targets: cache >= 5x, vs HF >= 1.5x; compiled >= 3x HF, "
          ">= 50% of bound)")


if __name__ == "__main__":
    main()
