"""The results as a terminal table and as results.json."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from diyllm.atomic import atomic_write


def _fmt(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.4f}" if abs(x) < 1e5 else f"{x:.3g}"  # lambada's perplexity of an untrained model is huge


def format_table(results: dict[str, Any]) -> str:
    """task | metric | value | stderr | n, one line per metric, then centred accuracies and their mean."""
    lines = [("task", "metric", "value", "stderr", "n")]
    for name, t in results["tasks"].items():
        for metric, m in t["metrics"].items():
            lines.append((name, metric, _fmt(m["value"]), _fmt(m["stderr"]), str(t["n"])))
        if "centred" in t:
            lines.append((name, f"centred({t['primary']})", _fmt(t["centred"]), "-", str(t["n"])))
    if "core" in results:
        lines.append(("CORE", "mean centred", _fmt(results["core"]["score"]), "-", str(len(results["core"]["tasks"]))))
    widths = [max(len(row[i]) for row in lines) for i in range(5)]
    out = []
    for k, row in enumerate(lines):
        out.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    notes = [f"{n}: {t['truncated']} request(s) had their context cut on the left to fit the window"
             for n, t in results["tasks"].items() if t.get("truncated")]
    return "\n".join(out + notes)


def write_results(results: dict[str, Any], path: str | os.PathLike) -> None:
    """results.json, written atomically (a crash never leaves half a file)."""
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, ensure_ascii=False)
        f.write("\n")


def flat_metrics(results: dict[str, Any], prefix: str = "eval/") -> dict[str, float]:
    """{"eval/hellaswag/acc_norm": 0.27, ..., "eval/core": 0.01}: one number per key, for metrics.jsonl."""
    flat = {}
    for name, t in results["tasks"].items():
        for metric, m in t["metrics"].items():
            flat[f"{prefix}{name}/{metric}"] = m["value"]
        if "centred" in t:
            flat[f"{prefix}{name}/centred"] = t["centred"]
    if "core" in results:
        flat[f"{prefix}core"] = results["core"]["score"]
    return flat


def primary_keys(results: dict[str, Any]) -> list[str]:
    """The one score per task worth a column or a curve ("hellaswag/acc_norm", ...), then "core"."""
    keys = [f"{name}/{t['primary']}" for name, t in results["tasks"].items()]
    return keys + (["core"] if "core" in results else [])


def metrics_event(results: dict[str, Any], iteration: int, tokens: float | None = None,
                  seconds: float | None = None) -> dict[str, Any]:
    """The "eval_tasks" record for metrics.jsonl, read back by diyllm.lab (plot, compare)."""
    return {"event": "eval_tasks", "iter": int(iteration), "tokens": tokens, "time": seconds,
            "scores": flat_metrics(results, prefix=""), "primary": primary_keys(results)}
