"""The analysis template, filled in by the tool: a verdict per run of a sweep, and a few samples.

For each run, from its metrics (val loss where there are evaluations, else the train loss):
  start      fast / moderate / slow: how much of the run's whole loss drop was made in its first 20 %
  trend      diverged (non-finite, or no lower than where it started) / oscillating (the last third
             swings around its trend by more than 10 % of the whole drop) / still improving (the last
             third still bought > 5 % of the drop) / converged
  gap        val − train at the last evaluation; "overfitting" when it exceeds 0.1 and val has turned
             up from its best by more than 0.02 while train kept falling
  baseline   best val loss relative to the sweep's first run, and the largest |difference| between
             the two train-loss curves at the steps both logged (the grad-accumulation experiment's
             "do the curves coincide" in one number)
The thresholds are rules of thumb, printed with the verdicts so a learner can disagree with them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from diyllm.lab.metrics import RunMetrics

FAST_START, SLOW_START = 0.5, 0.2  # share of the whole drop made in the first 20 % of the run
OSCILLATION = 0.10  # residual swing in the last third, as a share of the whole drop
STILL_IMPROVING = 0.05  # share of the whole drop made in the last third
OVERFIT_GAP, OVERFIT_RISE = 0.10, 0.02
RULES = (f"start: fast if > {FAST_START:.0%} of the loss drop came in the first 20% of steps, slow if < "
         f"{SLOW_START:.0%}; trend: oscillating if the last third swings by > {OSCILLATION:.0%} of the drop around "
         f"its line, still improving if it made > {STILL_IMPROVING:.0%} of the drop; overfitting: gap > "
         f"{OVERFIT_GAP} with val up > {OVERFIT_RISE} from its best")


@dataclass
class Verdict:
    name: str
    start: str
    trend: str
    gap: float | None
    overfitting: bool
    best_val_delta: float | None  # best val − the baseline's best val (negative: better)
    max_train_diff: float | None  # max |train loss − baseline's| at shared steps

    def sentence(self) -> str:
        parts = [f"{self.start} start", self.trend]
        if self.gap is not None:
            parts.append(f"gap {self.gap:+.3f}" + (" (overfitting)" if self.overfitting else ""))
        if self.best_val_delta is not None:
            parts.append(f"best val {self.best_val_delta:+.3f} vs baseline")
        if self.max_train_diff is not None:
            diff = self.max_train_diff  # tiny differences (accumulation vs one big batch) need more than 4 decimals
            parts.append(f"max |Δ train loss| vs baseline {diff:.4f}" if diff >= 1e-3 or diff == 0
                         else f"max |Δ train loss| vs baseline {diff:.1e}")
        return "; ".join(parts)


def _curve(run: RunMetrics) -> tuple[list[int], list[float]]:
    if len(run.val_loss) >= 3:
        return list(run.eval_iter), list(run.val_loss)
    return list(run.train_iter), list(run.train_loss)


def _residual_std(xs: list[int], ys: list[float]) -> float:
    """Standard deviation of ys around their least-squares line."""
    n = len(ys)
    if n < 3:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs) or 1.0
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return math.sqrt(sum((y - (my + slope * (x - mx))) ** 2 for x, y in zip(xs, ys)) / n)


def judge(run: RunMetrics, baseline: RunMetrics | None = None) -> Verdict:
    xs, ys = _curve(run)
    start, trend = "–", "no data"
    if ys:
        if not all(math.isfinite(y) for y in ys) or ys[-1] >= ys[0]:
            start, trend = "–", "diverged"
        else:
            drop = ys[0] - min(ys)
            first = [y for x, y in zip(xs, ys) if x <= xs[0] + 0.2 * (xs[-1] - xs[0])]
            early = (ys[0] - min(first)) / drop if drop > 0 else 0.0
            start = "fast" if early > FAST_START else "slow" if early < SLOW_START else "moderate"
            third = [(x, y) for x, y in zip(xs, ys) if x >= xs[0] + (2 / 3) * (xs[-1] - xs[0])]
            tx, ty = [x for x, _ in third], [y for _, y in third]
            if drop > 0 and _residual_std(tx, ty) > OSCILLATION * drop:
                trend = "oscillating"
            elif drop > 0 and ty and (ty[0] - ty[-1]) > STILL_IMPROVING * drop:
                trend = "still improving"
            else:
                trend = "converged"
    gap = None
    if run.val_loss and run.eval_train_loss and run.eval_train_loss[-1] is not None:  # None: eval_train=false
        gap = run.val_loss[-1] - run.eval_train_loss[-1]
    overfitting = bool(gap is not None and gap > OVERFIT_GAP and run.val_loss
                       and run.val_loss[-1] > min(run.val_loss) + OVERFIT_RISE)
    best_delta = max_diff = None
    if baseline is not None and baseline is not run:
        if run.val_loss and baseline.val_loss:
            best_delta = min(run.val_loss) - min(baseline.val_loss)
        theirs = dict(zip(baseline.train_iter, baseline.train_loss))
        diffs = [abs(y - theirs[x]) for x, y in zip(run.train_iter, run.train_loss) if x in theirs]
        max_diff = max(diffs) if diffs else None
    return Verdict(run.name, start, trend, gap, overfitting, best_delta, max_diff)


def samples_for(run_dir: Path, prompt: str = "", count: int = 2, max_new_tokens: int = 60,
                seed: int = 0) -> list[str]:
    """A few seeded samples from a run's best (else latest) checkpoint; [] when it has none."""
    if not any((run_dir / name).is_file() for name in ("best.pt", "latest.pt")):
        return []
    from diyllm.generation.text import generate_text
    from diyllm.training.checkpoint import load_model

    model, tokenizer, _ = load_model(run_dir)
    if tokenizer is None:
        return []
    start = prompt or "\n"
    return [start + generate_text(model, tokenizer, start, max_new_tokens=max_new_tokens, temperature=0.8,
                                  top_k=50, seed=seed + i) for i in range(count)]


def analysis_markdown(runs: list[RunMetrics], with_samples: bool = True) -> str:
    """The filled-in analysis template: one verdict line per run, then its samples."""
    baseline = runs[0] if runs else None
    lines = ["", "## Analysis (filled in by diyllm)", "", f"Baseline: `{baseline.name}`." if baseline else "",
             f"Rules: {RULES}.", ""]
    for run in runs:
        lines.append(f"- **{run.name}**: {judge(run, baseline).sentence()}")
    if with_samples:
        for run in runs:
            run_dir = Path(run.path) if Path(run.path).is_dir() else Path(run.path).parent
            texts = samples_for(run_dir)
            if texts:
                lines += ["", f"### Samples: {run.name}", ""]
                for text in texts:
                    lines += ["```text", text.strip("\n")[:400], "```"]
    return "\n".join(lines) + "\n"
