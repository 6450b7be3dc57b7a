"""Run logging: human lines on the console, `metrics.jsonl` for tools, optional TensorBoard / W&B.

metrics.jsonl holds one JSON object per line, flushed as it is written, so `diyllm plot` can read a run
that is still going (or that was killed). Events: "start" (config, num_params, run_name), "train"
(iter, tokens, time, loss, lr, grad_norm, ms_per_iter, tokens_per_sec, mfu?), "eval" (iter, tokens, time,
train_loss, val_loss, val_bpb), "resume", "nonfinite", and "end" (the run summary). "time" is seconds
since the run started (resumed runs continue the count) and "tokens" the tokens trained on so far.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from diyllm.atomic import atomic_write

# Dense (no sparsity) bf16/fp16 tensor-core peak FLOP/s per GPU, from the vendors' datasheets. Matched
# against torch.cuda.get_device_name() in order, so the more specific names come first.
GPU_PEAK_FLOPS: list[tuple[str, float]] = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),
    ("T4", 65e12),
]


def peak_flops(device: torch.device, configured: float = 0.0) -> float | None:
    """Peak FLOP/s of one device for MFU: the configured value, else the GPU table; None if unknown."""
    if configured > 0:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in GPU_PEAK_FLOPS:
        if key in name:
            return flops
    return None


def format_train_line(rec: dict[str, Any], max_iters: int) -> str:
    parts = [
        f"iter {rec['iter']:>{len(str(max_iters))}}/{max_iters}",
        f"loss {rec['loss']:.4f}",
        f"lr {rec['lr']:.2e}",
        f"grad {rec['grad_norm']:.3f}",
        f"{rec['ms_per_iter']:.1f} ms/iter",
        f"{_human(rec['tokens_per_sec'])} tok/s",
    ]
    if rec.get("mfu") is not None:
        parts.append(f"mfu {100 * rec['mfu']:.1f}%")
    return " | ".join(parts)


def format_eval_line(rec: dict[str, Any]) -> str:
    train = f"train loss {rec['train_loss']:.4f} | " if rec.get("train_loss") is not None else ""
    line = f"eval @ {rec['iter']}: {train}val loss {rec['val_loss']:.4f}"
    if rec.get("val_bpb") is not None:
        line += f" | val bpb {rec['val_bpb']:.4f}"
    return line


def format_final_eval_line(rec: dict[str, Any]) -> str:
    line = f"final eval @ {rec['iter']}: val loss {rec['val_loss']:.4f}"
    if rec.get("val_bpb") is not None:
        line += f" | val bpb {rec['val_bpb']:.4f}"
    return line + f" over {rec['val_tokens']:,} val tokens, each scored once ({rec['seconds']:.1f}s)"


def _human(x: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


class MetricsLogger:
    """Writes the run's event stream; does nothing when `enabled` is False (non-zero DDP ranks)."""

    def __init__(self, out_dir: str | os.PathLike, enabled: bool = True, tensorboard: bool = False,
                 wandb_project: str = "", run_name: str = "", config: dict | None = None,
                 resume_iter: int | None = None):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._file = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_iter is not None:
            truncate_after(self.path, resume_iter)
        else:
            self.path.unlink(missing_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the whole run
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"))
            except ImportError as exc:
                warnings.warn(f"tensorboard=true but TensorBoard is not installed ({exc}); "
                              "`pip install tensorboard` or set tensorboard=false", stacklevel=2)
        if wandb_project:
            try:
                import wandb

                self._wandb = wandb.init(project=wandb_project, name=run_name or None, config=config,
                                         resume="allow")
            except ImportError as exc:
                warnings.warn(f"wandb_project is set but wandb is not installed ({exc}); `pip install wandb`",
                              stacklevel=2)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled or self._file is None:
            return
        record = _clean(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = record.get("iter")
        scalars = {f"{record['event']}/{k}": v for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("iter", "event")}
        if self._tb is not None and step is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None and step is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def truncate_after(path: Path, iteration: int) -> None:
    """Drop the records of iterations after `iteration` (a run that was cut off after its last
    checkpoint), so a resumed run's metrics read as one clean curve."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        if rec.get("event") == "end":
            continue
        if rec.get("iter") is None or rec["iter"] <= iteration:
            kept.append(line)
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write("".join(k + "\n" for k in kept))


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl (a run folder is accepted too); a torn last line is ignored."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
