"""Benchmark evals while a model trains: the eval component the training loop calls at every step.

The loop stays ignorant of benchmarks: it calls `component.maybe_run(model, step, ...)` and the component
decides whether this step is one of its steps (every `interval` steps and at the end), evaluates the
configured tasks on a fixed subset (`limit` items each, so runs are comparable), and hands an
"eval_tasks" record to `log` (the run's metrics.jsonl writer). `diyllm plot` draws those records and
`diyllm compare` shows the last ones as columns.

Config keys (diyllm.training.config): eval_tasks = ["hellaswag", "arc_easy"], eval_tasks_interval
(0: at the evaluation interval), eval_tasks_limit, eval_tasks_shots, eval_tasks_data_dir.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from diyllm.eval.report import format_table, metrics_event
from diyllm.eval.runner import check_options, evaluate
from diyllm.eval.tasks import parse_task_list


class TaskEvalComponent:
    """Runs `evaluate` on schedule and logs the scores; the loop only calls `maybe_run` each step."""

    def __init__(self, tasks: Sequence[str], interval: int, tokenizer: Any, log: Callable[[dict], None],
                 limit: int | None = 100, shots: int = 0, batch_size: int = 16, data_dir: str | None = None,
                 print_fn: Callable[[str], None] | None = print):
        check_options(limit, shots, batch_size)
        self.tasks = [t.name for t in parse_task_list(list(tasks))]  # refuse unknown names before training
        if interval < 0:
            raise ValueError(f"eval_tasks_interval must be >= 0, got {interval}")
        self.interval, self.tokenizer, self.log = interval, tokenizer, log
        self.limit, self.shots, self.batch_size, self.data_dir = limit, shots, batch_size, data_dir
        self.print_fn = print_fn
        self.last: dict[str, Any] | None = None

    def due(self, step: int, final: bool = False) -> bool:
        return final or (self.interval > 0 and step > 0 and step % self.interval == 0)

    def maybe_run(self, model: nn.Module, step: int, tokens: float | None = None, elapsed: float | None = None,
                  final: bool = False) -> dict[str, Any] | None:
        """Evaluate when `step` is due; returns the logged record (None when nothing ran)."""
        if not self.due(step, final) or (final and self.last is not None and self.last["iter"] == step):
            return None
        started = time.perf_counter()
        results = evaluate(model, self.tokenizer, self.tasks, limit=self.limit, shots=self.shots,
                           batch_size=self.batch_size, data_dir=self.data_dir, progress=False)
        record = metrics_event(results, step, tokens, elapsed)
        record["eval_seconds"] = time.perf_counter() - started
        self.log(record)
        self.last = record
        if self.print_fn is not None:
            self.print_fn(f"step {step}: benchmark evals ({record['eval_seconds']:.1f}s)\n{format_table(results)}")
        return record


def component_from_config(cfg: Any, tokenizer_json: str | None, log: Callable[[dict], None],
                          print_fn: Callable[[str], None] | None = print) -> TaskEvalComponent | None:
    """The component for a training config's eval_tasks* keys; None when eval_tasks is empty."""
    if not cfg.eval_tasks:
        return None
    from diyllm.checkpoints import tokenizer_from_text
    from diyllm.errors import UserError

    tokenizer = tokenizer_from_text(tokenizer_json, "the training data")
    if tokenizer is None:
        raise UserError("eval_tasks needs the data's tokenizer (to encode prompts), but this dataset has none; "
                        "prepare the data with `diyllm prepare` or set eval_tasks = []")
    return TaskEvalComponent(cfg.eval_tasks, cfg.eval_tasks_interval or cfg.eval_interval, tokenizer, log,
                             limit=cfg.eval_tasks_limit, shots=cfg.eval_tasks_shots,
                             data_dir=cfg.eval_tasks_data_dir or None, print_fn=print_fn)
