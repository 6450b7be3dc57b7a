"""Benchmark evals during training: the eval component writes "eval_tasks" records to metrics.jsonl, which
`diyllm plot` draws and `diyllm compare` shows as columns."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from eval_fixtures import HELLASWAG, PIQA, write_task_dir  # noqa: E402

from diyllm.errors import UserError  # noqa: E402
from diyllm.eval.during_training import TaskEvalComponent  # noqa: E402
from diyllm.model import DIYConfig, DIYForCausalLM  # noqa: E402
from diyllm.tokenizers import CharTokenizer  # noqa: E402


def _tiny():
    tok = CharTokenizer.train("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:?!'\n-_[]")
    torch.manual_seed(0)
    model = DIYForCausalLM(DIYConfig(vocab_size=tok.vocab_size, context_length=160, d_model=32, num_layers=1,
                                     num_heads=2, d_ff=64))
    return model, tok


def test_component_logs_on_schedule_and_plot_compare_read_it(tmp_path):
    from diyllm.lab.compare import compare_runs
    from diyllm.lab.metrics import read_run
    from diyllm.lab.plot import plot_runs
    from diyllm.training.metrics import MetricsLogger

    model, tok = _tiny()
    data = write_task_dir(tmp_path / "data", {"piqa": ("validation", PIQA), "hellaswag": ("validation", HELLASWAG)})
    run_dir = tmp_path / "run"
    logger = MetricsLogger(run_dir)
    logger.log({"event": "start", "config": {}, "num_params": model.num_parameters()})
    comp = TaskEvalComponent(["piqa", "hellaswag"], interval=2, tokenizer=tok, log=logger.log, limit=3,
                             data_dir=str(data), print_fn=None)
    ran = []
    for step in range(1, 6):
        logger.log({"event": "train", "iter": step, "tokens": step * 100, "time": step * 0.1, "loss": 3.0 / step})
        if comp.maybe_run(model, step, tokens=step * 100, elapsed=step * 0.1, final=step == 5):
            ran.append(step)
        if step == 5 and comp.maybe_run(model, step, final=True) is not None:
            ran.append("again")  # the end call right after a scheduled one must not evaluate twice
    logger.log({"event": "end", "iter": 5})
    logger.close()
    assert ran == [2, 4, 5]

    run = read_run(run_dir)
    assert run.task_iter == [2, 4, 5]
    assert run.task_primary == ["piqa/acc_norm", "hellaswag/acc_norm", "core"]
    xs, ys = run.series("piqa/acc_norm")
    assert xs == [2, 4, 5] and all(0 <= y <= 1 for y in ys)
    assert run.series("core")[1][-1] == pytest.approx(comp.last["scores"]["core"])
    png = plot_runs([run], tmp_path / "p.png", panels=["loss", "eval_tasks"])
    assert png.stat().st_size > 1000
    table = compare_runs([run_dir])
    assert "piqa/acc_norm | hellaswag/acc_norm | core |" in table.splitlines()[0]
    assert f"{comp.last['scores']['core']:.4f} |" in table.splitlines()[2]


def test_component_refuses_unknown_tasks_before_training():
    model, tok = _tiny()
    with pytest.raises(UserError, match="unknown eval task 'hellaswagg'"):
        TaskEvalComponent(["hellaswagg"], interval=10, tokenizer=tok, log=lambda r: None)


def test_config_keys_accept_a_list_or_comma_separated_names_and_build_the_component(tmp_path):
    from diyllm.eval.during_training import component_from_config
    from diyllm.training.config import TrainConfig, load_config

    assert TrainConfig.from_dict({"eval_tasks": ["hellaswag", "piqa"]}).eval_tasks == ("hellaswag", "piqa")
    cfg = load_config("shakespeare_char_cpu", ["--eval_tasks=piqa,hellaswag", "--eval_tasks_limit=3"])
    assert cfg.eval_tasks == ("piqa", "hellaswag") and cfg.eval_tasks_limit == 3
    with pytest.raises(UserError, match="eval_tasks.*list of names"):
        TrainConfig.from_dict({"eval_tasks": 3})
    assert component_from_config(TrainConfig(), None, print) is None
    _, tok = _tiny()
    tok.save(tmp_path / "tok.json")
    comp = component_from_config(cfg, (tmp_path / "tok.json").read_text(), lambda r: None)
    assert comp.tasks == ["piqa", "hellaswag"] and comp.interval == cfg.eval_interval and comp.limit == 3


def test_train_with_eval_tasks_logs_them_and_plot_draws_them(tmp_path, capsys):
    """`diyllm train` with eval_tasks: eval_tasks records at every eval_interval and at the end, which
    `diyllm plot` draws in an extra panel and `diyllm compare` shows."""
    import json

    import numpy as np

    from diyllm.cli import main
    from diyllm.lab.metrics import read_run
    from diyllm.training.config import TrainConfig
    from diyllm.training.trainer import train

    text = " ".join(f"Question: how do i {w} it?\nAnswer: {v} it." for w, v in
                    [("cool", "cold"), ("dry", "wipe"), ("open", "unlock"), ("light", "switch")] * 200)
    tok = CharTokenizer.train(text)
    ids = np.array(tok.encode(text), dtype=np.uint16)
    data = tmp_path / "chars"
    data.mkdir()
    ids[:-500].tofile(data / "train.bin")
    ids[-500:].tofile(data / "val.bin")
    tok.save(data / "tokenizer.json")
    (data / "meta.json").write_text(json.dumps({"vocab_size": tok.vocab_size, "dtype": "uint16",
                                                "tokenizer_kind": "char"}))
    rows = [{"goal": f"how do i {w} it?", "sol1": f"{a} it.", "sol2": f"{b} it.", "label": lab}
            for w, a, b, lab in [("cool", "cold", "wipe", 0), ("dry", "cold", "wipe", 1),
                                 ("open", "unlock", "cold", 0)]]
    tasks = write_task_dir(tmp_path / "evaldata", {"piqa": ("validation", rows)})
    cfg = TrainConfig(data_dir=str(data), out_dir=str(tmp_path / "run"), context_length=32, d_model=32, num_layers=1,
                      num_heads=2, d_ff=64, batch_size=4, max_iters=6, warmup_iters=1, eval_interval=3, eval_iters=1,
                      log_interval=1, checkpoint_interval=0, device="cpu", dtype="float32", progress=False,
                      eval_tasks=("piqa",), eval_tasks_data_dir=str(tasks), eval_tasks_limit=3)
    train(cfg)
    run = read_run(tmp_path / "run")
    assert run.task_iter == [3, 6] and run.task_primary == ["piqa/acc_norm", "core"]
    assert all(v in (0.0, 1 / 3, 2 / 3, 1.0) for v in run.task_scores["piqa/acc"])
    capsys.readouterr()
    assert main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert main(["compare", str(tmp_path / "run")]) == 0
    assert "piqa/acc_norm" in capsys.readouterr().out
