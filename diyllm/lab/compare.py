"""Compare finished (or running) runs side by side: final/best losses, the overfitting gap, speed, size.

    diyllm compare runs/sweep_lr/*  --out compare.md

The gap column is val − train loss at the last evaluation (both measured the same way, in eval mode
over eval_iters batches): near 0 means the model generalises; a growing positive gap is overfitting.
Runs trained with final_val_tokens get a "val, whole split" column: the last weights over the val split.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from diyllm.atomic import atomic_write
from diyllm.lab.metrics import RunMetrics, read_run


@dataclass
class RunSummary:
    name: str
    final_train_loss: float | None
    final_val_loss: float | None
    best_val_loss: float | None
    gap: float | None  # val − train at the last eval
    tokens_per_sec: float | None
    wall_time_s: float | None
    num_params: int | None
    iterations: int | None
    finished: bool
    eval_scores: dict[str, float] = field(default_factory=dict)  # last benchmark scores (eval_tasks)
    split_val_loss: float | None = None  # final_val_tokens: the last weights over the whole val split


def _last(xs: list) -> float | None:
    vals = [x for x in xs if x is not None]
    return vals[-1] if vals else None


def summarize(run: RunMetrics) -> RunSummary:
    """Reduce a run's series to the numbers worth comparing (the "end" event fills what the series lack)."""
    end = run.end or {}
    final_train = _last(run.eval_train_loss)
    if final_train is None:
        final_train = end.get("final_train_loss", _last(run.train_loss))
    final_val = _last(run.val_loss)
    if final_val is None:
        final_val = end.get("final_val_loss")
    vals = [v for v in run.val_loss if v is not None]
    best_val = min(vals) if vals else end.get("best_val_loss")
    gap = final_val - final_train if final_val is not None and final_train is not None else None
    speeds = [s for s in run.tokens_per_sec if s]
    wall = end.get("wall_time_s")
    if wall is None:
        times = [t for t in (*run.train_time, *run.eval_time) if t is not None]
        wall = max(times) if times else None
    tokens = end.get("tokens_seen")
    if speeds:
        tps = statistics.median(speeds)
    elif tokens and wall:
        tps = tokens / wall
    else:
        tps = None
    iters = end.get("iterations")
    if iters is None:
        its = run.train_iter + run.eval_iter
        iters = max(its) if its else None
    scores = {k: v for k in run.task_primary if (v := _last(run.task_scores.get(k, []))) is not None}
    return RunSummary(run.name, final_train, final_val, best_val, gap, tps, wall, run.num_params or
                      end.get("num_params"), iters, run.finished, scores,
                      (run.final_eval or {}).get("val_loss"))


def _fmt(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def _fmt_params(n: int | None) -> str:
    if n is None:
        return "–"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def markdown_table(summaries: list[RunSummary]) -> str:
    """A GitHub-markdown table, one row per run, best val loss marked with *; benchmark columns (last
    eval_tasks scores) when a run has them."""
    eval_keys = list(dict.fromkeys(k for s in summaries for k in s.eval_scores))
    split = any(s.split_val_loss is not None for s in summaries)  # a column only when some run has it
    header = ("| run | params | iters | final train | final val | best val | gap val−train | tokens/s | wall s |"
              + (" val, whole split |" if split else "") + "".join(f" {k} |" for k in eval_keys) + "\n"
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * (len(eval_keys) + split))
    bests = [s.best_val_loss for s in summaries if s.best_val_loss is not None]
    winner = min(bests) if bests else None
    rows = []
    for s in summaries:
        star = " *" if winner is not None and s.best_val_loss == winner and len(summaries) > 1 else ""
        name = s.name + ("" if s.finished else " (unfinished)")
        rows.append(
            f"| {name} | {_fmt_params(s.num_params)} | {_fmt(s.iterations, 'd')} | {_fmt(s.final_train_loss, '.4f')}"
            f" | {_fmt(s.final_val_loss, '.4f')} | {_fmt(s.best_val_loss, '.4f')}{star} | {_fmt(s.gap, '+.4f')}"
            f" | {_fmt(s.tokens_per_sec, ',.0f')} | {_fmt(s.wall_time_s, '.1f')} |"
            + (f" {_fmt(s.split_val_loss, '.4f')} |" if split else "")
            + "".join(f" {_fmt(s.eval_scores.get(k), '.4f')} |" for k in eval_keys)
        )
    return "\n".join([header, *rows]) + "\n"


def compare_runs(paths: list[str | Path], out: str | Path | None = None, analysis: bool = False,
                 samples: bool = False) -> str:
    """Read each run, print nothing, return the markdown table (and write it to `out` when given).

    With `analysis`, the table is followed by a verdict per run (diyllm.lab.verdict) and, with
    `samples`, by a few samples from each run's checkpoint."""
    runs = [read_run(p) for p in paths]
    table = markdown_table([summarize(r) for r in runs])
    if analysis:
        from diyllm.lab.verdict import analysis_markdown

        table += analysis_markdown(runs, with_samples=samples)
    if out is not None:
        with atomic_write(out, "w", encoding="utf-8") as f:
            f.write(table)
    return table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", help="run folders (with metrics.jsonl) or nanoGPT-style log files")
    parser.add_argument("--out", default=None, help="also save the table to this markdown file")
    parser.add_argument("--no_analysis", action="store_true",
                        help="only the table, without the verdict per run (start, trend, gap, vs the first run)")
    parser.add_argument("--samples", action="store_true", help="add a few samples from each run's checkpoint")


def run(args: argparse.Namespace) -> int:
    table = compare_runs(args.runs, args.out, analysis=not args.no_analysis, samples=args.samples)
    print(table, end="")
    print("gap = val − train loss at the last eval (positive and growing: overfitting)")
    if args.out:
        print(f"saved {args.out}")
    return 0
