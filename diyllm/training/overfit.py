"""The minimal training loop: can the model memorise one tiny batch?

A fixed batch of 20-token sequences (seeded) and the five lines every training loop is made of:

    optimizer.zero_grad()
    logits = model(input_ids).logits
    loss = cross_entropy(logits, labels)   # labels[t] = input_ids[t+1]: predict the next token
    loss.backward()
    optimizer.step()

If the loss does not fall to ~0 here, something is broken in the model, the loss or the optimizer —
no amount of data will help. This is the first thing to run after changing any of them.

Three batches (`--mode`):
  same       method A: four copies of one sequence (the easiest thing to memorise)
  different  method B: four different sequences, each starting with its own token (the model must tell
             them apart from the first token on)
  padded     four sequences of different lengths, padded to the longest with a pad token; the labels of
             the padding are -100 (ignore_index), so padding never counts in the loss or the accuracy
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from diyllm.errors import UserError
from diyllm.model import DIYConfig, DIYForCausalLM
from diyllm.training.loss import cross_entropy
from diyllm.training.optim import AdamW

MODES = ("same", "different", "padded")
IGNORE_INDEX = -100  # a label the loss skips (padding, prompt tokens in SFT)


@dataclass
class OverfitResult:
    losses: list[float]
    accuracy: float  # next-token accuracy over the counted (non-ignored) labels
    steps: int
    seconds: float
    shapes: dict[str, tuple[int, ...]]  # input_ids / labels / logits, as printed at the start


def make_batch(
    mode: str, batch_size: int, seq_len: int, vocab_size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels), both (B, T-1): labels are input_ids shifted left by one token.

    In "padded" mode token id 0 is the pad token (never drawn as content), row i keeps
    seq_len - 3*i real tokens and its padded positions get the label IGNORE_INDEX."""
    if mode not in MODES:
        raise UserError(f"--mode {mode!r}: expected one of {', '.join(MODES)}")
    generator = torch.Generator().manual_seed(seed)
    if mode == "same":
        ids = torch.randint(0, vocab_size, (seq_len,), generator=generator).repeat(batch_size, 1)
    else:
        low = 1 if mode == "padded" else 0  # keep id 0 for padding
        ids = torch.randint(low, vocab_size, (batch_size, seq_len), generator=generator)
        # Distinct first tokens: with two rows starting alike, "what follows token 1" would have two
        # right answers and the loss could not reach 0.
        ids[:, 0] = low + torch.randperm(vocab_size - low, generator=generator)[:batch_size]
    input_ids, labels = ids[:, :-1].clone(), ids[:, 1:].clone()
    if mode == "padded":
        for row in range(batch_size):
            length = max(seq_len - 3 * row, 2)  # real tokens in this row, counting the first
            input_ids[row, length - 1:] = 0  # pad token
            labels[row, length - 1:] = IGNORE_INDEX  # padding is never a target
    return input_ids, labels


def overfit(
    steps: int = 300,
    seq_len: int = 20,
    batch_size: int = 4,
    vocab_size: int = 64,
    lr: float = 3e-3,
    seed: int = 1337,
    log_every: int = 25,
    mode: str = "same",
    verbose: bool = True,
) -> OverfitResult:
    """Train a tiny model on one fixed batch; return the loss curve and the final accuracy."""
    input_ids, labels = make_batch(mode, batch_size, seq_len, vocab_size, seed)
    torch.manual_seed(seed)  # the same seed -> the same initial weights -> the same losses
    config = DIYConfig(vocab_size=vocab_size, context_length=seq_len, d_model=64, num_layers=2, num_heads=4)
    model = DIYForCausalLM(config)
    optimizer = AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    with torch.no_grad():
        first_logits = model(input_ids).logits
    shapes = {"input_ids": tuple(input_ids.shape), "labels": tuple(labels.shape), "logits": tuple(first_logits.shape)}
    counted = int((labels != IGNORE_INDEX).sum())
    if verbose:
        print(f"overfitting {model.num_parameters():,} parameters on one batch (mode {mode}, seed {seed}); "
              f"uniform-guess loss ln({vocab_size}) = {math.log(vocab_size):.3f}")
        print(f"shapes: input_ids {shapes['input_ids']}  labels {shapes['labels']}  logits {shapes['logits']}"
              f"  (batch, time[, vocab]); {counted} of {labels.numel()} labels count")
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        optimizer.zero_grad(set_to_none=True)
        logits = model(input_ids).logits  # (B, T, V): a score for every possible next token
        loss = cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)  # mean over counted labels
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if verbose and (step % log_every == 0 or step == 1):
            print(f"step {step:4d}  loss {losses[-1]:.4f}")
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        predictions = model(input_ids).logits.argmax(-1)
    keep = labels != IGNORE_INDEX
    accuracy = (predictions[keep] == labels[keep]).float().mean().item()
    if verbose:
        print(f"done in {seconds:.1f}s ({steps / seconds:.0f} steps/s): final loss {losses[-1]:.4f}, "
              f"next-token accuracy {accuracy:.0%}")
    return OverfitResult(losses, accuracy, steps, seconds, shapes)


def plot_losses(losses: list[float], out: str | Path, title: str) -> Path:
    """The loss curve (log scale: the interesting part is the last orders of magnitude) as a PNG."""
    from diyllm.lab.common import save_png
    from diyllm.lab.plot import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set_yscale("log")
    ax.set(xlabel="step", ylabel="training loss (log scale)", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_png(fig, out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default 3e-3)")
    parser.add_argument("--seed", type=int, default=1337, help="seeds the batch and the init (default 1337)")
    parser.add_argument("--mode", choices=MODES, default="same",
                        help="same: copies of one sequence (method A); different: different sequences (method B); "
                             "padded: sequences of different lengths, padding labelled -100 (ignore_index)")
    parser.add_argument("--log_every", type=int, default=25, help="print the loss every N steps")
    parser.add_argument("--plot", default="runs/overfit/loss.png", help="loss-curve PNG ('' for none)")
    parser.add_argument("--no_repro_check", action="store_true",
                        help="skip the second run that checks the same seed gives identical losses")


def run(args: argparse.Namespace) -> int:
    if args.steps < 1:
        raise UserError(f"--steps {args.steps}: need at least 1 step")
    if args.seed < 0:
        raise UserError(f"--seed {args.seed}: a seed is a non-negative integer")
    result = overfit(steps=args.steps, lr=args.lr, seed=args.seed, log_every=args.log_every, mode=args.mode)
    if args.plot:
        out = plot_losses(result.losses, args.plot, f"overfit one batch (mode {args.mode}, seed {args.seed})")
        print(f"loss curve: {out}")
    if not args.no_repro_check:
        again = overfit(steps=args.steps, lr=args.lr, seed=args.seed, mode=args.mode, verbose=False)
        same = again.losses == result.losses
        print(f"same seed -> identical losses: {'yes' if same else 'NO'} (second run of {args.steps} steps)")
        if not same:
            return 1
    return 0 if result.accuracy == 1.0 else 1
