"""Eval benchmark: items/s of diyllm eval vs lm-evaluation-harness's `hf` model, same checkpoint, same items.

One randomly initialised model (diyllm shape, exported to the Hugging Face Llama format with
diyllm.interop) and generated items in the public formats of HellaSwag, ARC-Easy, PIQA, Winogrande and
MMLU. lm-eval runs its own task configs pointed at the local JSONL (offline); diyllm runs `evaluate` on
the same files. Both on CPU, same batch size, same threads, in the same process, each timed end to end
(data loading, tokenization, scoring) after one warm-up pass; the per-item argmax of the two is compared
too. diyllm packs the choices of an item behind one copy of their shared context (see
diyllm/eval/loglik.py); lm-eval runs one row per choice.

usage: python benchmarks/bench_eval.py [--items 100] [--d_model 256] [--layers 4] [--batch_size 16]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

_TEXT = ("the man woman dog cat car house tree river walks runs sees opens closes paints reads writes small big "
         "red blue green quickly slowly into over under with from a an of to and then")
WORDS = tuple(_TEXT.split(" "))
TASK_CONFIGS = {"hellaswag": ("validation", "hellaswag/hellaswag.yaml"), "arc_easy": ("test", "arc/arc_easy.yaml"),
                "piqa": ("validation", "piqa/piqa.yaml"), "winogrande": ("validation", "winogrande/default.yaml"),
                "mmlu": ("test", "mmlu/default/_default_template_yaml")}


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_rows(task: str, n: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(n):
        if task == "hellaswag":
            rows.append({"activity_label": _sentence(rng, 2), "ctx_a": _sentence(rng, 25) + ".",
                         "ctx_b": _sentence(rng, 4), "endings": [_sentence(rng, rng.randint(10, 25)) for _ in range(4)],
                         "label": str(rng.randrange(4))})
        elif task == "arc_easy":
            rows.append({"question": _sentence(rng, 20) + "?", "choices": {
                "text": [_sentence(rng, rng.randint(1, 6)) for _ in range(4)], "label": list("ABCD")},
                "answerKey": rng.choice("ABCD")})
        elif task == "piqa":
            rows.append({"goal": _sentence(rng, 12), "sol1": _sentence(rng, rng.randint(8, 30)),
                         "sol2": _sentence(rng, rng.randint(8, 30)), "label": rng.randrange(2)})
        elif task == "winogrande":
            rows.append({"sentence": _sentence(rng, 10) + " _ " + _sentence(rng, 8) + ".", "option1": _sentence(rng, 2),
                         "option2": _sentence(rng, 2), "answer": rng.choice("12")})
        else:
            rows.append({"question": _sentence(rng, 30) + "?", "subject": "astronomy",
                         "choices": [_sentence(rng, rng.randint(1, 8)) for _ in range(4)], "answer": rng.randrange(4)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=100, help="items per task")
    parser.add_argument("--d_model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--tasks", default=",".join(TASK_CONFIGS))
    args = parser.parse_args()
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[var] = "1"
    tmp = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    os.environ["HF_DATASETS_CACHE"] = str(tmp / "hf_datasets")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from diyllm.eval import evaluate
    from diyllm.interop.hf import export_hf
    from diyllm.model import DIYConfig, DIYForCausalLM
    from diyllm.tokenizers import BPETokenizer, train_bpe

    tasks = [t for t in args.tasks.split(",") if t]
    rng = random.Random(0)
    (tmp / "corpus.txt").write_text(" ".join(WORDS) * 20 + "\nQuestion: Answer: A. B. C. D.\n", encoding="utf-8")
    vocab, merges = train_bpe(tmp / "corpus.txt", 320, ["<|endoftext|>"])
    tok = BPETokenizer(vocab, merges, ["<|endoftext|>"])
    torch.manual_seed(0)
    cfg = DIYConfig(vocab_size=tok.vocab_size, context_length=512, d_model=args.d_model, num_layers=args.layers,
                    num_heads=max(1, args.d_model // 64), d_ff=4 * args.d_model)
    model = DIYForCausalLM(cfg).eval()
    hf_dir = export_hf(model, tmp / "hf", tok)
    lm_eval_tasks = Path(lm_eval.__file__).parent / "tasks"
    (tmp / "yaml").mkdir()
    for name in tasks:
        split, config = TASK_CONFIGS[name]
        (tmp / "data" / name).mkdir(parents=True)
        with open(tmp / "data" / name / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for row in make_rows(name, args.items, rng):
                f.write(json.dumps(row) + "\n")
        extra = ('description: "The following are multiple choice questions (with answers) about astronomy.\\n\\n"\n'
                 if name == "mmlu" else "")
        (tmp / "yaml" / f"bench_{name}.yaml").write_text(
            f"include: {lm_eval_tasks / config}\ntask: bench_{name}\ntag: []\ndataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    {split}: {tmp / 'data' / name / (split + '.jsonl')}\n"
            "training_split: null\nfewshot_split: null\n"
            f"validation_split: {'validation' if split == 'validation' else 'null'}\n"
            f"test_split: {'test' if split == 'test' else 'null'}\n{extra}", encoding="utf-8")

    hflm = HFLM(pretrained=str(hf_dir), dtype="float32", batch_size=args.batch_size, device="cpu")
    manager = TaskManager(include_path=str(tmp / "yaml"))
    print(f"model: d_model={args.d_model} layers={args.layers} ({model.num_parameters() / 1e6:.1f}M params), "
          f"{args.items} items per task, batch_size {args.batch_size}, {torch.get_num_threads()} threads")
    print(f"{'task':<12}{'diyllm items/s':>16}{'lm-eval items/s':>17}{'ratio':>8}{'same argmax':>13}")
    total_ours = total_theirs = 0.0
    for name in tasks:
        def ours(name=name):
            return evaluate(model, tok, name, data_dir=tmp / "data", batch_size=args.batch_size, log_samples=True,
                            progress=False)

        def theirs(name=name):
            return lm_eval.simple_evaluate(model=hflm, tasks=[f"bench_{name}"], task_manager=manager,
                                           log_samples=True, verbosity="ERROR")
        ours(), theirs()  # warm-up (first-call costs: dataset builder, thread pools)
        t0 = time.perf_counter()
        mine = ours()
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref = theirs()
        t_theirs = time.perf_counter() - t0
        samples = sorted(ref["samples"][f"bench_{name}"], key=lambda s: s["doc_id"])
        same = sum(float(m["pred"] == m["gold"]) == s["acc"] for m, s in zip(mine["samples"][name], samples))
        total_ours += t_ours
        total_theirs += t_theirs
        print(f"{name:<12}{args.items / t_ours:>16.1f}{args.items / t_theirs:>17.1f}{t_theirs / t_ours:>7.2f}x"
              f"{same:>8}/{args.items}")
    n = args.items * len(tasks)
    print(f"{'all':<12}{n / total_ours:>16.1f}{n / total_theirs:>17.1f}{total_theirs / total_ours:>7.2f}x")


if __name__ == "__main__":
    main()
