"""The loop's periodic parts, each deciding for itself when it acts: evaluation, checkpoints, early
stopping, and the stop signal. The loop asks `due(...)`; the rules live here, not in the loop body.
"""

from __future__ import annotations

import copy
import math
import signal
import threading
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn

from diyllm.training.device import autocast_context
from diyllm.training.distributed import DistInfo, all_reduce_mean
from diyllm.training.loop_state import LoopState
from diyllm.training.objective import Objective


class Evaluator:
    """Every `interval` iterations (and at the end): mean train and val loss over `iters` batches each,
    averaged over ranks, plus val bits per byte. `train=False` skips the train estimate (half the cost;
    the record then has no train_loss, and the step losses stand in for it).

    The train-split batches are drawn and then the source is rewound, so evaluating never changes the
    training batch sequence; the val split has its own stream (saved in checkpoints)."""

    def __init__(self, source: Any, objective: Objective, *, interval: int, iters: int, batch_size: int,
                 max_iters: int, device: torch.device, dtype: torch.dtype, dist: DistInfo,
                 bytes_per_token: float | None, train: bool = True):
        self.source, self.objective, self.splits = source, objective, ("train", "val") if train else ("val",)
        self.interval, self.iters, self.batch_size, self.max_iters = interval, iters, batch_size, max_iters
        self.device, self.dtype, self.dist, self.bytes_per_token = device, dtype, dist, bytes_per_token

    def due(self, state: LoopState) -> bool:
        it = state.iteration
        at = (self.interval and it % self.interval == 0) or it >= self.max_iters
        return bool(at) and it != state.last_eval_iter  # a resumed run does not redo its last eval

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        out = {}  # split -> mean loss
        snapshot = copy.deepcopy(self.source.state_dict()) if "train" in self.splits else None
        for split in self.splits:
            losses = torch.zeros(self.iters, device=self.device)
            for k in range(self.iters):
                batch = self.source.get_batch(split, self.batch_size, self.device)
                with autocast_context(self.device, self.dtype):
                    losses[k] = self.objective.eval_loss(model, batch).float()
            if split == "train":
                self.source.load_state_dict(snapshot)
            out[split] = all_reduce_mean(losses.mean(), self.dist).item()
        model.train(was_training)
        bpb = out["val"] / math.log(2) / self.bytes_per_token if self.bytes_per_token else None
        return {**{f"{split}_loss": loss for split, loss in out.items()}, "val_bpb": bpb}


class FinalSplitEval:
    """At the end of a run: the val loss over the val split's first `max_tokens` tokens (all of it when it
    is shorter), every token scored once, in consecutive windows of the context length.

    The periodic evaluation scores `eval_iters` random windows: quick, but on the speedrun recipe ten
    batches scatter by ±0.02–0.04 around the split's loss, and since the val stream is seeded, the last
    evaluation of every run of a config lands on the same windows. This is the number to report.
    A window's first tokens see little context, as in any fixed-window evaluation (no sliding overlap).

    Each rank scores every world_size-th window. All ranks run the same number of batches of the same
    shape (a rank short of windows repeats one, its targets ignored), because an FSDP forward is a collective.
    Bits per byte count the bytes of exactly the scored targets, through `tokenizer` (or meta.json's
    "bytes_per_token"); without either there is no val_bpb.
    """

    def __init__(self, tokens: Any, context_length: int, max_tokens: int, batch_size: int, objective: Objective,
                 device: torch.device, dtype: torch.dtype, dist: DistInfo, tokenizer: Any = None,
                 meta: dict | None = None):
        n = min(len(tokens) - 1, max_tokens) // context_length * context_length
        self.tokens, self.context_length, self.batch_size = tokens, context_length, batch_size
        self.objective = objective
        self.starts = np.arange(0, n, context_length)
        self.device, self.dtype, self.dist = device, dtype, dist
        self.tokenizer, self.meta = tokenizer, meta or {}

    @property
    def num_tokens(self) -> int:
        return len(self.starts) * self.context_length

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float | None]:
        from diyllm.data.batch import windows_at
        from diyllm.training.data_source import estimate_bytes_per_token

        was_training = model.training
        model.eval()
        world, rank = self.dist.world_size, self.dist.rank
        mine = np.arange(-(-len(self.starts) // world)) * world + rank  # this rank's window numbers
        starts = self.starts[np.minimum(mine, len(self.starts) - 1)]
        total = torch.zeros(2, dtype=torch.float64, device=self.device)  # summed loss, scored tokens
        for i in range(0, len(mine), self.batch_size):
            x, y = windows_at(self.tokens, starts[i : i + self.batch_size], self.context_length, self.device)
            keep = torch.as_tensor(mine[i : i + self.batch_size] < len(self.starts), device=self.device)
            y = y.masked_fill(~keep[:, None], -100)  # a repeated window only keeps the ranks in step
            count = keep.sum().double() * self.context_length
            with autocast_context(self.device, self.dtype):
                loss = self.objective.eval_loss(model, (x, y, None)).double()  # mean over the kept targets
            total += torch.stack([loss * count, count])
        if self.dist.enabled:
            torch_dist.all_reduce(total)
        model.train(was_training)
        loss_sum, count = total.tolist()
        val_loss = loss_sum / count
        # read here, not at setup: the scored targets may be a large slice of a large split
        targets = self.tokens[1 : self.num_tokens + 1]
        bytes_per_token = estimate_bytes_per_token(self.tokenizer, targets, self.meta, max_tokens=len(targets))
        bpb = val_loss / math.log(2) / bytes_per_token if bytes_per_token else None
        return {"val_loss": val_loss, "val_bpb": bpb, "val_tokens": int(count)}


class EarlyStopping:
    """Tracks the best val loss in the LoopState; says stop after `patience` evals without a new best
    (patience 0: never)."""

    def __init__(self, patience: int):
        self.patience = patience

    def update(self, state: LoopState, val_loss: float) -> tuple[bool, bool]:
        """(improved, stop) after an evaluation with this val loss."""
        if val_loss < state.best_val_loss:
            state.best_val_loss, state.evals_since_best = val_loss, 0
            return True, False
        state.evals_since_best += 1
        return False, bool(self.patience and state.evals_since_best >= self.patience)


class CheckpointSchedule:
    """latest.pt every `interval` iterations (0: only at the end) and whenever the run ends."""

    def __init__(self, interval: int, start_iteration: int):
        self.interval, self.start = interval, start_iteration

    def due(self, state: LoopState, ending: bool) -> bool:
        it = state.iteration
        return ending or bool(self.interval and it % self.interval == 0 and it != self.start)


class StopSignal:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, checkpoints, and exits. A second SIGINT
    interrupts at once (the last complete checkpoint stays valid: files are replaced atomically)."""

    def __init__(self, log):
        self.requested = False
        self.signum = 0  # the first signal received (the CLI exits with 128 + it)
        self.log = log
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = self.signum or int(signum)
        self.log(f"\n{signal.Signals(signum).name} received: finishing this step, saving a checkpoint, then "
                 "exiting (Ctrl-C again to abort now)")

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
