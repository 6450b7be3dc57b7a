"""A full training loop composed from the CS336-style building blocks in diyllm/adapters.py.

    python examples/adapters_loop.py            # ~1 minute on 2 cores
    python examples/adapters_loop.py --quick    # a few seconds

The order is the one a learner writes it in: data (a np.memmap over a token file) -> model -> optimizer
-> for each iteration: learning rate from the cosine schedule, get_batch, forward, cross_entropy,
backward, gradient clipping, AdamW step -> every few iterations a validation loss -> a checkpoint ->
resume from it. Every call is a `run_*` adapter from diyllm.adapters; diyllm's real trainer
(diyllm/training/trainer.py) does the same with more care (autocast, accumulation, exact resume, ...).

Before the loop it demonstrates a trap: `run_transformer_lm(..., weights=model.state_dict(), ...)`
builds a NEW model from copies of the weights, so `loss.backward()` never reaches *your* model —
`any(p.grad is not None for p in model.parameters())` is False and training it would do nothing.
"""

from __future__ import annotations

import argparse
import math
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np
import torch

from diyllm.adapters import (
    get_adamw_cls,
    run_cross_entropy,
    run_get_batch,
    run_get_lr_cosine_schedule,
    run_gradient_clipping,
    run_load_checkpoint,
    run_save_checkpoint,
    run_transformer_lm,
)
from diyllm.model import DIYConfig, DIYForCausalLM


def write_token_file(path: Path, max_bytes: int) -> int:
    """Byte-level tokens (ids 0..255) of some Python standard library source, as a uint16 token file."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = b"".join(p.read_bytes() for p in sorted(stdlib.glob("*.py"))[:40])[:max_bytes]
    tokens = np.memmap(path, dtype=np.uint16, mode="w+", shape=(len(text),))
    tokens[:] = np.frombuffer(text, dtype=np.uint8)  # one token per byte
    tokens.flush()
    return len(text)


def show_the_state_dict_trap(model: DIYForCausalLM, cfg: DIYConfig, x: torch.Tensor, y: torch.Tensor) -> bool:
    """The functional forward rebuilds the model from copies: no gradient reaches `model`."""
    logits = run_transformer_lm(cfg.vocab_size, cfg.context_length, cfg.d_model, cfg.num_layers, cfg.num_heads,
                                cfg.d_ff, cfg.rope_theta, weights=model.state_dict(), in_indices=x)
    run_cross_entropy(logits.reshape(-1, cfg.vocab_size), y.reshape(-1)).backward()
    reached = any(p.grad is not None for p in model.parameters())
    print(f"trap: run_transformer_lm(weights=model.state_dict()) then backward -> "
          f"any(p.grad is not None for p in model.parameters()) = {reached}")
    print("      (state_dict() hands out detached tensors; the adapter loads them into a new module)")
    model.zero_grad(set_to_none=True)
    return reached


def evaluate(model: DIYForCausalLM, val: np.ndarray, cfg: DIYConfig, batch_size: int, batches: int) -> float:
    model.eval()  # no dropout while measuring
    with torch.no_grad():  # no graph: evaluation needs no gradients
        losses = []
        for _ in range(batches):
            x, y = run_get_batch(val, batch_size, cfg.context_length, "cpu")
            losses.append(run_cross_entropy(model(x).logits.reshape(-1, cfg.vocab_size), y.reshape(-1)).item())
    model.train()
    return sum(losses) / len(losses)


def train(model, optimizer, train_data, val_data, cfg, args, start_iter: int, end_iter: int, ckpt: Path) -> float:
    val_loss = float("nan")
    for it in range(start_iter, end_iter):
        lr = run_get_lr_cosine_schedule(it, args.lr, args.lr / 10, args.warmup, args.iters)
        for group in optimizer.param_groups:  # the schedule sets the LR of every step
            group["lr"] = lr
        x, y = run_get_batch(train_data, args.batch_size, cfg.context_length, "cpu")  # random windows
        logits = model(x).logits  # (B, T, V): the model's own forward, so gradients reach its weights
        loss = run_cross_entropy(logits.reshape(-1, cfg.vocab_size), y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run_gradient_clipping(model.parameters(), 1.0)  # global L2 norm <= 1
        optimizer.step()
        if (it + 1) % args.eval_every == 0 or it + 1 == end_iter:
            val_loss = evaluate(model, val_data, cfg, args.batch_size, batches=4)
            print(f"iter {it + 1:4d}  lr {lr:.2e}  train loss {loss.item():.3f}  val loss {val_loss:.3f}")
            run_save_checkpoint(model, optimizer, it + 1, ckpt)  # weights + optimizer state + iteration
    return val_loss


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds instead of about a minute")
    parser.add_argument("--out", default=None, help="folder for the token files and checkpoint (default: a temp dir)")
    args = parser.parse_args(argv)
    args.iters, args.warmup, args.eval_every = (40, 4, 20) if args.quick else (300, 30, 50)
    args.lr, args.batch_size = 3e-3, 16
    torch.manual_seed(0)
    np.random.seed(0)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="adapters_loop_"))
    out.mkdir(parents=True, exist_ok=True)

    # 1. Data: a token file on disk, opened as a memmap: windows are read on demand, never the whole file.
    n = write_token_file(out / "tokens.bin", max_bytes=200_000 if args.quick else 1_000_000)
    data = np.memmap(out / "tokens.bin", dtype=np.uint16, mode="r")
    split = int(0.9 * n)
    train_data, val_data = data[:split], data[split:]
    print(f"data: {n:,} byte tokens in {out / 'tokens.bin'} (np.memmap), train {split:,}, val {n - split:,}")

    # 2. Model and optimizer.
    cfg = DIYConfig(vocab_size=256, context_length=64, d_model=64 if args.quick else 128, num_layers=2,
                    num_heads=4, d_ff=256)
    model = DIYForCausalLM(cfg)
    optimizer = get_adamw_cls()(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    x, y = run_get_batch(train_data, 4, cfg.context_length, "cpu")
    if show_the_state_dict_trap(model, cfg, x, y):
        return 1
    print(f"initial val loss {evaluate(model, val_data, cfg, args.batch_size, 4):.3f} (ln 256 = {math.log(256):.3f})")

    # 3. Train the first half, checkpointing as we go.
    ckpt = out / "ckpt.pt"
    half = args.iters // 2
    train(model, optimizer, train_data, val_data, cfg, args, 0, half, ckpt)

    # 4. Resume into a fresh model and optimizer, as after a crash: everything comes from the file.
    model2 = DIYForCausalLM(cfg)
    optimizer2 = get_adamw_cls()(model2.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    start = run_load_checkpoint(ckpt, model2, optimizer2)
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    print(f"resumed at iteration {start}: weights equal to the saved ones: {same}")
    final = train(model2, optimizer2, train_data, val_data, cfg, args, start, args.iters, ckpt)
    print(f"final val loss {final:.3f}: healthy is well below ln 256 = {math.log(256):.3f} "
          f"(about 2.5 or lower after the full run)")
    return 0 if same and final < math.log(256) else 1


if __name__ == "__main__":
    sys.exit(main())
