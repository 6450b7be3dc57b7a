"""Few-shot sampling and prompt assembly, in lm-eval's layout.

A k-shot prompt is  description + (example + fewshot_delimiter) * k + query, where an example is a
solved item: query + target_delimiter + its gold answer (partial evaluation: gold choice + delimiter +
continuation). The examples are drawn from the task's few-shot split with a seed that depends only on
(seed, task, item index), so the same item gets the same examples whatever --limit or batch size, and an
item never appears among its own examples when the examples come from the evaluated split.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from diyllm.eval.tasks import Doc, Task


def sample_fewshot(pool: Sequence[Doc], k: int, seed: int, task: str, index: int,
                   exclude: Doc | None = None) -> list[Doc]:
    """k docs of `pool` drawn with a fixed seed; `exclude` (the evaluated doc) is never one of them.

    Same-subject examples are preferred when the docs have a subject (MMLU's few-shot examples come
    from the same subject's dev split).
    """
    if k <= 0:
        return []
    candidates = [i for i, d in enumerate(pool) if d is not exclude and d != exclude]
    if exclude is not None and exclude.subject is not None:
        same = [i for i in candidates if pool[i].subject == exclude.subject]
        if len(same) >= k:
            candidates = same
    rng = random.Random(f"{seed}:{task}:{index}")
    picked = rng.sample(candidates, min(k, len(candidates)))
    return [pool[i] for i in picked]


def example_text(task: Task, doc: Doc) -> str:
    """The doc with its answer, as it appears among the few-shot examples."""
    if doc.continuation is not None:  # partial evaluation
        return doc.choices[int(doc.gold)] + task.target_delimiter + doc.continuation
    answer = doc.choices[int(doc.gold)] if task.kind != "generate" else doc.choices[0]
    return doc.query + task.target_delimiter + answer


def prefix(task: Task, doc: Doc, shots: Sequence[Doc]) -> str:
    """Description and solved examples that come before the doc's own prompt."""
    head = task.description(doc) if task.description is not None else ""
    return head + "".join(example_text(task, s) + task.fewshot_delimiter for s in shots)


def requests(task: Task, doc: Doc, shots: Sequence[Doc]) -> list[tuple[str, str]]:
    """(context, continuation) strings to score, one per choice."""
    head = prefix(task, doc, shots)
    if doc.continuation is not None:
        return [(head + c, task.target_delimiter + doc.continuation) for c in doc.choices]
    return [(head + doc.query, task.target_delimiter + c) for c in doc.choices]


def chat_messages(task: Task, doc: Doc, shots: Sequence[Doc]) -> list[dict[str, Any]]:
    """The doc as a conversation ending with a user turn: examples become earlier user/assistant turns."""
    def answer(d: Doc) -> str:
        return (d.choices[int(d.gold)] if task.kind != "generate" else d.choices[0]).strip()

    if doc.messages is not None:
        system = [m for m in doc.messages if m["role"] == "system"]
        question = [m for m in doc.messages if m["role"] != "system"]
    else:
        desc = task.description(doc).strip() if task.description is not None else ""
        system = [{"role": "system", "content": desc}] if desc else []
        question = [{"role": "user", "content": doc.query}]
    turns: list[dict[str, Any]] = []
    for s in shots:
        user = s.messages[-1]["content"] if s.messages is not None else s.query
        turns += [{"role": "user", "content": user}, {"role": "assistant", "content": answer(s)}]
    return system + turns + question
