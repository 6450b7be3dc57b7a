"""Plot loss curves (and LR / grad-norm panels) of one or more runs into a PNG you can open.

    diyllm plot runs/demo
    diyllm plot runs/sweep_lr/* --x tokens --panels loss,lr,grad_norm --out lr_sweep.png

Train loss is drawn thin and val loss thick in the same colour, so the gap between them (overfitting)
is visible at a glance; runs are told apart by colour, named in the legend.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diyllm.errors import UserError
from diyllm.lab.common import save_png
from diyllm.lab.metrics import RunMetrics, read_run

PANELS = ("loss", "lr", "grad_norm", "val_bpb", "tokens_per_sec", "eval_tasks")
X_LABELS = {"step": "iteration", "tokens": "tokens seen", "time": "wall-clock seconds"}


def _pyplot():
    """matplotlib with the file-only Agg backend (works without a display, e.g. over ssh or in CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_runs(
    runs: list[RunMetrics],
    out: str | Path,
    x: str = "step",
    panels: tuple[str, ...] | list[str] = ("loss",),
    metric: str | None = None,
    title: str | None = None,
    log_y: bool = False,
) -> Path:
    """Draw `panels` (stacked, shared x) for every run and save a PNG at `out`.

    The "loss" panel shows train and val loss; `metric` (e.g. "val_loss") restricts it to one series.
    """
    bad = [p for p in panels if p not in PANELS]
    if bad:
        raise UserError(f"unknown panel(s) {bad}; choose from {', '.join(PANELS)}")
    if x not in X_LABELS:
        raise UserError(f"unknown --x {x!r}; choose step, tokens or time")
    plt = _pyplot()
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 3.2 * len(panels) + 0.6), sharex=True, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drew_anything = False
    for ax, panel in zip(axes[:, 0], panels):
        for i, run in enumerate(runs):
            c = colors[i % len(colors)]
            if panel == "loss":
                series = [metric] if metric else ["train_loss", "val_loss"]
                for m in series:
                    xs, ys = run.series(m, x)
                    if not xs:
                        continue
                    is_val = m.startswith("val")
                    label = f"{run.name} {'val' if is_val else 'train'}" if not metric else run.name
                    ax.plot(xs, ys, color=c, lw=2.0 if is_val else 0.9, alpha=1.0 if is_val else 0.55,
                            marker="o" if is_val and len(xs) < 30 else None, ms=3, label=label)
                    drew_anything = True
                    at = (run.final_eval or {}).get({"step": "iter"}.get(x, x)) if m == "val_loss" else None
                    if at is not None:  # final_val_tokens: the last weights over the whole val split
                        ax.plot(at, run.final_eval["val_loss"], color=c, marker="*", ms=11, ls="none",
                                label=f"{run.name} val, whole split")
                ax.set_ylabel(metric or "loss (nats/token)")
                if log_y:
                    ax.set_yscale("log")
            elif panel == "eval_tasks":  # benchmark scores during training (eval_tasks in the config)
                for j, key in enumerate(run.task_primary):
                    xs, ys = run.series(key, x)
                    if xs:
                        ax.plot(xs, ys, color=c, lw=1.5, marker="o", ms=3, ls=("-", "--", ":", "-.")[j % 4],
                                label=f"{run.name} {key}" if len(runs) > 1 else key)
                        drew_anything = True
                ax.set_ylabel("eval score")
            else:
                xs, ys = run.series(panel, x)
                if xs:
                    ax.plot(xs, ys, color=c, lw=1.0, label=run.name)
                    drew_anything = True
                ax.set_ylabel({"lr": "learning rate", "grad_norm": "grad norm (before clip)"}.get(panel, panel))
                if panel == "grad_norm":
                    ax.set_yscale("log")
            ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    if not drew_anything:
        plt.close(fig)
        names = ", ".join(str(r.path) for r in runs)
        raise UserError(f"nothing to plot for x={x!r}, panels={list(panels)} in {names} (no matching data points)")
    axes[-1, 0].set_xlabel(X_LABELS[x])
    axes[0, 0].set_title(title or ("  vs  ".join(r.name for r in runs) if len(runs) <= 4 else f"{len(runs)} runs"),
                         fontsize=10)
    fig.tight_layout()
    return save_png(fig, out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", help="run folders (with metrics.jsonl), metrics.jsonl files or text logs")
    parser.add_argument("--metric", default=None, help="plot only this series in the loss panel (e.g. val_loss)")
    parser.add_argument("--x", default="step", choices=list(X_LABELS), help="x axis (default: step)")
    parser.add_argument("--panels", default="loss", help=f"comma-separated, from {','.join(PANELS)} (default: loss)")
    parser.add_argument("--log_y", action="store_true", help="log-scale the loss axis")
    parser.add_argument("--title", default=None)
    parser.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/loss.png for one run, else plot.png)")


def run(args: argparse.Namespace) -> int:
    runs = [read_run(p) for p in args.runs]
    if args.out:
        out = Path(args.out)
    elif len(runs) == 1 and Path(args.runs[0]).is_dir():
        out = Path(args.runs[0]) / "loss.png"
    else:
        out = Path("plot.png")
    panels = [p.strip() for p in args.panels.split(",") if p.strip()]
    if panels == ["loss"] and any(r.task_primary for r in runs):
        panels.append("eval_tasks")  # runs with benchmark evals get their curves by default
    plot_runs(runs, out, x=args.x, panels=panels, metric=args.metric, title=args.title, log_y=args.log_y)
    for r in runs:
        xs, ys = r.series("val_loss", "step")
        last = f"last val loss {ys[-1]:.4f} at step {xs[-1]}" if ys else "no evals yet"
        print(f"{r.name}: {len(r.train_iter)} train points, {len(r.eval_iter)} evals, {last}")
    print(f"wrote {out}")
    return 0
