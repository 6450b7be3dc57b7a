"""Synthetic conversations made offline: small tasks with one exact answer, for SFT experiments.

Tasks (each question has several phrasings, so a held-out phrasing of a known fact tests whether the
model learned the fact and the format rather than memorising strings):

* capital: "What is the capital of Peru?" -> "Lima" (from the table below)
* add:     "What is 3 + 5?" -> "8" (single digits, so a tiny model can learn the table)
* reverse: "Reverse the word 'stone'." -> "enots"
* spell:   "Spell 'stone'." -> "s-t-o-n-e"
* count:   "How many times does 'a' appear in 'banana'?" -> "3"

`make_splits` returns train/val conversations whose questions never overlap; `plain_text_corpus` states
the same facts as ordinary sentences for pretraining (so the base model knows them but has never seen the
chat format); diyllm.generation.exact_match scores a model's replies.

    python -m diyllm.data.synthetic --out data/synthetic_chat --train 2000 --val 200
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from pathlib import Path

from diyllm.atomic import atomic_write

CAPITALS = {
    "France": "Paris", "Peru": "Lima", "Japan": "Tokyo", "Egypt": "Cairo", "Italy": "Rome", "Spain": "Madrid",
    "Chile": "Santiago", "Kenya": "Nairobi", "Cuba": "Havana", "Norway": "Oslo", "Greece": "Athens",
    "Russia": "Moscow", "China": "Beijing", "Iran": "Tehran", "Iraq": "Baghdad", "Poland": "Warsaw",
    "Sweden": "Stockholm", "Austria": "Vienna", "Ireland": "Dublin", "Portugal": "Lisbon", "Mali": "Bamako",
    "Nepal": "Kathmandu", "Ghana": "Accra", "Canada": "Ottawa",
}
WORDS = ("stone", "river", "apple", "cloud", "tiger", "light", "plant", "house", "music", "bread", "chair",
         "green", "sugar", "night", "water", "smile", "dream", "ocean", "field", "storm", "glass", "horse")

TEMPLATES = {
    "capital": ("What is the capital of {c}?", "Name the capital of {c}.", "Which city is the capital of {c}?"),
    "add": ("What is {a} + {b}?", "Compute {a} + {b}.", "Add {a} and {b}."),
    "reverse": ("Reverse the word '{w}'.", "Write '{w}' backwards.", "What is '{w}' reversed?"),
    "spell": ("Spell '{w}'.", "Spell the word '{w}' with dashes.", "How do you spell '{w}'?"),
    "count": ("How many times does '{l}' appear in '{w}'?", "Count the letter '{l}' in '{w}'.",
              "How many '{l}' are in '{w}'?"),
}
TASKS = tuple(TEMPLATES)
SYSTEM_PROMPT = "Answer with the answer only."


def _instance(task: str, rng: random.Random) -> tuple[dict, str]:
    """(template fields, answer) of one random instance of `task`."""
    if task == "capital":
        c = rng.choice(sorted(CAPITALS))
        return {"c": c}, CAPITALS[c]
    if task == "add":
        a, b = rng.randrange(10), rng.randrange(10)
        return {"a": a, "b": b}, str(a + b)
    w = rng.choice(WORDS)
    if task == "reverse":
        return {"w": w}, w[::-1]
    if task == "spell":
        return {"w": w}, "-".join(w)
    if task == "count":
        letter = rng.choice(sorted(set(w)) + ["z"])
        return {"w": w, "l": letter}, str(w.count(letter))
    raise ValueError(f"unknown task {task!r}; known: {TASKS}")


def generate_conversations(n: int, seed: int = 0, tasks: Sequence[str] = TASKS, system: bool = True) -> list[dict]:
    """n conversations {"conversations": [...], "task", "answer", "template"}; same seed, same list."""
    for t in tasks:
        if t not in TEMPLATES:
            raise ValueError(f"unknown task {t!r}; known: {TASKS}")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        task = rng.choice(list(tasks))
        fields, answer = _instance(task, rng)
        template = rng.choice(TEMPLATES[task])
        question = template.format(**fields)
        messages = ([{"role": "system", "content": SYSTEM_PROMPT}] if system else []) + [
            {"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        out.append({"conversations": messages, "task": task, "answer": answer, "template": template})
    return out


def make_splits(n_train: int, n_val: int, seed: int = 0, tasks: Sequence[str] = TASKS,
                system: bool = True) -> tuple[list[dict], list[dict]]:
    """Train and held-out val conversations: val uses one phrasing per task that train never shows, so no
    val question appears in train (val is deduplicated too); the facts themselves are shared."""
    rng = random.Random(seed)
    held_out_templates = {rng.choice(TEMPLATES[t]) for t in tasks}  # one phrasing per task only in val
    pool = generate_conversations(4 * (n_train + n_val) + 100, seed, tasks, system)

    train = [c for c in pool if c["template"] not in held_out_templates][:n_train]
    seen = {c["conversations"][-2]["content"] for c in train}
    val, val_q = [], set()
    for c in pool:
        q = c["conversations"][-2]["content"]
        if c["template"] in held_out_templates and q not in seen and q not in val_q:
            val.append(c)
            val_q.add(q)
        if len(val) == n_val:
            break
    return train, val


def plain_text_corpus(n: int, seed: int = 0, tasks: Sequence[str] = TASKS) -> list[str]:
    """The tasks' facts as plain sentences (no chat format), for pretraining the base model."""
    rng = random.Random(seed)
    sentences = {
        "capital": lambda f, a: f"The capital of {f['c']} is {a}.",
        "add": lambda f, a: f"{f['a']} + {f['b']} = {a}.",
        "reverse": lambda f, a: f"The word {f['w']} reversed is {a}.",
        "spell": lambda f, a: f"The word {f['w']} is spelled {a}.",
        "count": lambda f, a: f"The letter {f['l']} appears {a} times in {f['w']}.",
    }
    docs = []
    for _ in range(n):
        k = rng.randint(3, 6)
        parts = []
        for _ in range(k):
            task = rng.choice(list(tasks))
            fields, answer = _instance(task, rng)
            parts.append(sentences[task](fields, answer))
        docs.append(" ".join(parts))
    return docs


def write_jsonl(path: str | Path, rows: Sequence[dict]) -> None:
    with atomic_write(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="write synthetic SFT conversations (train.jsonl, val.jsonl, "
                                            "pretrain.jsonl)")
    p.add_argument("--out", required=True)
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--val", type=int, default=200)
    p.add_argument("--pretrain_docs", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", default=",".join(TASKS))
    args = p.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    train, val = make_splits(args.train, args.val, args.seed, tasks)
    out = Path(args.out)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "val.jsonl", val)
    write_jsonl(out / "pretrain.jsonl", [{"text": t} for t in plain_text_corpus(args.pretrain_docs, args.seed, tasks)])
    print(f"wrote {len(train)} train / {len(val)} val conversations and {args.pretrain_docs} pretraining "
          f"documents to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
