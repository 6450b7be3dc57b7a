"""The lab tools that need no training run: metrics reading, plot, compare, primer, diagnose, lr-find."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from diyllm.cli import main
from diyllm.errors import UserError
from diyllm.lab.compare import compare_runs, summarize
from diyllm.lab.metrics import is_finished, read_run
from diyllm.lab.plot import plot_runs


def fake_run(path: Path, name: str, lr: float, n_iters: int = 40, gap: float = 0.1, finished: bool = True) -> Path:
    """A metrics.jsonl following the trainer's schema, with a loss curve that depends on `lr`."""
    path.mkdir(parents=True, exist_ok=True)
    events = [{"event": "start", "config": {"learning_rate": lr}, "num_params": 12345, "run_name": name}]
    for it in range(0, n_iters + 1, 2):
        loss = 4.0 * math.exp(-lr * 100 * it / n_iters) + 1.0
        events.append({"event": "train", "iter": it, "tokens": it * 256, "time": it * 0.05, "loss": loss, "lr": lr,
                       "grad_norm": 1.0 / (it + 1), "ms_per_iter": 50.0, "tokens_per_sec": 5000.0 + it})
        if it % 10 == 0:
            events.append({"event": "eval", "iter": it, "tokens": it * 256, "time": it * 0.05, "train_loss": loss,
                           "val_loss": loss + gap, "val_bpb": (loss + gap) / math.log(2) / 3})
    if finished:
        events.append({"event": "end", "iterations": n_iters, "tokens_seen": n_iters * 256, "wall_time_s": 2.5,
                       "num_params": 12345})
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(e) for e in events) + "\n")
    return path


def test_read_run_metrics_jsonl(tmp_path):
    run = read_run(fake_run(tmp_path / "a", "run-a", 0.01))
    assert run.name == "run-a" and run.finished and run.num_params == 12345
    assert run.train_iter[:3] == [0, 2, 4] and len(run.eval_iter) == 5
    xs, ys = run.series("val_loss", "tokens")
    assert xs == [0, 2560, 5120, 7680, 10240] and ys[0] == pytest.approx(5.1)


def test_torn_last_line_is_ignored_but_bad_middle_line_is_an_error(tmp_path):
    d = fake_run(tmp_path / "a", "a", 0.01, finished=False)
    with open(d / "metrics.jsonl", "a") as f:
        f.write('{"event": "train", "it')
    assert not read_run(d).finished and not is_finished(d)
    lines = (d / "metrics.jsonl").read_text().splitlines()
    (d / "metrics.jsonl").write_text("\n".join([lines[0], "garbage", *lines[1:]]))
    with pytest.raises(UserError, match=r"metrics.jsonl:2"):
        read_run(d)


def test_text_log_in_nanogpt_format(tmp_path):
    log = tmp_path / "nano" / "train.log"
    log.parent.mkdir()
    log.write_text("step 0: train loss 4.2000, val loss 4.2500\niter 0: loss 4.1900, time 120.00ms, mfu -100.00%\n"
                   "iter 10: loss 3.1, time 100.0ms\nstep 20: train loss 2.5000, val loss 2.6500\n")
    run = read_run(log.parent)  # a folder holding one log file
    assert run.name == "nano"
    assert run.eval_iter == [0, 20] and run.val_loss == [4.25, 2.65] and run.eval_train_loss == [4.2, 2.5]
    assert run.train_iter == [0, 10] and run.train_loss == [4.19, 3.1]
    assert run.train_time == pytest.approx([0.12, 0.22])
    with pytest.raises(UserError, match="found no lines"):
        (tmp_path / "empty.log").write_text("hello\n")
        read_run(tmp_path / "empty.log")


def test_plot_two_runs_writes_png(tmp_path):
    a, b = fake_run(tmp_path / "a", "a", 0.01), fake_run(tmp_path / "b", "b", 0.05)
    for x in ("step", "tokens", "time"):
        out = plot_runs([read_run(a), read_run(b)], tmp_path / f"p_{x}.png", x=x, panels=["loss", "lr", "grad_norm"])
        data = out.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert main(["plot", str(a), str(b), "--metric", "val_loss", "--out", str(tmp_path / "cli.png")]) == 0
    assert (tmp_path / "cli.png").stat().st_size > 5000
    assert main(["plot", str(a)]) == 0 and (a / "loss.png").is_file()  # default: inside the run folder
    with pytest.raises(UserError, match="unknown panel"):
        plot_runs([read_run(a)], tmp_path / "x.png", panels=["nope"])


