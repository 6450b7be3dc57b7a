"""Training throughput: diyllm vs Hugging Face `transformers` LlamaForCausalLM, same shapes, same run.

    python benchmarks/bench_train.py                 # both shapes, float32, CPU, torch's thread count
    python benchmarks/bench_train.py --rounds 9 --steps 5
    python benchmarks/bench_train.py --compile       # also both models under torch.compile (needs a C compiler)
    NANOGPT_SRC=~/src/nanoGPT python benchmarks/bench_train.py   # also nanoGPT's GPT (model.py of a checkout)
    python benchmarks/bench_train.py --op-times --shapes small   # where a step's time goes, aten op by op
    python benchmarks/bench_train.py --blas-too       # also diyllm on BLAS: the oneDNN fast path's gain

One training step = forward + backward + global grad-norm clip at 1.0 + optimizer step + zero_grad.
With NANOGPT_SRC (a nanoGPT checkout, never vendored) its model.py's GPT joins on the same shapes (its own
LayerNorm/GELU block with biases, n_embd/n_layer/n_head, dropout 0) with its configure_optimizers AdamW,
and the ratio diyllm / nanoGPT is printed too (issue 19's per-step parity target: >= 1.0x on both shapes).

Shapes (identical for every contender): vocab 65; d_model 128 x 4 layers x 4 heads, d_ff 344, context 64,
batch 12; and d_model 384 x 6 layers x 6 heads, d_ff 1024, context 256, batch 16; float32 on CPU, the same
thread count. Each model uses its natural optimizer: diyllm its own AdamW (decay on matrices only),
Hugging Face torch.optim.AdamW (foreach). Runs are interleaved (diyllm, HF, diyllm, HF, ...) and the
medians compared, so a busy shared CPU slows both alike. The ratio printed is diyllm tokens/s over HF
tokens/s. diyllm's float32 CPU matmuls go to oneDNN where model/cpu_matmul.py's rule says so (AMD Zen 5
and later; the header line says which); --blas-too adds diyllm on the plain BLAS matmul as a contender,
--cpu-matmul sets the process's choice.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

SHAPES = {
    "small": dict(d_model=128, num_layers=4, num_heads=4, d_ff=344, context=64, batch=12),
    "medium": dict(d_model=384, num_layers=6, num_heads=6, d_ff=1024, context=256, batch=16),
}
VOCAB = 65


def diy_step_fn(shape: dict, compile: bool = False, cpu_matmul: str | None = None):
    """diyllm's step; `cpu_matmul` ("onednn" / "blas") switches model/cpu_matmul.py's choice for this
    contender's steps only (the process's own choice is restored after each)."""
    from diyllm.model import DIYConfig, DIYForCausalLM
    from diyllm.model.cpu_matmul import cpu_matmul_choice
    from diyllm.training.optim import AdamW, clip_grad_norm_
    from diyllm.training.trainer import optimizer_groups

    model = DIYForCausalLM(DIYConfig(vocab_size=VOCAB, context_length=shape["context"], d_model=shape["d_model"],
                                     num_layers=shape["num_layers"], num_heads=shape["num_heads"],
                                     d_ff=shape["d_ff"])).train()
    opt = AdamW(optimizer_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.99), foreach=True)
    forward = torch.compile(model) if compile else model

    def step(x, y):
        loss = forward(x, targets=y).loss
        loss.backward()
        clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def switched_step(x, y):
        with cpu_matmul_choice(cpu_matmul):
            return step(x, y)

    return (switched_step if cpu_matmul else step), sum(p.numel() for p in model.parameters())


def hf_step_fn(shape: dict, compile: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=shape["d_model"], intermediate_size=shape["d_ff"],
                         num_hidden_layers=shape["num_layers"], num_attention_heads=shape["num_heads"],
                         num_key_value_heads=shape["num_heads"], max_position_embeddings=shape["context"],
                         vocab_size=VOCAB, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, foreach=True)
    forward = torch.compile(model) if compile else model

    def step(x, y):
        loss = forward(input_ids=x, labels=x).loss  # HF shifts labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step, sum(p.numel() for p in model.parameters())


def nanogpt_step_fn(shape: dict, src: str):
    """nanoGPT's GPT and optimizer, imported from the checkout at `src` (its model.py, run as is)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("nanogpt_model", os.path.join(src, "model.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = mod.GPT(mod.GPTConfig(block_size=shape["context"], vocab_size=VOCAB, n_layer=shape["num_layers"],
                                  n_head=shape["num_heads"], n_embd=shape["d_model"], dropout=0.0)).train()
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")

    def step(x, y):
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step, sum(p.numel() for p in model.parameters())


