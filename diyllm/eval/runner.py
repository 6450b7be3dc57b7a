"""`evaluate(model, tokenizer, tasks)`: the library call behind `diyllm eval` and training-time evals.

For each task: load its docs, draw few-shot examples, build prompts, score (log-likelihood or greedy
generation), and aggregate per-item scores into metrics with standard errors; then the CORE-style mean
of the centred primary metrics. The returned dict is what results.json holds.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

from torch import nn

from diyllm.errors import UserError
from diyllm.eval import metrics as M
from diyllm.eval.data import has_split, load_docs
from diyllm.eval.loglik import encode_pair, loglikelihoods
from diyllm.eval.prompts import chat_messages, prefix, requests, sample_fewshot
from diyllm.eval.tasks import Doc, Task, parse_task_list


def check_options(limit: int | None, shots: int, batch_size: int) -> None:
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1 (got {limit}); leave it out to evaluate every item")
    if shots < 0:
        raise UserError(f"--shots must be 0 or more (got {shots})")
    if batch_size < 1:
        raise UserError(f"--batch_size must be at least 1 (got {batch_size})")


def _window(model: nn.Module, window: int | None) -> int:
    if window is not None:
        return window
    config = getattr(model, "config", None)
    if config is None or not getattr(config, "context_length", None):
        raise UserError("the model has no config.context_length; pass window= to evaluate()")
    return int(config.context_length)


def _fewshot_pool(task: Task, docs: list[Doc], shots: int, data_dir: Any) -> tuple[list[Doc], str]:
    if shots == 0:
        return [], ""
    for split in task.fewshot_splits:
        if split != task.eval_split and (data_dir is None or has_split(task, split, data_dir)):
            return load_docs(task, split, data_dir), split
    return docs, task.eval_split  # examples from the evaluated split itself (the item is excluded)


def _summary(task: Task, per_item: dict[str, list[float]], n: int, shots: int, truncated: int,
             fewshot_split: str) -> dict[str, Any]:
    out: dict[str, Any] = {"n": n, "shots": shots, "truncated": truncated, "metrics": {},
                           "primary": task.primary, "lm_eval": task.lm_eval}
    if fewshot_split:
        out["fewshot_split"] = fewshot_split
    for name, values in per_item.items():
        if name == "perplexity":
            out["metrics"][name] = {"value": M.perplexity(values), "stderr": None}
        else:
            out["metrics"][name] = {"value": M.mean(values), "stderr": M.mean_stderr(values)}
    if task.kind != "generate":  # CORE-style: the log-likelihood tasks, as DCLM/nanochat
        out["chance"] = task.chance
        out["centred"] = M.centred_accuracy(out["metrics"][task.primary]["value"], task.chance)
    return out


def _loglik_task(model, tokenizer, task: Task, docs: list[Doc], pool: list[Doc], shots: int, seed: int,
                 chat: bool, window: int, batch_size: int, bar) -> tuple[dict[str, list[float]], list[dict], int]:
    prefix_id = getattr(tokenizer, "eot_id", None)
    groups = []
    for i, doc in enumerate(docs):
        examples = sample_fewshot(pool, shots, seed, task.name, i, exclude=doc)
        try:
            if chat:
                from diyllm.data.chat_template import encode_chat

                ctx_ids = encode_chat(tokenizer, chat_messages(task, doc, examples), add_generation_prompt=True)[0]
                groups.append([(ctx_ids, tokenizer.encode(c.strip())) for c in doc.choices])
            else:
                groups.append([encode_pair(tokenizer, c, k, prefix_id) for c, k in requests(task, doc, examples)])
        except ValueError as exc:  # e.g. a character tokenizer meeting a character it was not trained on
            raise UserError(f"{task.name} item {i}: the model's tokenizer cannot encode the prompt ({exc}); "
                            "benchmarks need a tokenizer that covers their text (a byte-level BPE does)") from None
    scores, truncated = loglikelihoods(model, groups, window, batch_size, progress=bar.update)
    per_item: dict[str, list[float]] = {m: [] for m in task.metrics}
    samples = []
    for i, (doc, item) in enumerate(zip(docs, scores)):
        lls = [ll for ll, _ in item]
        sample: dict[str, Any] = {"index": i, "lls": lls}
        if task.kind == "loglikelihood":
            sample["greedy"] = item[0][1]
            per_item["acc"].append(float(item[0][1]))
            if "perplexity" in per_item:
                per_item["perplexity"].append(lls[0])
        else:
            pred, pred_norm = M.choose(lls, doc.choices)
            sample.update(gold=int(doc.gold), pred=pred, pred_norm=pred_norm)
            per_item["acc"].append(float(pred == doc.gold))
            if "acc_norm" in per_item:
                per_item["acc_norm"].append(float(pred_norm == doc.gold))
        samples.append(sample)
    return per_item, samples, truncated


def _generative_task(model, tokenizer, task: Task, docs: list[Doc], pool: list[Doc], shots: int, seed: int,
                     chat: bool, window: int, batch_size: int, bar) -> tuple[dict[str, list[float]], list[dict], int]:
    from diyllm.eval.generative import generate_answers

    prompts = []
    for i, doc in enumerate(docs):
        examples = sample_fewshot(pool, shots, seed, task.name, i, exclude=doc)
        prompts.append(chat_messages(task, doc, examples) if chat else prefix(task, doc, examples) + doc.query)
    generations, truncated = generate_answers(model, tokenizer, prompts, task, window, batch_size, chat, bar.update)
    per_item: dict[str, list[float]] = {"exact_match": []}
    samples = []
    for i, (doc, text) in enumerate(zip(docs, generations)):
        pred = task.extract(text) if task.extract is not None else text.strip()
        gold = str(doc.gold)  # parse() stores the reference already normalised
        hit = bool(gold) and pred == gold
        per_item["exact_match"].append(float(hit))
        samples.append({"index": i, "generation": text, "pred": pred, "gold": gold, "exact_match": hit})
    return per_item, samples, truncated


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    tasks: str | Sequence[str],
    limit: int | None = None,
    shots: int = 0,
    batch_size: int = 16,
    data_dir: str | os.PathLike | None = None,
    chat: bool = False,
    seed: int = 1234,
    log_samples: bool = False,
    window: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate `model` on `tasks` ("hellaswag,arc_easy" or a list); returns the results dict.

    limit: the first N items of each task. shots: few-shot examples per item. window: the longest row the
    model takes (default model.config.context_length). With log_samples, per-item predictions are kept.
    """
    from tqdm import tqdm

    check_options(limit, shots, batch_size)
    task_list = parse_task_list(tasks)
    partial = [t.name for t in task_list if t.name == "winogrande"]
    if chat and partial:
        raise UserError(f"{', '.join(partial)} scores the end of a sentence after each option (partial evaluation); "
                        "it has no question for a chat turn: evaluate it without --chat")
    window = _window(model, window)
    was_training = model.training
    model.eval()
    results: dict[str, Any] = {"tasks": {}, "config": {"limit": limit, "shots": shots, "batch_size": batch_size,
                                                       "chat": chat, "seed": seed, "window": window}}
    if log_samples:
        results["samples"] = {}
    try:
        for task in task_list:
            docs = load_docs(task, task.eval_split, data_dir)[: limit or None]
            if not docs:
                raise UserError(f"{task.name}/{task.eval_split} has no items")
            pool, fewshot_split = _fewshot_pool(task, docs, shots, data_dir)
            run = _generative_task if task.kind == "generate" else _loglik_task
            started = time.perf_counter()
            with tqdm(total=len(docs), desc=f"eval {task.name}", unit="item", disable=not progress,
                      leave=False) as bar:
                per_item, samples, truncated = run(model, tokenizer, task, docs, pool, shots, seed, chat, window,
                                                   batch_size, bar)
            seconds = time.perf_counter() - started
            summary = _summary(task, per_item, len(docs), shots, truncated, fewshot_split)
            summary["items_per_s"] = len(docs) / max(seconds, 1e-9)
            results["tasks"][task.name] = summary
            if log_samples:
                results["samples"][task.name] = samples
    finally:
        model.train(was_training)
    centred = {n: t["centred"] for n, t in results["tasks"].items() if "centred" in t}
    if centred:
        results["core"] = {"score": M.core_score(list(centred.values())), "tasks": sorted(centred)}
    return results
