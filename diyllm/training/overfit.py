"""The minimal training loop: can the model memorise one tiny batch?

A fixed 20-token sequence (seeded), a batch of 4 copies, and the five lines every training loop is made of:

    optimizer.zero_grad()
    logits = model(ids).logits
    loss = cross_entropy(logits[:, :-1], ids[:, 1:])   # predict token t+1 from tokens 0..t
    loss.backward()
    optimizer.step()

If the loss does not fall to ~0 here, something is broken in the model, the loss or the optimizer —
no amount of data will help. This is the first thing to run after changing any of them.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import torch

from diyllm.model import DIYConfig, DIYForCausalLM
from diyllm.training.loss import cross_entropy
from diyllm.training.optim import AdamW


@dataclass
class OverfitResult:
    losses: list[float]
    accuracy: float
    steps: int
    seconds: float


def overfit(
    steps: int = 300,
    seq_len: int = 20,
    batch_size: int = 4,
    vocab_size: int = 64,
    lr: float = 3e-3,
    seed: int = 1337,
    log_every: int = 25,
    verbose: bool = True,
) -> OverfitResult:
    """Train a tiny model on one repeated random sequence; return the loss curve and final accuracy."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    sequence = torch.randint(0, vocab_size, (seq_len,), generator=generator)
    ids = sequence.repeat(batch_size, 1)  # (B, T): four copies of one sequence
    config = DIYConfig(vocab_size=vocab_size, context_length=seq_len, d_model=64, num_layers=2, num_heads=4)
    model = DIYForCausalLM(config)
    optimizer = AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    if verbose:
        print(f"overfitting {model.num_parameters():,} parameters on one {seq_len}-token sequence x{batch_size}; "
              f"uniform-guess loss ln({vocab_size}) = {math.log(vocab_size):.3f}")
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        optimizer.zero_grad(set_to_none=True)
        logits = model(ids).logits
        loss = cross_entropy(logits[:, :-1], ids[:, 1:])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if verbose and (step % log_every == 0 or step == 1):
            print(f"step {step:4d}  loss {losses[-1]:.4f}")
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        predictions = model(ids[:1]).logits[0, :-1].argmax(-1)
    accuracy = (predictions == ids[0, 1:]).float().mean().item()
    if verbose:
        print(f"done in {seconds:.1f}s ({steps / seconds:.0f} steps/s): final loss {losses[-1]:.4f}, "
              f"next-token accuracy {accuracy:.0%}")
    return OverfitResult(losses, accuracy, steps, seconds)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default 3e-3)")
    parser.add_argument("--seed", type=int, default=1337, help="seeds the sequence and the init")
    parser.add_argument("--log_every", type=int, default=25, help="print the loss every N steps")


def run(args: argparse.Namespace) -> int:
    result = overfit(steps=args.steps, lr=args.lr, seed=args.seed, log_every=args.log_every)
    return 0 if result.accuracy == 1.0 else 1
