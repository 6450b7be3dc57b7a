"""One command that checks diyllm's CUDA paths end to end and prints a table (about 6-8 min on one H100).

    python benchmarks/gpu_check.py                                  # everything
    python benchmarks/gpu_check.py --input ../shared/data/tinyshakespeare.txt
    python benchmarks/gpu_check.py --skip shakespeare --skip decode  # a faster partial check

Checks (each one is independent: a failure is a row in the table, the others still run):
  train      gpt2_small shape (124M, context 1024), bf16 autocast + torch.compile: tokens/s and MFU against
             this GPU's bf16 peak looked up by name (diyllm.training.metrics.GPU_PEAK_FLOPS); and the peak
             memory of those steps (torch.cuda.max_memory_allocated) against diyllm's planner estimate
  flash      scaled_dot_product_attention in the model's shape runs with only the flash backend allowed,
             and the profiler shows a flash kernel in a normal (unrestricted) forward
  shakespeare the shakespeare_char recipe (5000 steps, bf16, compile) through `diyllm train`: val loss and
             wall time (nanoGPT's figure on an A100: val loss ~1.47 in ~3 min)
  fsdp       FSDP2 (fully_shard, bf16 MixedPrecisionPolicy) in a 1-rank NCCL group: a few steps, a sharded
             DCP checkpoint, loaded into a fresh sharded model: exactly the saved weights, and training goes on
  decode     KV-cache greedy decoding tokens/s of diyllm vs Hugging Face generate() on the same shape
Needs a CUDA GPU; prints "no CUDA device" and exits 1 otherwise. Nothing here runs in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from diyllm.model import DIYConfig, DIYForCausalLM  # noqa: E402
from diyllm.training.memory_plan import estimate_memory, human_bytes  # noqa: E402
from diyllm.training.metrics import peak_flops  # noqa: E402
from diyllm.training.optim import AdamW, clip_grad_norm_  # noqa: E402

GPT2_SMALL = dict(vocab_size=50304, context_length=1024, d_model=768, num_layers=12, num_heads=12,
                  tie_embeddings=True, init_std=0.02)
ROWS: list[tuple[str, str, str, str]] = []  # (check, measured, target / reference, verdict)


def row(check: str, measured: str, target: str = "", ok: bool | None = None) -> None:
    verdict = "" if ok is None else ("ok" if ok else "CHECK")
    ROWS.append((check, measured, target, verdict))
    print(f"  {check}: {measured} {f'(target {target})' if target else ''} {verdict}", flush=True)


def sync() -> None:
    torch.cuda.synchronize()


# ---- train: tokens/s, MFU, peak memory vs the planner --------------------------------------------------


def check_train(args) -> None:
    device = torch.device("cuda")
    config = DIYConfig(**GPT2_SMALL, fused_projections=True)
    torch.manual_seed(0)
    model = DIYForCausalLM(config).to(device)
    optimizer = AdamW(model.parameters(), lr=6e-4, weight_decay=0.1)
    compiled = torch.compile(model)
    batch = args.batch
    x = torch.randint(0, config.vocab_size, (batch, config.context_length), device=device)

    def step(net=compiled):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = net(x, targets=x).loss
        loss.backward()
        clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    # The planner models eager PyTorch: compare it with two eager steps (the second has the AdamW state).
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        step(model)
    sync()
    measured = torch.cuda.max_memory_allocated()
    est = estimate_memory(config, batch_size=batch, compute_dtype="bfloat16")
    ratio = est.total / measured
    row("peak memory (eager) vs planner", f"measured {human_bytes(measured)}, estimate {human_bytes(est.total)} "
        f"(x{ratio:.2f})", "0.7-1.3x", 0.7 <= ratio <= 1.3)
    t = time.perf_counter()
    for _ in range(3):  # compile + warm-up
        step()
    sync()
    row("train: compile + 3 warm-up steps", f"{time.perf_counter() - t:.0f} s")
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    dt = (time.perf_counter() - t) / args.steps
    tokens = batch * config.context_length
    tok_s = tokens / dt
    peak = peak_flops(device)
    name = torch.cuda.get_device_name(device)
    row("train gpt2_small bf16+compile", f"{tok_s:,.0f} tokens/s ({1000 * dt:.0f} ms/step, batch {batch}x1024)")
    if peak:
        mfu = model.flops_per_token() * tok_s / peak
        row("train MFU", f"{100 * mfu:.1f}% of {peak / 1e12:.0f} TFLOP/s ({name})", ">= 35%", mfu >= 0.35)
    else:
        row("train MFU", f"unknown peak for {name!r} (add it to GPU_PEAK_FLOPS)", "", False)
    row("peak memory with compile", f"{human_bytes(torch.cuda.max_memory_allocated())} (the planner's eager "
        f"estimate: {human_bytes(est.total)})")


# ---- flash attention selected ----------------------------------------------------------------------------


def check_flash(args) -> None:
    import torch.nn.functional as F

    q = torch.randn(8, 12, 1024, 64, device="cuda", dtype=torch.bfloat16)
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            F.scaled_dot_product_attention(q, q, q, is_causal=True)
        row("flash SDPA usable (only flash allowed)", "yes", "yes", True)
    except Exception as exc:  # noqa: BLE001 - any refusal means flash is not usable here
        row("flash SDPA usable (only flash allowed)", f"no: {type(exc).__name__}: {str(exc)[:80]}", "yes", False)
    from torch.profiler import ProfilerActivity, profile

    config = DIYConfig(**GPT2_SMALL)
    model = DIYForCausalLM(config).cuda()
    x = torch.randint(0, config.vocab_size, (2, 1024), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        model(x)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(x)
            sync()
    kernels = {e.key for e in prof.key_averages()}
    flash = sorted(k for k in kernels if "flash" in k.lower())
    row("flash kernel in the model's forward", flash[0][:60] if flash else "none (" + ", ".join(
        sorted(k for k in kernels if "attention" in k.lower() or "fmha" in k.lower())[:2]) + ")", "a flash kernel",
        bool(flash))
    del model
    torch.cuda.empty_cache()


# ---- shakespeare_char recipe -------------------------------------------------------------------------------


def check_shakespeare(args, work: Path) -> None:
    text = Path(args.input) if args.input else REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
    data = work / "shakespeare_char"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "diyllm", "prepare", "shakespeare_char", "--out", str(data)]
    if text.is_file():
        cmd += ["--input", str(text)]
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True, timeout=300)
    out = work / "run_shakespeare"
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "diyllm", "train", "shakespeare_char", f"--data_dir={data}",
                           f"--out_dir={out}", "--progress=false", "--eval_interval=1000", "--log_interval=500"],
                          env=env, capture_output=True, text=True, timeout=args.shakespeare_timeout)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise RuntimeError(proc.stderr[-500:])
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
             if '"event": "eval"' in line]
    val = min(e["val_loss"] for e in evals)
    row("shakespeare_char val loss", f"{val:.4f} (best of {len(evals)} evals)", "<= 1.47", val <= 1.47)
    row("shakespeare_char wall time", f"{wall / 60:.1f} min (incl. compile, evals, process start)", "<= 3 min",
        wall <= 180)


# ---- FSDP2 on one GPU ----------------------------------------------------------------------------------------


def check_fsdp(args, work: Path) -> None:
    import torch.distributed as dist

    from diyllm.sharded_checkpoints import load_dcp_checkpoint, save_dcp_checkpoint
    from diyllm.training.fsdp import (
        build_sharded_model,
        clip_grad_norm_sharded_,
        device_mesh,
        enable_activation_checkpointing,
        shard_model,
    )

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        config = DIYConfig(vocab_size=8192, context_length=512, d_model=512, num_layers=8, num_heads=8,
                           num_kv_heads=4, tie_embeddings=True)
        mesh = device_mesh("cuda", 1)

        def shard(m):
            enable_activation_checkpointing(m)
            return shard_model(m, mesh, compute_dtype=torch.bfloat16)

        def build():
            model = build_sharded_model(config, torch.device("cuda"), shard)
            return model, AdamW(model.parameters(), lr=1e-3)

        def train(model, optimizer, n):
            losses = []
            for i in range(n):
                x = torch.randint(0, config.vocab_size, (8, 512), device="cuda",
                                  generator=torch.Generator("cuda").manual_seed(i))
                loss = model(x, targets=x).loss
                loss.backward()
                clip_grad_norm_sharded_(list(model.parameters()), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
            return losses

        torch.manual_seed(0)
        model, optimizer = build()
        losses = train(model, optimizer, 10)
        ckpt = work / "fsdp_latest"
        save_dcp_checkpoint(ckpt, model, optimizer, {"iteration": 10, "model_config": config.to_dict()})
        saved = {k: v.full_tensor().cpu() if hasattr(v, "full_tensor") else v.cpu()
                 for k, v in model.state_dict().items()}
        torch.manual_seed(1)
        fresh, fresh_opt = build()
        load_dcp_checkpoint(ckpt, fresh, fresh_opt)
        loaded = {k: v.full_tensor().cpu() if hasattr(v, "full_tensor") else v.cpu()
                  for k, v in fresh.state_dict().items()}
        exact = all(torch.equal(saved[k], loaded[k]) for k in saved)
        more = train(fresh, fresh_opt, 3)
        ok = losses[-1] < losses[0] and exact and all(map(torch.isfinite, map(torch.tensor, more)))
        row("FSDP2 1 GPU bf16 + act. ckpt: train, DCP save, load, continue",
            f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; reload exact={exact}; then {more[-1]:.3f}", "runs, exact", ok)
    finally:
        dist.destroy_process_group()


# ---- decode vs HF -------------------------------------------------------------------------------------------


def check_decode(args) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from diyllm.generation.generate import generate

    config = DIYConfig(vocab_size=32000, context_length=1024, d_model=768, num_layers=12, num_heads=12)
    torch.manual_seed(0)
    ours = DIYForCausalLM(config).cuda().to(torch.bfloat16).eval()
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.d_ff,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, max_position_embeddings=config.context_length,
        rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta, tie_word_embeddings=False)).cuda().to(
        torch.bfloat16).eval()
    prompt = torch.randint(0, config.vocab_size, (64,)).tolist()
    new = 256

    def run_ours():
        generate(ours, prompt, new, temperature=0)

    def run_hf():
        with torch.inference_mode():
            hf.generate(torch.tensor([prompt], device="cuda"), do_sample=False, max_new_tokens=new,
                        eos_token_id=None, pad_token_id=0, use_cache=True)

    times = {"diyllm": [], "hf": []}
    for fn in (run_ours, run_hf):  # warm-up
        fn()
    for _ in range(3):
        for name, fn in (("diyllm", run_ours), ("hf", run_hf)):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t)
    tps = {k: new / sorted(v)[1] for k, v in times.items()}
    ratio = tps["diyllm"] / tps["hf"]
    row("KV-cache decode (bf16, batch 1, 124M-like)", f"diyllm {tps['diyllm']:.0f} tok/s, HF generate "
        f"{tps['hf']:.0f} tok/s (x{ratio:.2f})", ">= 1.0x HF", ratio >= 1.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default="", help="tinyshakespeare.txt (default ../shared/data/, else download)")
    parser.add_argument("--skip", action="append", default=[],
                        choices=["train", "flash", "shakespeare", "fsdp", "decode"], help="skip a check (repeatable)")
    parser.add_argument("--batch", type=int, default=16, help="gpt2_small micro-batch for the speed check")
    parser.add_argument("--steps", type=int, default=20, help="timed gpt2_small steps")
    parser.add_argument("--shakespeare-timeout", type=int, default=300, help="seconds before the recipe is cut")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: gpu_check.py needs a GPU (nothing to check on CPU)")
        return 1
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | CUDA {torch.version.cuda}", flush=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        checks = [("train", lambda: check_train(args)), ("flash", lambda: check_flash(args)),
                  ("fsdp", lambda: check_fsdp(args, Path(tmp))), ("decode", lambda: check_decode(args)),
                  ("shakespeare", lambda: check_shakespeare(args, Path(tmp)))]
        for name, fn in checks:
            if name in args.skip:
                continue
            print(f"[{time.perf_counter() - start:5.0f}s] {name} ...", flush=True)
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - report and go on with the other checks
                traceback.print_exc()
                row(name, f"FAILED: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:100] if str(exc) else ''}",
                    "", False)
    total = time.perf_counter() - start
    widths = [max(len(r[i]) for r in ROWS + [("check", "measured", "target", "")]) for i in range(4)]
    print(f"\ngpu_check: {torch.cuda.get_device_name()}, torch {torch.__version__}, {total / 60:.1f} min")
    for r in [("check", "measured", "target", "")] + ROWS:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))
    return 0 if all(r[3] != "CHECK" for r in ROWS) else 1


if __name__ == "__main__":
    raise SystemExit(main())
