"""The task registry: how a row of each public dataset becomes a prompt, its choices and its answer.

Prompt formats follow lm-evaluation-harness (lm-eval) task YAMLs, because the format changes the score
and users compare numbers with lm-eval's. A row is read in the public dataset's own format (as exported
from the Hugging Face Hub), so `DIR/<task>/<split>.jsonl` files need no conversion.

Three kinds of task:

* "multiple_choice": score every choice by its log-likelihood after the context (acc, acc_norm).
  Usually the context is shared and the choices differ; "partial evaluation" tasks (winogrande) turn
  that around: each choice completes a different context and the *same* continuation is scored.
* "loglikelihood": one continuation (lambada's last word); acc = it is the greedy continuation.
* "generate": greedy generation with stop strings, scored by exact or numeric match.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from diyllm.errors import UserError


@dataclass(frozen=True)
class Doc:
    """One evaluation item, in the terms lm-eval uses.

    query: the prompt (doc_to_text); for partial evaluation it is unused (the choices are the contexts).
    choices: the candidate continuations (doc_to_choice), without the target delimiter.
    gold: index of the right choice (multiple choice) or the reference answer (generative).
    continuation: partial evaluation only: the text scored after each choice.
    subject: the MMLU-style subject, used for the description line and to draw few-shot examples.
    """

    query: str
    choices: tuple[str, ...] = ()
    gold: int | str = 0
    continuation: str | None = None
    subject: str | None = None
    messages: tuple[dict, ...] | None = None  # generative chat tasks: the conversation up to the answer


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "multiple_choice" | "loglikelihood" | "generate"
    parse: Callable[[dict], Doc]
    fields: tuple[str, ...]  # the row keys `parse` reads (named in errors about malformed rows)
    eval_split: str
    fewshot_splits: tuple[str, ...]  # where few-shot examples come from, first available wins
    hub: tuple[str, str | None] | None  # (dataset repo, config) on the Hugging Face Hub
    lm_eval: str  # the lm-eval task name(s) with the same format
    prompt: str  # the prompt format, for docs and --help
    metrics: tuple[str, ...] = ("acc", "acc_norm")
    primary: str = "acc"  # the metric that enters the CORE-style mean
    chance: float = 0.0  # accuracy of guessing (for the centred accuracy)
    description: Callable[[Doc], str] | None = None  # a line before the few-shot examples (MMLU)
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    stop: tuple[str, ...] = ()
    max_new_tokens: int = 32
    extract: Callable[[str], str] | None = None  # generative: the answer inside a generation
    hub_subject_configs: bool = False  # the Hub has one config per subject (C-Eval): the subject is the config
    extra: dict[str, Any] = field(default_factory=dict)


# ---- lm-eval preprocessing, restated ---------------------------------------------------------------
def _hellaswag_clean(text: str) -> str:
    """HellaSwag's WikiHow artifacts: " [title]" becomes ". ", other [tags] go, double spaces shrink."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row: dict) -> Doc:
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return Doc(_hellaswag_clean(row["activity_label"] + ": " + ctx),
               tuple(_hellaswag_clean(e) for e in row["endings"]), int(row["label"]))


def _arc(row: dict) -> Doc:
    choices = row["choices"]
    return Doc(f"Question: {row['question']}\nAnswer:", tuple(choices["text"]),
               list(choices["label"]).index(row["answerKey"]))


def _piqa(row: dict) -> Doc:
    return Doc(f"Question: {row['goal']}\nAnswer:", (row["sol1"], row["sol2"]), int(row["label"]))


def _winogrande(row: dict) -> Doc:
    sentence = row["sentence"]
    blank = sentence.index("_")
    return Doc("", tuple(sentence[:blank] + opt for opt in (row["option1"], row["option2"])),
               {"1": 0, "2": 1}[str(row["answer"])], continuation=sentence[blank + 1:].strip())


def _lambada(row: dict) -> Doc:
    words = row["text"].split(" ")
    return Doc(" ".join(words[:-1]), (" " + words[-1],), 0)


