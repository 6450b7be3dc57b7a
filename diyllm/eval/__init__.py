"""Evaluation on the standard benchmarks (HellaSwag, ARC, PIQA, Winogrande, LAMBADA, MMLU, C-Eval, CMMLU,
GSM8K) and the project's synthetic tasks, with lm-evaluation-harness's prompt formats and metrics.

    from diyllm.eval import evaluate
    results = evaluate(model, tokenizer, "hellaswag,arc_easy", limit=100, data_dir="evaldata")
    results["tasks"]["hellaswag"]["metrics"]["acc_norm"]["value"]

`diyllm eval --ckpt PATH --tasks ...` is the command-line face of the same call; see docs/eval.md.
"""

from diyllm.eval.report import flat_metrics, format_table, write_results
from diyllm.eval.runner import evaluate
from diyllm.eval.tasks import TASKS, Doc, Task, get_task, parse_task_list

__all__ = ["TASKS", "Doc", "Task", "evaluate", "flat_metrics", "format_table", "get_task", "parse_task_list",
           "write_results"]
