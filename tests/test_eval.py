"""diyllm eval: scoring on a model whose logits the test controls, truncation, batching, few-shot, CORE,
generative scoring and bad input. (Agreement with lm-evaluation-harness: tests/test_eval_lm_eval.py.)"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from eval_fixtures import HELLASWAG, PIQA, write_task_dir  # noqa: E402

from diyllm.errors import UserError  # noqa: E402
from diyllm.eval import evaluate, get_task, parse_task_list  # noqa: E402
from diyllm.eval import metrics as M  # noqa: E402
from diyllm.eval.data import load_docs  # noqa: E402
from diyllm.eval.loglik import build_rows, encode_pair, loglikelihoods  # noqa: E402
from diyllm.eval.prompts import requests, sample_fewshot  # noqa: E402
from diyllm.eval.tasks import gsm8k_extract  # noqa: E402
from diyllm.model import DIYConfig, DIYForCausalLM  # noqa: E402
from diyllm.tokenizers import CharTokenizer  # noqa: E402

ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:?!'\n-_[]#+=*$"


class BigramStub(nn.Module):
    """logits[t] = table[token t]: the score of a continuation is a sum we can compute by hand."""

    def __init__(self, table: torch.Tensor, context_length: int = 512):
        super().__init__()
        self.table = nn.Parameter(table, requires_grad=False)
        self.config = DIYConfig(vocab_size=table.shape[0], context_length=context_length, d_model=8, num_layers=1,
                                num_heads=1)

    def forward(self, input_ids, positions=None, attn_mask=None, **_):
        return self.table[input_ids]


@pytest.fixture(scope="module")
def char_tok() -> CharTokenizer:
    return CharTokenizer.train(ALPHABET)


def _piqa_dir(tmp_path: Path, rows) -> Path:
    return write_task_dir(tmp_path, {"piqa": ("validation", rows)})


def test_uniform_logits_acc_prefers_short_acc_norm_prefers_long(tmp_path, char_tok):
    """All logits equal: ll = -(tokens) log V. ' b' (2 chars) beats ' cc' on acc; per character
    -2logV/1 < -3logV/2, so acc_norm picks 'cc'. With gold = 1: acc 0, acc_norm 1, by hand."""
    V = char_tok.vocab_size
    model = BigramStub(torch.zeros(V, V))
    data = _piqa_dir(tmp_path, [{"goal": "x", "sol1": "b", "sol2": "cc", "label": 1},
                                {"goal": "y", "sol1": "dd", "sol2": "e", "label": 1}])
    res = evaluate(model, char_tok, "piqa", data_dir=data, log_samples=True, progress=False)
    s = res["samples"]["piqa"]
    assert [x["pred"] for x in s] == [0, 1] and [x["pred_norm"] for x in s] == [1, 0]
    assert s[0]["lls"] == pytest.approx([-2 * math.log(V), -3 * math.log(V)], rel=1e-6)
    m = res["tasks"]["piqa"]["metrics"]
    assert m["acc"]["value"] == 0.5 and m["acc_norm"]["value"] == 0.5
    assert m["acc"]["stderr"] == pytest.approx(np.std([0.0, 1.0], ddof=1) / math.sqrt(2))


def test_random_bigram_scores_equal_float64_reference(tmp_path, char_tok):
    V = char_tok.vocab_size
    g = torch.Generator().manual_seed(3)
    table = torch.randn(V, V, generator=g) * 3
    model = BigramStub(table)
    data = write_task_dir(tmp_path, {"hellaswag": ("validation", HELLASWAG)})
    res = evaluate(model, char_tok, "hellaswag", data_dir=data, log_samples=True, progress=False, batch_size=3)
    logp = torch.log_softmax(table.double(), -1)
    task = get_task("hellaswag")
    accs, norms = [], []
    for doc, sample in zip(load_docs(task, "validation", data), res["samples"]["hellaswag"]):
        ref = []
        for ctx, cont in requests(task, doc, []):
            ids = char_tok.encode(ctx + cont)
            n = len(char_tok.encode(cont))
            ref.append(sum(logp[ids[i - 1], ids[i]].item() for i in range(len(ids) - n, len(ids))))
        assert sample["lls"] == pytest.approx(ref, abs=1e-3)
        pred = int(np.argmax(ref))
        pred_norm = int(np.argmax(np.array(ref) / np.array([len(c) for c in doc.choices])))
        assert (sample["pred"], sample["pred_norm"]) == (pred, pred_norm)
        accs.append(pred == doc.gold)
        norms.append(pred_norm == doc.gold)
    m = res["tasks"]["hellaswag"]["metrics"]
    assert m["acc"]["value"] == pytest.approx(np.mean(accs)) and m["acc_norm"]["value"] == pytest.approx(np.mean(norms))


def test_encode_pair_moves_trailing_space_to_the_continuation(char_tok):
    ctx, cont = encode_pair(char_tok, "Answer: ", "yes")
    assert char_tok.decode(ctx) == "Answer:" and char_tok.decode(cont) == " yes"


@pytest.fixture(scope="module")
def tiny_model() -> DIYForCausalLM:
    torch.manual_seed(0)
    model = DIYForCausalLM(DIYConfig(vocab_size=80, context_length=96, d_model=32, num_layers=2, num_heads=4,
                                     d_ff=64))
    return model.eval()


def _groups(char_tok, task_name="hellaswag", rows=HELLASWAG):
    task = get_task(task_name)
    return [[encode_pair(char_tok, c, k) for c, k in requests(task, task.parse(r), [])] for r in rows]


def test_packed_and_plain_rows_and_any_batch_size_give_the_same_scores(tiny_model, char_tok):
    from eval_fixtures import WINOGRANDE

    groups = _groups(char_tok) + _groups(char_tok, "winogrande", WINOGRANDE) + _groups(char_tok, "piqa", PIQA)
    assert build_rows(groups, 96)[0][-1].segments[-1] > 0  # packing really happens
    ref, _ = loglikelihoods(tiny_model, groups, window=96, batch_size=1, pack=False)
    for pack, bs in [(True, 1), (True, 4), (False, 5), (True, 64)]:
        got, _ = loglikelihoods(tiny_model, groups, window=96, batch_size=bs, pack=pack)
        for a, b in zip(ref, got):
            assert [x[0] for x in b] == pytest.approx([x[0] for x in a], abs=1e-4)
            assert M.argmax([x[0] for x in a]) == M.argmax([x[0] for x in b])
            assert [x[1] for x in a] == [x[1] for x in b]


def test_long_context_is_left_truncated_and_counted(tiny_model):
    W = 24
    ctx, cont = list(range(1, 41)), [5, 6, 7]
    short = ([1, 2, 3], [4, 5])
    (res, res_short), truncated = loglikelihoods(tiny_model, [[(ctx, cont)], [short]], window=W)
    assert truncated == 1
    seq = (ctx + cont)[-(W + 1):]
    with torch.no_grad():
        logits = tiny_model(torch.tensor([seq[:-1]])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    ref = sum(logp[W - 3 + i, cont[i]].item() for i in range(3))
    assert res[0][0] == pytest.approx(ref, abs=1e-4)


def test_fewshot_is_seeded_and_never_the_evaluated_item():
    task = get_task("piqa")
    docs = [task.parse(r) for r in PIQA * 1] + [task.parse({**r, "goal": r["goal"] + "?"}) for r in PIQA]
    for i, doc in enumerate(docs):
        shots = sample_fewshot(docs, 3, seed=7, task="piqa", index=i, exclude=doc)
        assert len(shots) == 3 and doc not in shots
        assert shots == sample_fewshot(docs, 3, seed=7, task="piqa", index=i, exclude=doc)
    draws = {tuple(d.query for d in sample_fewshot(docs, 3, seed=s, task="piqa", index=0, exclude=docs[0]))
             for s in range(10)}
    assert len(draws) > 1  # the seed matters
    ctx = requests(task, docs[0], sample_fewshot(docs, 2, 7, "piqa", 0, docs[0]))[0][0]
    assert ctx.count("Question:") == 3 and ctx.endswith(docs[0].query)


def test_fewshot_run_uses_the_eval_split_without_the_item(tmp_path, char_tok):
    model = BigramStub(torch.zeros(char_tok.vocab_size, char_tok.vocab_size))
    res = evaluate(model, char_tok, "piqa", shots=2, data_dir=_piqa_dir(tmp_path, PIQA), progress=False)
    assert res["tasks"]["piqa"]["fewshot_split"] == "validation" and res["tasks"]["piqa"]["shots"] == 2


def test_centred_accuracy_and_core_mean():
    assert M.centred_accuracy(0.25, 0.25) == 0 and M.centred_accuracy(1.0, 0.25) == 1
    assert M.centred_accuracy(0.625, 0.5) == pytest.approx(0.25)
    assert M.centred_accuracy(0.0, 0.5) == -1
    assert M.core_score([0.25, -0.05, 0.4]) == pytest.approx(0.2)


def test_core_in_results_is_mean_of_centred(tmp_path, char_tok):
    model = BigramStub(torch.randn(char_tok.vocab_size, char_tok.vocab_size))
    data = write_task_dir(tmp_path, {"piqa": ("validation", PIQA), "hellaswag": ("validation", HELLASWAG)})
    res = evaluate(model, char_tok, ["piqa", "hellaswag"], data_dir=data, progress=False)
    t = res["tasks"]
    exp = [(t["piqa"]["metrics"]["acc_norm"]["value"] - 0.5) / 0.5,
           (t["hellaswag"]["metrics"]["acc_norm"]["value"] - 0.25) / 0.75]
    assert res["core"]["score"] == pytest.approx(sum(exp) / 2)


def test_gsm8k_answer_extraction_and_generative_scoring(tmp_path, char_tok, monkeypatch):
    assert gsm8k_extract("so 3+2=5\n#### 5") == "5" and gsm8k_extract("#### 1,000.") == "1000"
    assert gsm8k_extract("the answer is 5") == ""
    import importlib

    gen = importlib.import_module("diyllm.generation.generate")  # the module (the package exports the function)

    replies = iter(["5 apples.\n#### 5\nQuestion: next", "#### 13", "We get 1000.\n#### 1,000"])
    monkeypatch.setattr(gen, "generate", lambda model, batch, *a, **k: [char_tok.encode(next(replies)) for _ in batch])
    from eval_fixtures import GSM8K

    data = write_task_dir(tmp_path, {"gsm8k": ("test", GSM8K)})
    model = BigramStub(torch.zeros(char_tok.vocab_size, char_tok.vocab_size))
    res = evaluate(model, char_tok, "gsm8k", data_dir=data, batch_size=1, log_samples=True, progress=False)
    s = res["samples"]["gsm8k"]
    assert s[0]["generation"] == "5 apples.\n#### 5\n"  # cut at the stop string "Question:"
    assert [x["exact_match"] for x in s] == [True, False, True]
    assert res["tasks"]["gsm8k"]["metrics"]["exact_match"]["value"] == pytest.approx(2 / 3)
    assert "core" not in res  # generative tasks are not part of the CORE-style mean


# ---- bad input ---------------------------------------------------------------------------------------------
def test_unknown_task_lists_the_known_ones():
    with pytest.raises(UserError, match="unknown eval task 'helaswag'.*hellaswag.*arc_easy.*mmlu"):
        parse_task_list("helaswag,arc_easy")


def test_malformed_task_files_name_file_and_line(tmp_path, char_tok):
    model = BigramStub(torch.zeros(char_tok.vocab_size, char_tok.vocab_size))
    (tmp_path / "piqa").mkdir()
    f = tmp_path / "piqa" / "validation.jsonl"
    f.write_text(json.dumps(PIQA[0]) + "\n{not json\n")
    with pytest.raises(UserError, match=r"validation.jsonl:2: not valid JSON"):
        evaluate(model, char_tok, "piqa", data_dir=tmp_path, progress=False)
    f.write_text(json.dumps(PIQA[0]) + "\n\n" + json.dumps({"goal": "g", "sol1": "a", "label": 0}) + "\n")
    with pytest.raises(UserError, match=r"validation.jsonl:3: not a piqa row \(missing key 'sol2'\)"):
        evaluate(model, char_tok, "piqa", data_dir=tmp_path, progress=False)
    with pytest.raises(UserError, match=r"hellaswag/validation.jsonl does not exist.*--data_dir"):
        evaluate(model, char_tok, "hellaswag", data_dir=tmp_path, progress=False)


def test_offline_without_data_dir_explains_data_dir(tmp_path, char_tok, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DIYLLM_CACHE", str(tmp_path))
    model = BigramStub(torch.zeros(char_tok.vocab_size, char_tok.vocab_size))
    with pytest.raises(UserError, match=r"download arc_easy/test.*HF_HUB_OFFLINE.*--data_dir DIR.*arc_easy/test"):
        evaluate(model, char_tok, "arc_easy", progress=False)


@pytest.mark.parametrize("args, message", [
    (["--limit", "0"], "--limit must be at least 1"),
    (["--shots", "-1"], "--shots must be 0 or more"),
    (["--batch_size", "0"], "--batch_size must be at least 1"),
    (["--tasks", "nope"], "unknown eval task 'nope'; known tasks: hellaswag"),
])
def test_cli_refuses_bad_options_with_one_error_line(tmp_path, capsys, args, message):
    from diyllm.cli import main

    argv = ["eval", "--ckpt", str(tmp_path / "missing.pt"), "--tasks", "piqa", *args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_download_path_reads_the_hub_parquet_conversion_into_the_cache(tmp_path, char_tok, monkeypatch):
    """The real download code with the Hub replaced by local Parquet files (nothing leaves the machine):
    the split's files are picked from the parquet branch listing, C-Eval-style subject configs tag rows with
    their subject, and the cache file is used from then on."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    hub = pytest.importorskip("huggingface_hub")
    from diyllm.eval.data import PARQUET_REVISION

    files = {"accountant/val/0000.parquet": [{"question": "1+1?", "A": "1", "B": "2", "C": "3", "D": "4",
                                              "answer": "B"}],
             "law/val/0000.parquet": [{"question": "2+2?", "A": "4", "B": "2", "C": "3", "D": "1", "answer": "A"}],
             "law/dev/0000.parquet": [{"question": "x", "A": "a", "B": "b", "C": "c", "D": "d", "answer": "A"}]}
    for name, rows in files.items():
        (tmp_path / "hub" / name).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "hub" / name)
    calls = []

    def list_repo_files(self, repo, repo_type=None, revision=None):
        calls.append((repo, repo_type, revision))
        return [*files, "README.md"]

    monkeypatch.setattr(hub.HfApi, "list_repo_files", list_repo_files)
    monkeypatch.setattr(hub, "hf_hub_download", lambda repo, name, **kw: str(tmp_path / "hub" / name))
    monkeypatch.setenv("DIYLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    docs = load_docs(get_task("ceval"), "val")
    assert calls == [("ceval/ceval-exam", "dataset", PARQUET_REVISION)]
    assert [(d.subject, d.gold) for d in docs] == [("accountant", 1), ("law", 0)]
    assert docs[0].query.startswith("1+1?\nA. 1\nB. 2") and docs[0].query.endswith("答案：")
    cached = tmp_path / "cache" / "eval" / "ceval" / "val.jsonl"
    assert cached.exists()
    monkeypatch.setattr(hub.HfApi, "list_repo_files", lambda *a, **k: pytest.fail("the cache must be used"))
    assert load_docs(get_task("ceval"), "val") == docs
