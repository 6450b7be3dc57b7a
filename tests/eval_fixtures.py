"""Tiny task files in the public datasets' own row formats, and a tiny trained checkpoint, for the eval tests.

Hand-written items (never downloaded): a few HellaSwag / ARC / PIQA / Winogrande / LAMBADA / MMLU / GSM8K
rows. The checkpoint is a 2-layer model trained for a few steps on the same texts with a small BPE
tokenizer, so its choices are neither uniform nor random.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

HELLASWAG = [
    {"activity_label": "Baking cookies", "ctx_a": "A woman mixes flour and sugar in a bowl.", "ctx_b": "she",
     "endings": ["pours the dough onto a tray and bakes it.", "swims across the lake.",
                 "paints the [title] fence red.", "reads a book about trains."], "label": "0"},
    {"activity_label": "Washing a car", "ctx_a": "A man sprays water on a dirty car.", "ctx_b": "then he",
     "endings": ["plays the piano loudly.", "scrubs the car with a soapy sponge.", "flies a kite.",
                 "eats a sandwich on the roof."], "label": "1"},
    {"activity_label": "Running", "ctx_a": "A runner ties her shoes at the start line.", "ctx_b": "the runner",
     "endings": ["bakes a cake.", "sings to the crowd.", "starts running down the track.", "falls asleep."],
     "label": "2"},
    {"activity_label": "Playing guitar", "ctx_a": "A boy holds a guitar on his knee.", "ctx_b": "he",
     "endings": ["cooks rice.", "drives a bus.", "mows the lawn.", "strums the strings and sings a song."],
     "label": "3"},
    {"activity_label": "Gardening", "ctx_a": "A man digs a hole in the garden.", "ctx_b": "he",
     "endings": ["plants a small tree in the hole.", "boards a plane.", "writes an email.", "knits a hat."],
     "label": "0"},
    {"activity_label": "Swimming", "ctx_a": "A girl jumps into the pool.", "ctx_b": "she",
     "endings": ["opens an umbrella.", "swims to the other side of the pool.", "bakes bread.",
                 "climbs a mountain."], "label": "1"},
]

ARC = [
    {"id": "a1", "question": "Which of these is a source of light?",
     "choices": {"text": ["the sun", "a rock", "a shoe", "a spoon"], "label": ["A", "B", "C", "D"]}, "answerKey": "A"},
    {"id": "a2", "question": "What do plants need to make food?",
     "choices": {"text": ["sand", "sunlight", "plastic", "noise"], "label": ["A", "B", "C", "D"]}, "answerKey": "B"},
    {"id": "a3", "question": "Which state of matter is ice?",
     "choices": {"text": ["gas", "liquid", "solid"], "label": ["1", "2", "3"]}, "answerKey": "3"},
    {"id": "a4", "question": "What force pulls objects toward the Earth?",
     "choices": {"text": ["magnetism", "friction", "wind", "gravity"], "label": ["A", "B", "C", "D"]},
     "answerKey": "D"},
    {"id": "a5", "question": "Which animal has feathers?",
     "choices": {"text": ["a bird", "a fish", "a dog", "a frog"], "label": ["A", "B", "C", "D"]}, "answerKey": "A"},
]

PIQA = [
    {"goal": "How do I cool down a hot drink?", "sol1": "Add an ice cube to the drink.",
     "sol2": "Put the drink in the oven.", "label": 0},
    {"goal": "How can I dry wet hands?", "sol1": "Dip them in water.", "sol2": "Wipe them on a towel.", "label": 1},
    {"goal": "How do I open a locked door?", "sol1": "Use the key in the lock.", "sol2": "Shout at the door.",
     "label": 0},
    {"goal": "How do I light a dark room?", "sol1": "Close the curtains.", "sol2": "Switch on the lamp.",
     "label": 1},
]

WINOGRANDE = [
    {"sentence": "The cup fell off the table because _ was too close to the edge.", "option1": "the cup",
     "option2": "the table", "answer": "1"},
    {"sentence": "Anna gave Beth a book because _ had finished reading it.", "option1": "Anna", "option2": "Beth",
     "answer": "1"},
    {"sentence": "The dog chased the cat until _ climbed up the tree.", "option1": "the dog", "option2": "the cat",
     "answer": "2"},
    {"sentence": "The bag would not fit in the box because _ was too big.", "option1": "the bag",
     "option2": "the box", "answer": "1"},
]

LAMBADA = [
    {"text": "She opened the door, stepped into the rain and opened her umbrella"},
    {"text": "He poured the milk into the bowl and then added the cereal"},
    {"text": "The children ran to the beach to swim in the sea"},
]

MMLU = [
    {"question": "What is 2 + 3?", "subject": "elementary_mathematics", "choices": ["4", "5", "6", "7"], "answer": 1},
    {"question": "Which planet is closest to the Sun?", "subject": "astronomy",
     "choices": ["Venus", "Earth", "Mercury", "Mars"], "answer": 2},
    {"question": "What is 10 - 4?", "subject": "elementary_mathematics", "choices": ["6", "5", "4", "3"], "answer": 0},
    {"question": "What gas do humans breathe in to live?", "subject": "biology",
     "choices": ["helium", "carbon dioxide", "neon", "oxygen"], "answer": 3},
]

GSM8K = [
    {"question": "Tom has 3 apples and buys 2 more. How many apples does he have?",
     "answer": "Tom has 3 + 2 = 5 apples.\n#### 5"},
    {"question": "A box holds 4 pens. How many pens are in 3 boxes?", "answer": "3 * 4 = 12 pens.\n#### 12"},
    {"question": "Sara had 1,200 dollars and spent 200. How much is left?",
     "answer": "1200 - 200 = 1000 dollars.\n#### 1,000"},
]

TASK_ROWS = {"hellaswag": ("validation", HELLASWAG), "arc_easy": ("test", ARC), "piqa": ("validation", PIQA),
             "winogrande": ("validation", WINOGRANDE), "lambada": ("test", LAMBADA), "mmlu": ("test", MMLU),
             "gsm8k": ("test", GSM8K)}


def write_task_dir(root: Path, tasks: dict = TASK_ROWS) -> Path:
    """DIR/<task>/<split>.jsonl for every fixture task (the --data_dir layout)."""
    for task, (split, rows) in tasks.items():
        (root / task).mkdir(parents=True, exist_ok=True)
        with open(root / task / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return root


def corpus() -> str:
    """Every fixture text, for training the tokenizer and the model."""
    parts = []
    for r in HELLASWAG:
        parts.append(f"{r['activity_label']}: {r['ctx_a']} {r['ctx_b'].capitalize()} {r['endings'][int(r['label'])]}")
    for r in ARC:
        parts.append(f"Question: {r['question']}\nAnswer: {r['choices']['text'][0]}")
    for r in PIQA:
        parts.append(f"Question: {r['goal']}\nAnswer: {r['sol1']} {r['sol2']}")
    parts += [r["sentence"] for r in WINOGRANDE] + [r["text"] for r in LAMBADA]
    parts += [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in GSM8K]
    return "\n\n".join(parts) + "\n"


def train_tiny_checkpoint(folder: Path, steps: int = 40, context_length: int = 128) -> Path:
    """A tiny BPE tokenizer + model trained `steps` AdamW steps on corpus(); returns the .pt path."""
    from diyllm.checkpoints import save_checkpoint
    from diyllm.model import DIYConfig, DIYForCausalLM
    from diyllm.tokenizers import BPETokenizer, train_bpe

    folder.mkdir(parents=True, exist_ok=True)
    text = corpus()
    (folder / "corpus.txt").write_text(text * 3, encoding="utf-8")
    vocab, merges = train_bpe(folder / "corpus.txt", 400, ["<|endoftext|>"])
    tok = BPETokenizer(vocab, merges, ["<|endoftext|>"])
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(folder / "tok.json")
    g = torch.Generator().manual_seed(0)
    cfg = DIYConfig(vocab_size=tok.vocab_size, context_length=context_length, d_model=64, num_layers=2, num_heads=4,
                    d_ff=128)
    torch.manual_seed(0)
    model = DIYForCausalLM(cfg)
    ids = torch.tensor(tok.encode(text))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    T = min(64, context_length)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - T - 1, (8,), generator=g)
        x = torch.stack([ids[s : s + T] for s in starts])
        y = torch.stack([ids[s + 1 : s + T + 1] for s in starts])
        loss = model(x, targets=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    path = folder / "best.pt"
    save_checkpoint(model, None, steps, path, model_config=cfg.to_dict(),
                    tokenizer=(folder / "tok.json").read_text(encoding="utf-8"))
    return path
