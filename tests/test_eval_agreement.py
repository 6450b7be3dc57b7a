"""diyllm eval on a tiny trained checkpoint: the CLI end to end, and item-by-item agreement with
lm-evaluation-harness's `hf` model on the same items (lm-eval's own task configs, pointed at local JSONL).

Everything is offline: the items are the fixtures of eval_fixtures.py, the model is exported to the Hugging
Face format with diyllm.interop, and lm-eval reads the JSONL files with the `json` dataset builder.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from eval_fixtures import TASK_ROWS, train_tiny_checkpoint, write_task_dir  # noqa: E402

AGREEMENT_TASKS = {  # diyllm task -> lm-eval's config file (relative to lm_eval/tasks)
    "hellaswag": "hellaswag/hellaswag.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "piqa": "piqa/piqa.yaml",
    "winogrande": "winogrande/default.yaml",
    "lambada": "lambada/lambada_openai.yaml",
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("eval_agreement")
    return train_tiny_checkpoint(root / "ckpt", steps=30), write_task_dir(root / "data")


def test_cli_end_to_end_table_and_results_json(trained, tmp_path, capsys):
    from diyllm.cli import main

    ckpt, data = trained
    out = tmp_path / "res" / "results.json"
    assert main(["eval", "--ckpt", str(ckpt), "--tasks", "hellaswag,piqa,mmlu", "--data_dir", str(data), "--limit",
                 "3", "--batch_size", "2", "--out", str(out), "--log_samples"]) == 0
    table = capsys.readouterr().out
    assert "hellaswag  acc_norm" in table and "CORE" in table
    res = json.loads(out.read_text())
    assert res["tasks"]["hellaswag"]["n"] == 3 and res["tasks"]["mmlu"]["n"] == 3
    assert len(res["samples"]["piqa"]) == 3 and {"pred", "pred_norm", "lls", "gold"} <= set(res["samples"]["piqa"][0])
    assert re.search(rf"mmlu\s+acc\s+{res['tasks']['mmlu']['metrics']['acc']['value']:.4f}\s", table)


def _lm_eval_task_yamls(folder: Path, data: Path) -> None:
    import lm_eval

    tasks_dir = Path(lm_eval.__file__).parent / "tasks"
    for name, config in AGREEMENT_TASKS.items():
        split, _ = TASK_ROWS[name]
        (folder / f"diy_{name}.yaml").write_text(
            f"include: {tasks_dir / config}\n"
            f"task: diy_{name}\ntag: []\ndataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    {split}: {data / name / (split + '.jsonl')}\n"
            "training_split: null\n"
            f"validation_split: {'validation' if split == 'validation' else 'null'}\n"
            f"test_split: {'test' if split == 'test' else 'null'}\n", encoding="utf-8")


def test_per_item_predictions_agree_with_lm_eval_hf(trained, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    import lm_eval
    from lm_eval.tasks import TaskManager

    from diyllm.eval import evaluate
    from diyllm.interop.hf import export_checkpoint
    from diyllm.loading import load_model

    ckpt, data = trained
    hf_dir = export_checkpoint(ckpt, tmp_path / "hf")
    (tmp_path / "tasks").mkdir()
    _lm_eval_task_yamls(tmp_path / "tasks", data)
    ref = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={hf_dir},dtype=float32", tasks=[f"diy_{n}" for n in AGREEMENT_TASKS],
        task_manager=TaskManager(include_path=str(tmp_path / "tasks")), batch_size=4, device="cpu",
        log_samples=True)
    model, tok, _ = load_model(ckpt)
    ours = evaluate(model, tok, list(AGREEMENT_TASKS), data_dir=data, log_samples=True, progress=False)
    for name in AGREEMENT_TASKS:
        theirs = sorted(ref["samples"][f"diy_{name}"], key=lambda s: s["doc_id"])
        mine = ours["samples"][name]
        assert len(theirs) == len(mine) == len(TASK_ROWS[name][1])
        for t, m in zip(theirs, mine):
            lls = [r[0] for r in t["filtered_resps"]]
            assert m["lls"] == pytest.approx(lls, abs=1e-3), (name, t["doc_id"])
            if name == "lambada":
                assert m["greedy"] == bool(t["acc"])
                continue
            assert float(m["pred"] == m["gold"]) == t["acc"], (name, t["doc_id"])
            if "acc_norm" in t:
                assert float(m["pred_norm"] == m["gold"]) == t["acc_norm"], (name, t["doc_id"])
        for metric, value in ref["results"][f"diy_{name}"].items():
            key = metric.split(",")[0]
            if key in ours["tasks"][name]["metrics"] and not key.endswith("_stderr"):
                assert ours["tasks"][name]["metrics"][key]["value"] == pytest.approx(value, rel=1e-4), (name, key)
        acc_stderr = ref["results"][f"diy_{name}"]["acc_stderr,none"]
        assert ours["tasks"][name]["metrics"]["acc"]["stderr"] == pytest.approx(acc_stderr, rel=1e-6)
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_chat_prompts_go_through_the_chat_template(trained, monkeypatch):
    import importlib

    from diyllm.data.chat_template import IM_START, encode_chat
    from diyllm.eval import evaluate
    from diyllm.eval.tasks import get_task
    from diyllm.loading import load_model

    ckpt, _ = trained
    model, tok, _ = load_model(ckpt)
    gen = importlib.import_module("diyllm.generation.generate")
    seen = []
    real = gen.generate

    def spy(model, batch, *args, **kwargs):
        seen.extend(batch)
        return real(model, batch, *args, **kwargs)

    monkeypatch.setattr(gen, "generate", spy)
    res = evaluate(model, tok, "synthetic", chat=True, limit=2, log_samples=True, progress=False)
    doc = get_task("synthetic").parse(__import__("diyllm.data.synthetic", fromlist=["make_splits"]).make_splits(
        400, 200, seed=0)[1][0])
    assert seen[0] == encode_chat(tok, list(doc.messages), add_generation_prompt=True)[0]
    assert seen[0][0] == tok.special_token_id(IM_START)
    for s in res["samples"]["synthetic"]:
        assert s["exact_match"] == (s["pred"] == s["gold"] and s["gold"] != "")