def test_compare_table_matches_metrics(tmp_path):
    a, b = fake_run(tmp_path / "a", "a", 0.01, gap=0.1), fake_run(tmp_path / "b", "b", 0.05, gap=0.3)
    s = summarize(read_run(b))
    final_loss = 4.0 * math.exp(-0.05 * 100) + 1.0
    assert s.final_train_loss == pytest.approx(final_loss) and s.final_val_loss == pytest.approx(final_loss + 0.3)
    assert s.best_val_loss == pytest.approx(final_loss + 0.3) and s.gap == pytest.approx(0.3)
    assert s.wall_time_s == 2.5 and s.num_params == 12345 and s.iterations == 40
    assert s.tokens_per_sec == pytest.approx(5020.0)  # median of 5000, 5002, ..., 5040
    table = compare_runs([a, b], tmp_path / "cmp.md")
    assert (tmp_path / "cmp.md").read_text() == table
    row_b = next(line for line in table.splitlines() if line.startswith("| b "))
    assert f"{final_loss + 0.3:.4f} *" in row_b and "+0.3000" in row_b and "12.3K" in row_b and "5,020" in row_b
    assert main(["compare", str(a), str(b)]) == 0


def test_primer_converges_and_adamw_state_matches_hand_computation(capsys):
    assert main(["primer"]) == 0
    out = capsys.readouterr().out
    from diyllm.lab.primer import run_primer

    r = run_primer(echo=lambda *a: None)
    assert abs(r.by_hand[-1] - 2.0) < 1e-5 and r.by_hand == pytest.approx(r.autograd, rel=1e-12)
    assert abs(r.adamw[-1] - 2.0) < 0.05
    assert r.adamw[0] == pytest.approx(0.1, rel=1e-6)  # first Adam step is ~lr in size
    assert "m_hat" in out and "final w" in out


def test_diagnose_one_entry_per_layer(tiny_config, tmp_path):
    from diyllm.lab.diagnose import diagnose_model, plot_diagnosis
    from diyllm.model import DIYForCausalLM

    model = DIYForCausalLM(tiny_config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, tiny_config.vocab_size, (4, 16))
    y = torch.randint(0, tiny_config.vocab_size, (4, 16))
    d = diagnose_model(model, x, y, lr=1e-3)
    assert [s.layer for s in d.layers] == ["embed", "layers.0", "layers.1", "head"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # model untouched
    assert all(p.grad is None for p in model.parameters())
    # reference: the per-layer grad norm equals the norm of that layer's gradients from a plain backward
    model(x, targets=y).loss.backward()
    ref = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.layers[1].parameters()])).item()
    assert d.layers[2].grad_norm == pytest.approx(ref, rel=1e-4)
    assert d.loss == pytest.approx(model(x, targets=y).loss.item(), rel=1e-5)
    # one AdamW step on a fresh optimizer moves each weight by ~lr: |Δw|/|w| ≈ lr·sqrt(n)/|w|
    lm = next(p for p in d.params if p.name == "lm_head.weight")
    w = model.lm_head.weight.detach()
    assert lm.update_ratio == pytest.approx(1e-3 * math.sqrt(w.numel()) / w.norm().item(), rel=0.05)
    for s in d.layers[1:3]:
        assert 0 <= s.gate_off_fraction <= 1 and 0 < s.attn_entropy <= 1.0001
    assert plot_diagnosis(d, tmp_path / "d.png").stat().st_size > 5000


