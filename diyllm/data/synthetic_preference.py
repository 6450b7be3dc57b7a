"""Synthetic preference pairs made from the synthetic tasks, of two kinds:

* "correct": the correct answer is chosen, a plausible wrong one (a neighbouring sum, another capital,
  a misspelling, an off-by-one count) is rejected. What a real preference set teaches, but a tiny model
  mostly memorises it: held-out accuracy moves little unless the model already knows the facts.
* "format": the bare answer is chosen over the same answer with a hedge ("8, I think.").
* "style": the question asks for the answer in upper or in lower case (half each); the reply in the
  asked case is chosen, the other one rejected. An untrained model prefers either side equally often
  (the two instructions cancel any bias), and the rule generalises to unseen questions, so held-out
  preference accuracy going from ~50% to ~100% shows DPO working in a minute of CPU.

Train and val use disjoint question phrasings, as in `diyllm.data.synthetic.make_splits`.

    python -m diyllm.data.synthetic_preference --out data/prefs --train 2000 --val 200
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from pathlib import Path

from diyllm.data.synthetic import CAPITALS, SYSTEM_PROMPT, TASKS, make_splits, write_jsonl


def wrong_answer(task: str, question: str, answer: str, rng: random.Random) -> str:
    """A wrong answer of the right shape for `task` (never equal to `answer`)."""
    if task in ("add", "count"):
        value = int(answer)
        deltas = [d for d in (-2, -1, 1, 2) if value + d >= 0]
        return str(value + rng.choice(deltas))
    if task == "capital":
        return rng.choice(sorted(set(CAPITALS.values()) - {answer}))
    if task == "spell":
        letters = answer.split("-")
        i = rng.randrange(len(letters))
        letters[i] = rng.choice([c for c in "abcdefghijklmnopqrstuvwxyz" if c != letters[i]])
        return "-".join(letters)
    if task == "reverse":
        word = answer[::-1]  # the unreversed word is the classic mistake
        return word if word != answer else answer + answer[-1]
    raise ValueError(f"unknown task {task!r}; known: {TASKS}")


def to_pairs(conversations: Sequence[dict], seed: int = 0, system: bool = True) -> list[dict]:
    """Preference rows {"prompt": [...], "chosen": "...", "rejected": "...", "task"} from synthetic
    conversations (their last message is the correct answer)."""
    rng = random.Random(seed)
    rows = []
    for c in conversations:
        prompt = c["conversations"][:-1]
        if not system:
            prompt = [m for m in prompt if m["role"] != "system"]
        question, answer = prompt[-1]["content"], c["conversations"][-1]["content"]
        rows.append({"prompt": prompt, "chosen": answer, "rejected": wrong_answer(c["task"], question, answer, rng),
                     "task": c["task"]})
    return rows


CASE_INSTRUCTIONS = {"upper": "Answer in upper case.", "lower": "Answer in lower case."}
LETTER_TASKS = ("capital", "reverse", "spell")


def to_style_pairs(conversations: Sequence[dict], seed: int = 0, system: bool = True) -> list[dict]:
    """Case-instruction preference rows (see the module docstring); tasks without letters are skipped."""
    rng = random.Random(seed)
    rows = []
    for c in conversations:
        if c["task"] not in LETTER_TASKS:
            continue
        prompt = [dict(m) for m in c["conversations"][:-1] if system or m["role"] != "system"]
        case = rng.choice(sorted(CASE_INSTRUCTIONS))
        prompt[-1]["content"] += " " + CASE_INSTRUCTIONS[case]
        answer = c["conversations"][-1]["content"]
        upper, lower = answer.upper(), answer.lower()
        chosen, rejected = (upper, lower) if case == "upper" else (lower, upper)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "task": c["task"], "case": case})
    return rows


VERBOSE = "{}, I think."  # the answer first (retrieval as in pretraining), then a hedge


def to_format_pairs(conversations: Sequence[dict], seed: int = 0, system: bool = True) -> list[dict]:
    """Bare answer chosen over the same answer with a hedge ("8, I think."): the format the
    exact-match graders want, for SFT data that mixed both (see `verbose_answers`)."""
    rows = []
    for c in conversations:
        prompt = [m for m in c["conversations"][:-1] if system or m["role"] != "system"]
        answer = c["conversations"][-1]["content"]
        suffix = VERBOSE.format("")
        bare = answer[: -len(suffix)] if answer.endswith(suffix) else answer
        rows.append({"prompt": prompt, "chosen": bare, "rejected": VERBOSE.format(bare), "task": c["task"]})
    return rows


def verbose_answers(conversations: Sequence[dict], fraction: float, seed: int = 0) -> list[dict]:
    """Copies of SFT conversations where `fraction` of the answers are wrapped as VERBOSE: demonstration
    data with an inconsistent format, which the post-training experiment then repairs."""
    rng = random.Random(seed)
    out = []
    for c in conversations:
        c = {**c, "conversations": [dict(m) for m in c["conversations"]]}
        if rng.random() < fraction:
            c["conversations"][-1]["content"] = VERBOSE.format(c["conversations"][-1]["content"])
        out.append(c)
    return out


PAIR_KINDS = {"correct": to_pairs, "style": to_style_pairs, "format": to_format_pairs}


def make_preference_splits(n_train: int, n_val: int, seed: int = 0, tasks: Sequence[str] = TASKS,
                           system: bool = True, kind: str = "correct") -> tuple[list[dict], list[dict]]:
    """Train and held-out preference rows of `kind` ("correct" or "style"; held-out phrasings)."""
    if kind not in PAIR_KINDS:
        raise ValueError(f"unknown preference kind {kind!r}; use one of {sorted(PAIR_KINDS)}")
    if kind == "style":
        tasks = [t for t in tasks if t in LETTER_TASKS] or list(LETTER_TASKS)
    train, val = make_splits(n_train, n_val, seed, tasks, system)
    return PAIR_KINDS[kind](train, seed, system), PAIR_KINDS[kind](val, seed + 1, system)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="write synthetic preference pairs (train.jsonl, val.jsonl)")
    p.add_argument("--out", required=True)
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--val", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--kind", default="correct", choices=sorted(PAIR_KINDS))
    p.add_argument("--system", action="store_true", help=f"start each prompt with the system prompt {SYSTEM_PROMPT!r}")
    args = p.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    train, val = make_preference_splits(args.train, args.val, args.seed, tasks, args.system, kind=args.kind)
    out = Path(args.out)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "val.jsonl", val)
    print(f"wrote {len(train)} train / {len(val)} val {args.kind} preference pairs to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
