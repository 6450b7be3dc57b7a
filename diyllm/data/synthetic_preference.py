"""Synthetic preference pairs from the synthetic tasks: the correct answer is chosen, a plausible wrong
one (a neighbouring sum, another capital, a misspelling, an off-by-one count) is rejected.

Train and val use disjoint question phrasings, as in `diyllm.data.synthetic.make_splits`, so held-out
preference accuracy measures whether the model learned which answers are right, not the strings.

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


def make_preference_splits(n_train: int, n_val: int, seed: int = 0, tasks: Sequence[str] = TASKS,
                           system: bool = True) -> tuple[list[dict], list[dict]]:
    """Train and held-out preference rows (held-out phrasings, as make_splits)."""
    train, val = make_splits(n_train, n_val, seed, tasks, system)
    return to_pairs(train, seed, system), to_pairs(val, seed + 1, system)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="write synthetic preference pairs (train.jsonl, val.jsonl)")
    p.add_argument("--out", required=True)
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--val", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", default=",".join(TASKS))
    args = p.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    train, val = make_preference_splits(args.train, args.val, args.seed, tasks)
    out = Path(args.out)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "val.jsonl", val)
    print(f"wrote {len(train)} train / {len(val)} val preference pairs to {out} "
          f"(system prompt: {SYSTEM_PROMPT!r})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