def op_times(step, x, y, n: int = 2, top: int = 25) -> None:
    """Print the wall time of each aten op kind over `n` steps (the profiler inflates small CPU ops several
    times over; a dispatch mode that times each call around the kernel does not)."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class Timer(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seconds, self.calls = Counter(), Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            start = time.perf_counter()
            out = func(*args, **(kwargs or {}))
            name = str(func.overloadpacket)
            self.seconds[name] += time.perf_counter() - start
            self.calls[name] += 1
            return out

    with Timer() as timer:
        for _ in range(n):
            step(x, y)
    print(f"    ops: {sum(timer.seconds.values()) / n * 1e3:.2f} ms/step in {sum(timer.calls.values()) / n:.0f} calls")
    for name, sec in timer.seconds.most_common(top):
        print(f"      {name:<58} {sec / n * 1e3:9.3f} ms  {timer.calls[name] / n:6.0f} calls")


def time_steps(step, x, y, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        step(x, y)
    return (time.perf_counter() - t) / n


def bench(name: str, shape: dict, rounds: int, steps: int, compile: bool = False, op_table: bool = False,
          blas_too: bool = False) -> float:
    torch.manual_seed(0)
    x = torch.randint(0, VOCAB, (shape["batch"], shape["context"]))
    y = torch.roll(x, -1, dims=1)
    runners = {"diyllm": diy_step_fn(shape), "hf": hf_step_fn(shape)}
    if blas_too:  # the same model on the plain BLAS matmul, beside the process's choice
        runners["diyllm-blas"] = diy_step_fn(shape, cpu_matmul="blas")
    if os.environ.get("NANOGPT_SRC"):
        runners["nanogpt"] = nanogpt_step_fn(shape, os.path.expanduser(os.environ["NANOGPT_SRC"]))
    if compile:
        runners |= {"diyllm+compile": diy_step_fn(shape, compile=True), "hf+compile": hf_step_fn(shape, compile=True)}
    for step, _ in runners.values():  # warm-up: allocator, kernels, optimizer state (and compilation)
        time_steps(step, x, y, 3)
    if op_table:
        for key, (step, _) in runners.items():
            if "compile" not in key:  # a compiled graph runs its own kernels, unseen by the dispatcher
                print(f"\n[{name}] {key}, per op:")
                op_times(step, x, y)
    times: dict[str, list[float]] = {k: [] for k in runners}
    for r in range(rounds):  # every other round in reverse order: no contender always runs first
        for key, (step, _) in (list(runners.items()) if r % 2 == 0 else list(runners.items())[::-1]):
            times[key].append(time_steps(step, x, y, steps))
    tokens = shape["batch"] * shape["context"]
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n[{name}] d_model {shape['d_model']}, {shape['num_layers']} layers, {shape['num_heads']} heads, "
          f"context {shape['context']}, batch {shape['batch']}; params diyllm {runners['diyllm'][1]:,} "
          f"hf {runners['hf'][1]:,}")
    for k in runners:
        print(f"  {k:<14} median {1000 * med[k]:8.1f} ms/step  {tokens / med[k]:9.0f} tok/s  "
              f"(min {1000 * min(times[k]):.1f}, max {1000 * max(times[k]):.1f})")
    ratio = med["hf"] / med["diyllm"]
    print(f"  diyllm / HF throughput: {ratio:.2f}x")
    if "diyllm-blas" in med:
        print(f"  diyllm / diyllm-blas throughput: {med['diyllm-blas'] / med['diyllm']:.2f}x (the cpu matmul's gain)")
    if "nanogpt" in med:
        # Each round's own ratio too: the two ran back to back, so a host that speeds up or slows down
        # between rounds (a shared machine) moves both sides of it alike.
        paired = sorted(n / d for d, n in zip(times["diyllm"], times["nanogpt"]))
        quartiles = statistics.quantiles(paired, n=4) if len(paired) > 1 else paired * 3
        print(f"  diyllm / nanoGPT throughput: {med['nanogpt'] / med['diyllm']:.2f}x (target >= 1.0x); per round: "
              f"median {statistics.median(paired):.3f}x, quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f}x")
    if compile:
        print(f"  compiled: diyllm / HF {med['hf+compile'] / med['diyllm+compile']:.2f}x, "
              f"diyllm compiled / HF eager {med['hf'] / med['diyllm+compile']:.2f}x")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed run")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--compile", action="store_true", help="also time both models under torch.compile")
    parser.add_argument("--op-times", action="store_true",
                        help="also print each contender's time per aten op (a dispatch mode times every call)")
    parser.add_argument("--cpu-matmul", choices=("auto", "onednn", "blas"), default=None,
                        help="diyllm's CPU matmul backend (model/cpu_matmul.py; default: $DIYLLM_CPU_MATMUL or auto)")
    parser.add_argument("--blas-too", action="store_true",
                        help="also time diyllm on the plain BLAS matmul (the oneDNN fast path's gain, same run)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc malloc as it is (diyllm train sets keep_freed_memory on CPU)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    from diyllm.model.cpu_matmul import describe, set_cpu_matmul

    if args.cpu_matmul:
        set_cpu_matmul(args.cpu_matmul)

    from diyllm.training.host_malloc import keep_freed_memory

    # What `diyllm train` does on CPU; process-wide, so every contender in this process gets it too.
    malloc = "glibc default" if args.default_malloc else f"keep_freed_memory {keep_freed_memory()}"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, float32 CPU, "
          f"{torch.get_num_threads()} threads, malloc: {malloc}, diyllm cpu matmul: {describe()}; "
          f"{args.rounds} interleaved rounds of "
          f"{args.steps} steps")
    ratios = {name: bench(name, SHAPES[name], args.rounds, args.steps, args.compile, args.op_times, args.blas_too)
              for name in args.shapes}
    print("\nsummary, diyllm / HF: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
