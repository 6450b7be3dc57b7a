"""What the trainer prints and logs besides the per-step numbers: the run header, the train record with
its throughput, the closing line. Kept apart so the loop itself stays short."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from diyllm.checkpoints import unwrap_model
from diyllm.model import cpu_matmul
from diyllm.training.newton_schulz import newton_schulz_dtype


@dataclass
class TrainResult:
    out_dir: str
    iterations: int
    tokens_seen: int
    best_val_loss: float
    final_train_loss: float
    final_val_loss: float
    wall_time_s: float
    num_params: int
    stopped_early: bool
    stop_reason: str = ""  # "" (ran to max_iters) | "early_stopping" | "signal"
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss/gradient
    stop_signal: int = 0  # the signal number when stop_reason == "signal" (the CLI exits with 128 + it)
    final_split_val_loss: float = math.nan  # final_val_tokens: the last weights over the val split
    final_split_val_bpb: float | None = None


class ThroughputWindow:
    """Time spent in train steps since the last train record: ms/iter and tokens/s for the next one."""

    def __init__(self) -> None:
        self.seconds, self.steps = 0.0, 0

    def add(self, seconds: float) -> None:
        self.seconds += seconds
        self.steps += 1

    def take(self, tokens_per_iter: int) -> tuple[float, float]:
        """(ms per iteration, tokens per second) over the window; then start a new window."""
        ms = 1000 * self.seconds / max(self.steps, 1)
        tok_s = tokens_per_iter * self.steps / self.seconds if self.seconds > 0 else 0.0
        self.seconds, self.steps = 0.0, 0
        return ms, tok_s


def header_lines(t: Any) -> list[str]:
    """The run's description at start: config, model size, device, batch arithmetic (t: a Trainer)."""
    cfg = t.cfg
    m = unwrap_model(t.model)
    non_emb = m.num_parameters(include_embeddings=False) if hasattr(m, "num_parameters") else t.num_params
    lines = [
        f"diyllm train: run {t.run_name!r} -> {t.out_dir}",
        "config (* = changed from the defaults):",
        cfg.pretty(),
        f"model: {t.num_params / 1e6:.2f}M parameters ({non_emb / 1e6:.2f}M without the input embedding), "
        f"vocab {t.model_config.vocab_size}, context {t.model_config.context_length}",
        f"device {t.device}, dtype {str(t.dtype).replace('torch.', '')}, compile "
        f"{'on' if t.compiled is not None else 'off'}, processes {t.dist.world_size}"
        + (f", float32 matmuls {cpu_matmul.describe()}" if t.device.type == "cpu" else ""),
        f"batch: {cfg.batch_size} seqs x {t.accum} micro-steps x {t.dist.world_size} processes = "
        f"{t.tokens_per_iter:,} tokens/iter; {cfg.max_iters} iters = {t.tokens_per_iter * cfg.max_iters:,} tokens",
    ]
    if getattr(t, "memory_report", None):
        lines.append(t.memory_report)
    if cfg.optimizer == "muon":
        lines.append(muon_line(t.optimizer, t.device))
    if cfg.parallelism == "fsdp" and not t.dist.enabled:
        lines.append("note: parallelism=fsdp on one process trains as a plain single process (nothing to shard "
                     "over); checkpoints are still sharded folders (latest/, best/) that resume on any count")
    elif getattr(t.parallel, "name", "") == "fsdp":
        lines.append(f"fsdp: weights, gradients and optimizer state sharded over {t.dist.world_size} ranks"
                     + (f" (HSDP: {cfg.fsdp_replicas} replica groups)" if cfg.fsdp_replicas > 1 else ""))
    if t.resumed:
        lines.append(f"resuming from {t.ckpt_path} at iteration {t.state.iteration}")
    elif cfg.init_from not in ("scratch", "resume"):
        lines.append(f"initialised from {cfg.init_from} (fresh optimizer)")
    return lines


def muon_line(optimizer: torch.optim.Optimizer, device: torch.device) -> str:
    """What Muon runs on, and in which precision: bfloat16 on a CPU without it in hardware is 20-40x slower."""
    groups = [g for g in optimizer.param_groups if g.get("use_muon")]
    matrices = sum(len(g["params"]) for g in groups)
    asked = groups[0]["ns_dtype"] if groups else None
    dtype = str(asked or newton_schulz_dtype(device.type)).replace("torch.", "")
    why = "muon_ns_dtype" if asked else ("auto: native here" if dtype == "bfloat16" else
                                         f"auto: this {device.type} has no native bfloat16 matmul")
    return f"optimizer: muon on {matrices} hidden matrices (Newton-Schulz in {dtype}, {why}), adamw on the rest"


def initial_loss_line(loss: float, vocab_size: int) -> str:
    return (f"initial loss {loss:.4f} (a uniform guess over {vocab_size} tokens scores ln(vocab) = "
            f"{math.log(vocab_size):.4f})")


def footer_line(r: TrainResult) -> str:
    how = {"": "done", "signal": "stopped by signal", "early_stopping": "stopped early"}[r.stop_reason]
    return (f"{how}: {r.iterations} iterations, {r.tokens_seen:,} tokens in {r.wall_time_s:.1f}s; "
            f"best val loss {r.best_val_loss:.4f}"
            + ("" if math.isnan(r.final_split_val_loss) else f", final over the val split {r.final_split_val_loss:.4f}")
            + f"; checkpoints in {r.out_dir}"
            + (f"; {r.skipped_steps} non-finite steps skipped" if r.skipped_steps else ""))