LETTERS = ("A", "B", "C", "D")


def _mmlu(row: dict) -> Doc:
    c = row["choices"]
    query = (f"{row['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:")
    return Doc(query, LETTERS, int(row["answer"]), subject=row.get("subject"))


def _chinese_mc(question_key: str, answer_key: str) -> Callable[[dict], Doc]:
    def parse(row: dict) -> Doc:
        query = (f"{row[question_key].strip()}\nA. {row['A']}\nB. {row['B']}\nC. {row['C']}\nD. {row['D']}\n答案：")
        return Doc(query, LETTERS, LETTERS.index(row[answer_key]), subject=row.get("subject"))
    return parse


def _mmlu_description(doc: Doc) -> str:
    subject = (doc.subject or "").replace("_", " ")
    return f"The following are multiple choice questions (with answers) about {subject}.\n\n" if subject else ""


def _ceval_description(doc: Doc) -> str:
    return f"以下是中国关于{doc.subject}考试的单项选择题，请选出其中的正确答案。\n\n" if doc.subject else ""


def _cmmlu_description(doc: Doc) -> str:
    return f"以下是关于{doc.subject}的单项选择题，请直接给出正确答案的选项。\n\n" if doc.subject else ""


GSM8K_ANSWER = re.compile(r"#### (\-?[0-9\.\,]+)")


def normalise_number(text: str) -> str:
    """"1,234.", "$1234" and "1234" compare equal (lm-eval's gsm8k ignores ',', '$' and a final '.')."""
    return text.strip().replace(",", "").replace("$", "").rstrip(".")


def gsm8k_extract(generation: str) -> str:
    """The number after the first "#### " (lm-eval's strict-match filter); "" when there is none."""
    m = GSM8K_ANSWER.search(generation)
    return normalise_number(m.group(1)) if m else ""


def _gsm8k(row: dict) -> Doc:
    return Doc(f"Question: {row['question']}\nAnswer:", (row["answer"],), gsm8k_extract(row["answer"]))


def _synthetic(row: dict) -> Doc:
    from diyllm.data.synthetic import SYSTEM_PROMPT
    from diyllm.generation.exact_match import normalise

    messages = tuple(row["conversations"][:-1])
    question = messages[-1]["content"]
    answer = row["conversations"][-1]["content"]
    if messages[0]["role"] != "system":
        messages = ({"role": "system", "content": SYSTEM_PROMPT}, *messages)
    return Doc(f"Question: {question}\nAnswer:", (answer,), normalise(answer), messages=messages)


def _synthetic_extract(generation: str) -> str:
    from diyllm.generation.exact_match import normalise

    return normalise(generation)


