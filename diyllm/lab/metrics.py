"""Reading what a training run left behind: metrics.jsonl, or a plain text log.

Plotting and comparing only need a few series (train loss, val loss, lr, grad norm against step,
tokens and time), so every source is reduced to one small `RunMetrics` record. Plain logs of the
nanoGPT form ("step 250: train loss 1.98, val loss 2.07" and "iter 10: loss 2.5, time 30ms") are
read too, so runs from other codebases can be overlaid on diyllm's.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from diyllm.errors import UserError

LOG_SUFFIXES = (".log", ".txt")
_EVAL_LINE = re.compile(r"(?:step|iter)\s+(\d+):\s*train loss\s+([-+0-9.eEnaif]+),\s*val loss\s+([-+0-9.eEnaif]+)")
_TRAIN_LINE = re.compile(r"iter\s+(\d+):\s*loss\s+([-+0-9.eEnaif]+)(?:,\s*time\s+([0-9.]+)\s*ms)?")


@dataclass
class RunMetrics:
    """The series of one run. Train lists are aligned with each other, eval lists with each other."""

    name: str
    path: Path
    train_iter: list[int] = field(default_factory=list)
    train_tokens: list[float] = field(default_factory=list)
    train_time: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    tokens_per_sec: list[float] = field(default_factory=list)
    eval_iter: list[int] = field(default_factory=list)
    eval_tokens: list[float] = field(default_factory=list)
    eval_time: list[float] = field(default_factory=list)
    eval_train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_bpb: list[float] = field(default_factory=list)
    # benchmark evals during training (diyllm.eval, "eval_tasks" events): "hellaswag/acc_norm", "core", ...
    task_iter: list[int] = field(default_factory=list)
    task_tokens: list[float] = field(default_factory=list)
    task_time: list[float] = field(default_factory=list)
    task_scores: dict[str, list[float | None]] = field(default_factory=dict)
    task_primary: list[str] = field(default_factory=list)  # the keys worth a column / a curve
    config: dict = field(default_factory=dict)
    num_params: int | None = None
    end: dict | None = None  # the "end" event's summary; None while a run is unfinished
    final_eval: dict | None = None  # final_val_tokens: the last weights over the whole val split

    @property
    def finished(self) -> bool:
        return self.end is not None

    def series(self, metric: str, x: str = "step") -> tuple[list[float], list[float]]:
        """(xs, ys) of one metric; x is "step", "tokens" or "time" (seconds)."""
        train_metrics = {"train_loss": self.train_loss, "loss": self.train_loss, "lr": self.lr,
                         "grad_norm": self.grad_norm, "tokens_per_sec": self.tokens_per_sec}
        eval_metrics = {"val_loss": self.val_loss, "eval_train_loss": self.eval_train_loss, "val_bpb": self.val_bpb}
        if metric in self.task_scores:
            ys, xs_by = self.task_scores[metric], {"step": self.task_iter, "tokens": self.task_tokens,
                                                   "time": self.task_time}
        elif metric in train_metrics:
            ys, xs_by = train_metrics[metric], {"step": self.train_iter, "tokens": self.train_tokens,
                                                "time": self.train_time}
        elif metric in eval_metrics:
            ys, xs_by = eval_metrics[metric], {"step": self.eval_iter, "tokens": self.eval_tokens,
                                               "time": self.eval_time}
        else:
            known = sorted({*train_metrics, *eval_metrics, *self.task_scores})
            raise UserError(f"unknown metric {metric!r}; choose from {known}")
        if x not in xs_by:
            raise UserError(f"unknown x axis {x!r}; choose step, tokens or time")
        xs = xs_by[x]
        pairs = [(a, b) for a, b in zip(xs, ys) if a is not None and b is not None and math.isfinite(b)]
        return [a for a, _ in pairs], [b for _, b in pairs]


def _num(v) -> float | None:
    return None if v is None else float(v)


def _add_task_scores(run: RunMetrics, ev: dict) -> None:
    """One "eval_tasks" event: {"iter", "tokens", "time", "scores": {key: value}, "primary": [keys]}."""
    n = len(run.task_iter)
    run.task_iter.append(int(ev["iter"]))
    run.task_tokens.append(_num(ev.get("tokens")))
    run.task_time.append(_num(ev.get("time")))
    scores = ev.get("scores") or {}
    for key in scores.keys() | run.task_scores.keys():
        run.task_scores.setdefault(key, [None] * n).append(_num(scores.get(key)))
    for key in ev.get("primary") or ():
        if key not in run.task_primary:
            run.task_primary.append(key)


def read_metrics_jsonl(path: str | Path, name: str | None = None) -> RunMetrics:
    """Parse a metrics.jsonl file (schema: start / train / eval / final_eval / end events, one JSON object a line).

    A torn last line (the run was killed mid-write) is ignored; a bad line elsewhere is an error
    naming the file and line.
    """
    path = Path(path)
    run = RunMetrics(name=name or path.parent.name, path=path.parent)
    lines = path.read_text(encoding="utf-8").splitlines()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            ev = json.loads(line)
        except json.JSONDecodeError as exc:
            if lineno == len(lines):
                break  # a run killed mid-write leaves a partial last line
            raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg}); is this a diyllm metrics.jsonl?") from exc
        kind = ev.get("event")
        if kind == "start":
            run.config = ev.get("config") or {}
            run.num_params = ev.get("num_params")
            if name is None and ev.get("run_name"):
                run.name = str(ev["run_name"])
        elif kind == "train":
            run.train_iter.append(int(ev["iter"]))
            run.train_tokens.append(_num(ev.get("tokens")))
            run.train_time.append(_num(ev.get("time")))
            run.train_loss.append(_num(ev.get("loss")))
            run.lr.append(_num(ev.get("lr")))
            run.grad_norm.append(_num(ev.get("grad_norm")))
            run.tokens_per_sec.append(_num(ev.get("tokens_per_sec")))
        elif kind == "eval":
            run.eval_iter.append(int(ev["iter"]))
            run.eval_tokens.append(_num(ev.get("tokens")))
            run.eval_time.append(_num(ev.get("time")))
            run.eval_train_loss.append(_num(ev.get("train_loss")))
            run.val_loss.append(_num(ev.get("val_loss")))
            run.val_bpb.append(_num(ev.get("val_bpb")))
        elif kind == "eval_tasks":
            _add_task_scores(run, ev)
        elif kind == "final_eval":
            run.final_eval = ev
        elif kind == "end":
            run.end = ev
            if run.num_params is None and ev.get("num_params") is not None:
                run.num_params = int(ev["num_params"])
    return run


def read_text_log(path: str | Path, name: str | None = None) -> RunMetrics:
    """Parse a plain training log: "step N: train loss X, val loss Y" (evals) and "iter N: loss X" lines."""
    path = Path(path)
    run = RunMetrics(name=name or path.stem, path=path)
    elapsed = 0.0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        m = _EVAL_LINE.search(line)
        if m:
            run.eval_iter.append(int(m.group(1)))
            run.eval_train_loss.append(float(m.group(2)))
            run.val_loss.append(float(m.group(3)))
            run.eval_tokens.append(None)
            run.eval_time.append(elapsed)
            continue
        m = _TRAIN_LINE.search(line)
        if m:
            if m.group(3):
                elapsed += float(m.group(3)) / 1000.0  # ms of that iteration; an estimate of wall time
            run.train_iter.append(int(m.group(1)))
            run.train_loss.append(float(m.group(2)))
            run.train_time.append(elapsed if m.group(3) else None)
            for series in (run.train_tokens, run.lr, run.grad_norm, run.tokens_per_sec):
                series.append(None)
    if not run.train_iter and not run.eval_iter:
        raise UserError(
            f"{path}: found no lines like 'step N: train loss X, val loss Y' or 'iter N: loss X'; "
            "pass a diyllm run folder (with metrics.jsonl) or a nanoGPT-style log"
        )
    return run


def read_run(path: str | Path) -> RunMetrics:
    """A run folder (metrics.jsonl, else a single .log/.txt inside), a metrics.jsonl file, or a log file."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; pass a run folder (out_dir of `diyllm train`) or a log file")
    if path.is_dir():
        jsonl = path / "metrics.jsonl"
        if jsonl.is_file():
            return read_metrics_jsonl(jsonl, name=None if path.name else str(path))
        logs = sorted(p for p in path.iterdir() if p.suffix in LOG_SUFFIXES and p.is_file())
        if logs:
            return read_text_log(logs[0], name=path.name)
        raise UserError(f"{path} has no metrics.jsonl and no .log/.txt training log; has the run started?")
    if path.suffix == ".jsonl":
        return read_metrics_jsonl(path)
    return read_text_log(path)


def is_finished(out_dir: str | Path) -> bool:
    """True when a run folder has a DONE marker or its metrics.jsonl ends with an "end" event."""
    out_dir = Path(out_dir)
    if (out_dir / "DONE").exists():
        return True
    jsonl = out_dir / "metrics.jsonl"
    if not jsonl.is_file():
        return False
    try:
        return read_metrics_jsonl(jsonl).finished
    except UserError:
        return False