def test_diagnose_uses_checkpoint_adam_state(tiny_config, tmp_path):
    from diyllm.lab.diagnose import diagnose_model, load_for_diagnosis
    from diyllm.model import DIYForCausalLM
    from diyllm.training.checkpoint import save_checkpoint
    from diyllm.training.optim import AdamW

    model = DIYForCausalLM(tiny_config)
    x = torch.randint(0, tiny_config.vocab_size, (4, 16))
    opt = AdamW(model.parameters(), lr=1e-2)
    model(x, targets=x).loss.backward()
    opt.step()
    with torch.no_grad():  # kill half the SwiGLU units of layer 0: gate weights pushed far negative via w1 rows
        model.layers[0].ffn.w1.weight[: tiny_config.d_ff // 2] = 0.0
        model.layers[0].ln2.weight.fill_(1.0)
    save_checkpoint(model, opt, 1, tmp_path / "c.pt", model_config=tiny_config.to_dict())
    loaded, state = load_for_diagnosis(str(tmp_path / "c.pt"))
    d = diagnose_model(loaded, x, x, optimizer_state=state["optimizer"])
    assert d.update_source.startswith("checkpoint")
    # the next Adam step from the saved moments: lr·m̂/(√v̂+eps) with t=1 is lr·sign(g) for each weight
    lm = next(p for p in d.params if p.name == "lm_head.weight")
    assert lm.update_ratio == pytest.approx(
        1e-2 * math.sqrt(loaded.lm_head.weight.numel()) / loaded.lm_head.weight.norm().item(), rel=0.05)
    assert d.layers[1].gate_off_fraction == 0.0  # zero gate pre-activations are not "off" (silu(0) slope 0.5)


def test_diagnose_cli_on_checkpoint(tiny_config, tmp_path, capsys):
    from diyllm.model import DIYForCausalLM
    from diyllm.training.checkpoint import save_checkpoint

    model = DIYForCausalLM(tiny_config)
    with torch.no_grad():
        model.layers[1].ffn.w1.weight.fill_(0.0)
        model.layers[1].ffn.w1.weight[:, 0] = -1000.0  # every gate far negative whenever feature 0 is positive
    save_checkpoint(model, None, 0, tmp_path / "c.pt", model_config=tiny_config.to_dict())
    assert main(["diagnose", "--ckpt", str(tmp_path / "c.pt"), "--batch_size", "2"]) == 0
    out = capsys.readouterr().out
    assert "layers.1" in out and "hints:" in out
    report = json.loads((tmp_path / "diagnose.json").read_text())
    assert len(report["layers"]) == tiny_config.num_layers + 2
    assert report["layers"][2]["gate_off_fraction"] > 0.2
    assert (tmp_path / "diagnose.png").stat().st_size > 5000
    assert main(["diagnose"]) == 2  # neither --ckpt nor a config


def _pattern_batches(vocab: int, T: int, B: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def next_batch():
        start = torch.randint(0, vocab, (B, 1), generator=g)
        ids = (start + torch.arange(T + 1)) % vocab  # a learnable rule: next = current + 1
        return ids[:, :-1], ids[:, 1:]
    return next_batch


def test_lr_finder_suggestion_in_range_and_stops_on_divergence(tmp_path):
    from diyllm.lab.lr_find import lr_range_test, lr_schedule, plot_lr_find
    from diyllm.model import DIYConfig, DIYForCausalLM

    lrs = lr_schedule(1e-4, 1.0, 5)
    assert lrs == pytest.approx([1e-4, 1e-3, 1e-2, 1e-1, 1.0])
    cfg = DIYConfig(vocab_size=16, context_length=16, d_model=32, num_layers=1, num_heads=2, d_ff=64)
    model = DIYForCausalLM(cfg)
    res = lr_range_test(model, _pattern_batches(16, 16), start_lr=1e-5, end_lr=100.0, num_iters=120, progress=False)
    assert res.diverged and len(res.lrs) < 120  # lr 100 with Adam blows the loss up before the end
    assert 1e-5 <= res.suggestion <= 100.0 and res.suggestion == pytest.approx(res.lr_at_min / 10)
    assert 1e-5 <= res.steepest_lr <= res.lr_at_min
    assert res.smoothed[-1] > 4 * min(res.smoothed) or not math.isfinite(res.losses[-1])
    # bias-corrected EMA: the first smoothed value equals the first raw loss exactly
    assert res.smoothed[0] == pytest.approx(res.losses[0])
    assert plot_lr_find(res, tmp_path / "lr.png").stat().st_size > 5000
    with pytest.raises(UserError):
        lr_schedule(1.0, 1e-3, 10)


def test_lr_finder_no_divergence_runs_all_steps():
    from diyllm.lab.lr_find import lr_range_test
    from diyllm.model import DIYConfig, DIYForCausalLM

    model = DIYForCausalLM(DIYConfig(vocab_size=16, context_length=16, d_model=32, num_layers=1, num_heads=2, d_ff=64))
    res = lr_range_test(model, _pattern_batches(16, 16), start_lr=1e-6, end_lr=1e-3, num_iters=20, progress=False)
    assert not res.diverged and len(res.lrs) == 20 and 1e-6 <= res.suggestion <= 1e-3


def test_sweep_expansion_and_names():
    from diyllm.lab.sweep import expand, parse_grid_args, run_name, to_word

    grid = parse_grid_args(["learning_rate=1e-4,1e-3", "--dropout=0,0.2"])
    assert grid == {"learning_rate": ["1e-4", "1e-3"], "dropout": ["0", "0.2"]}
    combos = expand(grid)
    assert len(combos) == 4
    assert ("learning_rate=1e-3_dropout=0.2", {"learning_rate": "1e-3", "dropout": "0.2"}) in combos
    zipped = expand({}, [{"batch_size": 64, "gradient_accumulation_steps": 1},
                         {"batch_size": 16, "gradient_accumulation_steps": 4}])
    assert [name for name, _ in zipped] == ["batch_size=64_gradient_accumulation_steps=1",
                                            "batch_size=16_gradient_accumulation_steps=4"]
    named = expand({"seed": [1, 2]}, [{"name": "a", "d_model": 32}, {"name": "b", "d_model": 64}])
    assert named[1] == ("a_seed=2", {"d_model": 32, "seed": 2}) and len(named) == 4
    assert run_name({"d_model": 64}, "tiny") == "tiny" and run_name({"lr": 0.5}) == "lr=0.5"
    assert to_word("decay_lr", False) == "--decay_lr=false"
    assert to_word("learning_rate", 0.001) == "--learning_rate=0.001"
    with pytest.raises(UserError, match="KEY=V1"):
        parse_grid_args(["learning_rate"])
    with pytest.raises(UserError, match="both the grid and a variant"):
        expand({"batch_size": [1]}, [{"batch_size": 2}])