_MC = dict(kind="multiple_choice")
TASKS: dict[str, Task] = {t.name: t for t in (
    Task("hellaswag", parse=_hellaswag, fields=("activity_label", "ctx_a", "ctx_b", "endings", "label"),
         eval_split="validation", fewshot_splits=("train",), hub=("Rowan/hellaswag", None), lm_eval="hellaswag",
         prompt="{activity_label}: {ctx_a} {ctx_b.capitalize()} -> ' ' + ending (WikiHow [tags] cleaned)",
         primary="acc_norm", chance=0.25, **_MC),
    Task("arc_easy", parse=_arc, fields=("question", "choices", "answerKey"), eval_split="test",
         fewshot_splits=("train", "validation"), hub=("allenai/ai2_arc", "ARC-Easy"), lm_eval="arc_easy",
         prompt="Question: {question}\\nAnswer: -> ' ' + choice text", primary="acc_norm", chance=0.25, **_MC),
    Task("arc_challenge", parse=_arc, fields=("question", "choices", "answerKey"), eval_split="test",
         fewshot_splits=("train", "validation"), hub=("allenai/ai2_arc", "ARC-Challenge"), lm_eval="arc_challenge",
         prompt="Question: {question}\\nAnswer: -> ' ' + choice text", primary="acc_norm", chance=0.25, **_MC),
    Task("piqa", parse=_piqa, fields=("goal", "sol1", "sol2", "label"), eval_split="validation",
         fewshot_splits=("train",), hub=("baber/piqa", None), lm_eval="piqa",
         prompt="Question: {goal}\\nAnswer: -> ' ' + sol1 | sol2", primary="acc_norm", chance=0.5, **_MC),
    Task("winogrande", parse=_winogrande, fields=("sentence", "option1", "option2", "answer"),
         eval_split="validation", fewshot_splits=("train",), hub=("allenai/winogrande", "winogrande_xl"),
         lm_eval="winogrande", metrics=("acc",), chance=0.5,
         prompt="partial evaluation: context = sentence up to '_' with the option filled in; "
                "scored continuation = ' ' + the rest of the sentence (the same for both options)", **_MC),
    Task("lambada", kind="loglikelihood", parse=_lambada, fields=("text",), eval_split="test", fewshot_splits=(),
         hub=("EleutherAI/lambada_openai", "default"), lm_eval="lambada_openai", metrics=("acc", "perplexity"),
         target_delimiter="", prompt="all words but the last -> ' ' + last word (acc: it is the greedy continuation)"),
    Task("mmlu", parse=_mmlu, fields=("question", "choices", "answer"), eval_split="test", fewshot_splits=("dev",),
         hub=("cais/mmlu", "all"), lm_eval="mmlu (mmlu_<subject>)", metrics=("acc",), chance=0.25,
         description=_mmlu_description,
         prompt="The following are multiple choice questions (with answers) about {subject}.\\n\\n"
                "{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: -> ' A' | ' B' | ' C' | ' D'", **_MC),
    Task("ceval", parse=_chinese_mc("question", "answer"), fields=("question", "A", "B", "C", "D", "answer"),
         eval_split="val", fewshot_splits=("dev",), hub=("ceval/ceval-exam", None), lm_eval="ceval-valid",
         chance=0.25, description=_ceval_description, hub_subject_configs=True,
         prompt="以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\\n\\n"
                "{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\n答案： -> ' A' | ' B' | ' C' | ' D'", **_MC),
    Task("cmmlu", parse=_chinese_mc("Question", "Answer"), fields=("Question", "A", "B", "C", "D", "Answer"),
         eval_split="test", fewshot_splits=("dev",), hub=("haonan-li/cmmlu", None), lm_eval="cmmlu",
         chance=0.25, description=_cmmlu_description, hub_subject_configs=True,
         prompt="以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\\n\\n"
                "{Question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\n答案： -> ' A' | ' B' | ' C' | ' D'", **_MC),
    Task("gsm8k", kind="generate", parse=_gsm8k, fields=("question", "answer"), eval_split="test",
         fewshot_splits=("train",), hub=("openai/gsm8k", "main"), lm_eval="gsm8k (strict-match)",
         metrics=("exact_match",), primary="exact_match", stop=("Question:", "</s>", "<|im_end|>"),
         max_new_tokens=256, extract=gsm8k_extract,
         prompt="Question: {question}\\nAnswer: -> generation; the number after '#### ' must equal the reference's"),
    Task("synthetic", kind="generate", parse=_synthetic, fields=("conversations",), eval_split="val",
         fewshot_splits=("train",), hub=None, lm_eval="(none: diyllm's own tasks)", metrics=("exact_match",),
         primary="exact_match", stop=("\n", "<|im_end|>"), max_new_tokens=16, extract=_synthetic_extract,
         prompt="Question: {question}\\nAnswer: -> generation up to a newline (with --chat: the chat template); "
                "exact match ignoring case, spaces and a final period"),
)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UserError(f"unknown eval task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


def parse_task_list(spec: str | list[str] | tuple[str, ...]) -> list[Task]:
    """"hellaswag,arc_easy" (or a list) -> tasks, with an error listing the known names."""
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    if not names:
        raise UserError(f"no eval tasks given; known tasks: {', '.join(TASKS)}")
    return [get_task(n) for n in dict.fromkeys(names)]
