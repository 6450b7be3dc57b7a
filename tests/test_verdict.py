"""The filled-in analysis template: verdicts per run follow their documented rules."""

from __future__ import annotations

import json
import math
from pathlib import Path

from diyllm.lab.compare import compare_runs
from diyllm.lab.metrics import read_run
from diyllm.lab.verdict import judge


def write_run(path: Path, val: list[float], train: list[float] | None = None, every: int = 10) -> Path:
    """A metrics.jsonl whose evaluations (every `every` steps) have the given val / train losses."""
    path.mkdir(parents=True, exist_ok=True)
    train = train or [v - 0.05 for v in val]
    events = [{"event": "start", "config": {}, "num_params": 100, "run_name": path.name}]
    for i, (v, t) in enumerate(zip(val, train)):
        it = i * every
        events.append({"event": "train", "iter": it, "tokens": it * 64, "time": it * 0.1, "loss": t, "lr": 1e-3,
                       "grad_norm": 1.0, "ms_per_iter": 1.0, "tokens_per_sec": 1.0})
        events.append({"event": "eval", "iter": it, "tokens": it * 64, "time": it * 0.1, "train_loss": t,
                       "val_loss": v, "val_bpb": v})
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(e) for e in events) + "\n")
    return path


def curve(n, f):
    return [f(i / (n - 1)) for i in range(n)]


def test_fast_start_and_converged(tmp_path):
    run = read_run(write_run(tmp_path / "fast", curve(16, lambda x: 2 + 3 * math.exp(-12 * x))))
    v = judge(run)
    assert (v.start, v.trend, v.overfitting) == ("fast", "converged", False)


def test_slow_start_still_improving(tmp_path):
    run = read_run(write_run(tmp_path / "slow", curve(16, lambda x: 5 - 3 * x**2)))
    v = judge(run)
    assert (v.start, v.trend) == ("slow", "still improving")


def test_diverged_and_oscillating(tmp_path):
    assert judge(read_run(write_run(tmp_path / "d", [5, 4, 6, float("nan")]))).trend == "diverged"
    assert judge(read_run(write_run(tmp_path / "up", [5, 4.5, 5.5, 6]))).trend == "diverged"
    wobbly = curve(16, lambda x: 2 + 3 * math.exp(-12 * x))
    wobbly = [y + (0.8 if i % 2 and i > 9 else 0) for i, y in enumerate(wobbly)]
    assert judge(read_run(write_run(tmp_path / "osc", wobbly))).trend == "oscillating"


def test_overfitting_needs_a_gap_and_a_rising_val(tmp_path):
    val = [4.0, 3.0, 2.5, 2.4, 2.5, 2.7]
    train = [3.9, 2.9, 2.3, 2.0, 1.8, 1.5]
    v = judge(read_run(write_run(tmp_path / "of", val, train)))
    assert v.overfitting and v.gap == 2.7 - 1.5


def test_baseline_comparison_reports_best_val_delta_and_max_curve_difference(tmp_path):
    base_val = curve(6, lambda x: 4 - 2 * x)
    base = read_run(write_run(tmp_path / "base", base_val))
    other = read_run(write_run(tmp_path / "other", [v - 0.1 for v in base_val],
                               [v - 0.05 + (0.03 if i == 2 else 0) for i, v in enumerate(base_val)]))
    v = judge(other, base)
    assert abs(v.best_val_delta - (-0.1)) < 1e-9
    assert abs(v.max_train_diff - 0.03) < 1e-9


def test_compare_writes_the_analysis_after_the_table(tmp_path):
    a = write_run(tmp_path / "a", curve(8, lambda x: 2 + 3 * math.exp(-12 * x)))
    b = write_run(tmp_path / "b", curve(8, lambda x: 5 - 3 * x**2))
    text = compare_runs([a, b], tmp_path / "cmp.md", analysis=True)
    assert "## Analysis (filled in by diyllm)" in text
    assert "- **a**: fast start; converged" in text and "- **b**: slow start; still improving" in text
    assert (tmp_path / "cmp.md").read_text() == text
