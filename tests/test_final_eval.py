"""final_val_tokens: the end-of-run val loss over the whole split, every token scored once."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_trainer import TEXT, make_char_dataset, tiny_cfg

from diyllm.errors import UserError
from diyllm.model import DIYConfig, DIYForCausalLM
from diyllm.training import components
from diyllm.training.checkpoint import load_model
from diyllm.training.components import FinalSplitEval
from diyllm.training.distributed import DistInfo
from diyllm.training.metrics import read_metrics
from diyllm.training.objective import NextTokenLoss
from diyllm.training.trainer import train


def brute_force_loss(model, tokens: np.ndarray, context: int, max_tokens: int) -> float:
    """Every window scored alone, the per-token losses summed in float64: the definition, written out."""
    n = min(len(tokens) - 1, max_tokens) // context * context
    total = 0.0
    with torch.no_grad():
        for s in range(0, n, context):
            x = torch.from_numpy(tokens[s : s + context].astype(np.int64))[None]
            y = torch.from_numpy(tokens[s + 1 : s + context + 1].astype(np.int64))
            total += F.cross_entropy(model(x).logits[0].double(), y, reduction="sum").item()
    return total / n


@pytest.fixture(scope="module")
def model_and_tokens():
    torch.manual_seed(0)
    model = DIYForCausalLM(DIYConfig(vocab_size=50, context_length=24, d_model=32, num_layers=2, num_heads=2,
                                     d_ff=64)).eval()
    tokens = np.random.default_rng(0).integers(0, 50, size=24 * 23 + 7).astype(np.uint16)  # 23 windows + a tail
    return model, tokens


@pytest.mark.parametrize("max_tokens,batch", [(10**9, 5), (24 * 10 + 3, 4), (24 * 23, 23)])
def test_equals_every_window_scored_alone(model_and_tokens, max_tokens, batch):
    model, tokens = model_and_tokens
    scorer = FinalSplitEval(tokens, 24, max_tokens, batch, NextTokenLoss(), torch.device("cpu"), torch.float32,
                            DistInfo(), meta={"bytes_per_token": 2.0})
    got = scorer.evaluate(model)
    expected_tokens = min(len(tokens) - 1, max_tokens) // 24 * 24  # whole windows only; the tail is left out
    assert got["val_tokens"] == scorer.num_tokens == expected_tokens
    assert got["val_loss"] == pytest.approx(brute_force_loss(model, tokens, 24, max_tokens), rel=1e-6)
    assert got["val_bpb"] == pytest.approx(got["val_loss"] / math.log(2) / 2.0)
    assert not model.training  # it was in eval mode before, and is again


def test_ranks_share_the_windows_and_run_equal_batches(model_and_tokens, monkeypatch):
    """Two ranks, each scoring every other window: their sums add up to one process's, and both run the same
    number of forwards of the same shape (an FSDP forward is a collective)."""
    model, tokens = model_and_tokens
    cpu = torch.device("cpu")
    single = FinalSplitEval(tokens, 24, 10**9, 4, NextTokenLoss(), cpu, torch.float32, DistInfo(), None)
    expected = single.evaluate(model)["val_loss"]
    totals, shapes = [], {0: [], 1: []}

    class Recording(NextTokenLoss):
        def eval_loss(self, model, batch):
            shapes[rank].append(tuple(batch[0].shape))
            return super().eval_loss(model, batch)

    monkeypatch.setattr(components.torch_dist, "all_reduce", lambda t: totals.append(t.clone()))
    for rank in (0, 1):
        FinalSplitEval(tokens, 24, 10**9, 4, Recording(), cpu, torch.float32,
                       DistInfo(rank=rank, world_size=2), None).evaluate(model)
    loss_sum, count = (totals[0] + totals[1]).tolist()
    assert count == single.num_tokens == 23 * 24  # 12 + 11 windows: rank 1's 12th is a repeat, ignored
    assert loss_sum / count == pytest.approx(expected, rel=1e-6)  # other batches: float32 means differ
    assert shapes[0] == shapes[1] == [(4, 24), (4, 24), (4, 24)]


def test_the_trainer_scores_its_last_weights_at_the_end(tmp_path):
    data = make_char_dataset(tmp_path / "data", n_chars=12_000)
    result = train(tiny_cfg(data, tmp_path / "run", max_iters=6, eval_interval=3, final_val_tokens=10**9))
    records = read_metrics(tmp_path / "run")
    final = [r for r in records if r["event"] == "final_eval"]
    assert len(final) == 1 and final[0]["iter"] == 6 and records[-1]["event"] == "end"
    model = load_model(tmp_path / "run" / "latest.pt")[0]
    val = np.fromfile(data / "val.bin", dtype=np.uint16)
    assert final[0]["val_tokens"] == (len(val) - 1) // 16 * 16
    assert final[0]["val_loss"] == pytest.approx(brute_force_loss(model.eval(), val, 16, 10**9), rel=1e-5)
    # a character per token: bits per byte is the loss in bits
    assert final[0]["val_bpb"] == pytest.approx(final[0]["val_loss"] / math.log(2), rel=1e-6)
    assert result.final_split_val_loss == final[0]["val_loss"] and result.final_split_val_bpb == final[0]["val_bpb"]
    assert records[-1]["final_split_val_loss"] == final[0]["val_loss"]


def test_off_by_default_and_refused_without_a_token_split(tmp_path, capsys):
    data = make_char_dataset(tmp_path / "data", n_chars=12_000)
    result = train(tiny_cfg(data, tmp_path / "run", max_iters=2))
    assert math.isnan(result.final_split_val_loss)
    assert not any(r["event"] == "final_eval" for r in read_metrics(tmp_path / "run"))
    assert "final over the val split" not in capsys.readouterr().out
    texts = tmp_path / "texts.jsonl"  # raw text, tokenized as it streams in: no split of tokens to score
    texts.write_text("".join(f'{{"text": "{TEXT}"}}\n' for _ in range(40)))
    with pytest.raises(UserError, match="scores the val split of a prepared dataset.*reads JsonlPretrainSource"):
        train(tiny_cfg(texts, tmp_path / "jsonl", data_format="jsonl", tokenizer_path=str(data / "tokenizer.json"),
                       final_val_tokens=100))
    assert not (tmp_path / "jsonl").exists()  # nothing half-written

    class Custom(NextTokenLoss):  # any other objective: its loss is not the split's next-token loss
        pass

    with pytest.raises(UserError, match="final_val_tokens scores the next-token loss; this run trains with Custom"):
        train(tiny_cfg(data, tmp_path / "custom", final_val_tokens=100), objective=Custom())
    assert not (tmp_path / "custom").exists()
    with pytest.raises(UserError, match="final_val_tokens=10 is less than one window of context_length=16"):
        train(tiny_cfg(data, tmp_path / "short", final_val_tokens=10))
    assert not (tmp_path / "short").exists()
    with pytest.raises(UserError, match="final_val_tokens must be >= 0"):
        tiny_cfg(data, tmp_path / "bad", final_val_tokens=-1)


def test_compare_and_plot_show_the_whole_split_score(tmp_path):
    from diyllm.lab.compare import compare_runs
    from diyllm.lab.metrics import read_run
    from diyllm.lab.plot import plot_runs

    data = make_char_dataset(tmp_path / "data", n_chars=12_000)
    train(tiny_cfg(data, tmp_path / "plain", max_iters=3))
    table = compare_runs([tmp_path / "plain"])
    assert "whole split" not in table  # no run has it: no column
    train(tiny_cfg(data, tmp_path / "scored", max_iters=3, final_val_tokens=10**9))
    run = read_run(tmp_path / "scored")
    assert run.final_eval is not None and run.final_eval["iter"] == 3
    table = compare_runs([tmp_path / "plain", tmp_path / "scored"])
    header, _, plain_row, scored_row = table.splitlines()[:4]
    assert header.split("|")[-2].strip() == "val, whole split"
    assert plain_row.split("|")[-2].strip() == "–"
    assert scored_row.split("|")[-2].strip() == f"{run.final_eval['val_loss']:.4f}"
    for x in ("step", "tokens", "time"):
        assert plot_runs([run], tmp_path / f"{x}.png", x=x).stat().st_size > 0


def test_diyllm_eval_val_split_gives_the_trainers_final_score(tmp_path, capsys):
    import json

    from diyllm.cli import main

    data = make_char_dataset(tmp_path / "data", n_chars=12_000)
    train(tiny_cfg(data, tmp_path / "run", max_iters=4, final_val_tokens=10**9))
    final = next(r for r in read_metrics(tmp_path / "run") if r["event"] == "final_eval")
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(tmp_path / "run"), "--val_split", str(data), "--out",
                 str(tmp_path / "score.json")]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert f"val loss {final['val_loss']:.4f} | val bpb {final['val_bpb']:.4f} over {final['val_tokens']:,}" in line
    saved = json.loads((tmp_path / "score.json").read_text())
    assert saved["val_tokens"] == final["val_tokens"]
    assert saved["val_loss"] == pytest.approx(final["val_loss"], rel=1e-6)
    other = make_char_dataset(tmp_path / "other", n_chars=3_000)
    from diyllm.tokenizers import CharTokenizer

    CharTokenizer.train(TEXT.upper()).save(other / "tokenizer.json")  # another tokenizer beside the ids
    for argv, message in [([], "give --tasks NAMES (benchmarks) or --val_split DIR"),
                          (["--val_split", str(data), "--tasks", "synthetic"], "give --tasks NAMES"),
                          (["--val_split", str(tmp_path / "nope")], "is not a prepared dataset"),
                          (["--val_split", str(data), "--max_tokens", "5"], "less than one window"),
                          (["--val_split", str(other)], "tokenizer is not the one")]:
        assert main(["eval", "--ckpt", str(tmp_path / "run"), *argv]) == 2
        assert message in capsys.readouterr().err
