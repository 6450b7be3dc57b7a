"""`diyllm sweep` with the real trainer on a tiny character corpus; the shipped experiment files."""

from __future__ import annotations

from pathlib import Path

import pytest

from diyllm.cli import main
from diyllm.lab.metrics import is_finished, read_run

REPO = Path(__file__).resolve().parents[1]
SMALL = ('context_length = 32\nd_model = 32\nnum_layers = 1\nnum_heads = 2\nd_ff = 64\nwarmup_iters = 1\n'
         'eval_interval = 2\neval_iters = 2\nlog_interval = 1\ncheckpoint_interval = 0\nprogress = false\n'
         'device = "cpu"\ndtype = "float32"\n')
EXPERIMENTS = sorted((REPO / "diyllm" / "configs" / "experiments").glob("*.toml"))


@pytest.fixture
def char_data(tmp_path) -> Path:
    from diyllm.data.prepare import prepare_dataset

    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"the {w} sat on the mat number {i}.\n" for i, w in enumerate(["cat", "dog"] * 400)))
    out = tmp_path / "data"
    prepare_dataset(text, out, tokenizer_kind="char", verbose=False)
    return out


def test_sweep_runs_grid_then_skips_finished_runs(tmp_path, char_data, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DIYLLM_TINY", raising=False)
    cfg = tmp_path / "exp.toml"
    cfg.write_text(f'data_dir = "{char_data}"\nmax_iters = 4\n{SMALL}\n[sweep]\n'
                   'grid = { learning_rate = [1e-3, 1e-2] }\n'
                   'variants = [{ name = "a", batch_size = 2 }, { name = "b", batch_size = 4 }]\n')
    assert main(["sweep", str(cfg), "--out_root", "sw", "--min_lr=1e-4"]) == 0
    runs = sorted(p.name for p in (tmp_path / "sw").iterdir() if p.is_dir())
    assert runs == ["a_learning_rate=0.001", "a_learning_rate=0.01", "b_learning_rate=0.001", "b_learning_rate=0.01"]
    for r in runs:
        assert is_finished(tmp_path / "sw" / r)
        run = read_run(tmp_path / "sw" / r)
        assert run.config["batch_size"] == (2 if r.startswith("a") else 4)
        assert run.config["learning_rate"] == (1e-3 if r.endswith("0.001") else 1e-2)
    table = (tmp_path / "sw" / "compare.md").read_text()
    assert all(f"| {r} " in table for r in runs)
    assert "## Analysis (filled in by diyllm)" in table and all(f"- **{r}**: " in table for r in runs)
    assert "### Samples: " in table  # a few samples from each run's checkpoint
    assert (tmp_path / "sw" / "compare.png").stat().st_size > 5000
    capsys.readouterr()

    import diyllm.training.trainer as trainer

    def must_not_train(cfg):
        raise AssertionError(f"finished run {cfg.out_dir} was trained again")

    monkeypatch.setattr(trainer, "train", must_not_train)
    assert main(["sweep", str(cfg), "--out_root", "sw", "--min_lr=1e-4"]) == 0
    assert capsys.readouterr().out.count("finished earlier, skipped") == 4


def test_sweep_cli_grid_on_a_plain_config_and_errors(tmp_path, char_data, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DIYLLM_TINY", "1")
    base = tmp_path / "base.toml"
    base.write_text(f'data_dir = "{char_data}"\n')
    assert main(["sweep", str(base), "--grid", "dropout=0,0.1", "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "dropout=0 " in out and "dropout=0.1 " in out and "to run" in out
    from diyllm.lab.common import TINY_OVERRIDES
    from diyllm.lab.sweep import SweepPlan

    words = SweepPlan(str(base), ["d_model=64,128"], ["--seed=3"], "sw").words_for({"d_model": 128}, Path("o"), "n")
    assert words[:2] == ["--seed=3", "--d_model=128"] and words[2:-2] == TINY_OVERRIDES  # tiny settings win
    assert main(["sweep", str(base), "--grid", "dropuot=0,0.1"]) == 2
    assert "did you mean 'dropout'" in capsys.readouterr().err
    assert main(["sweep", str(base), "--grid", "dropout"]) == 2


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_files_resolve(path, capsys):
    """Every shipped experiment parses, has ≥ 2 runs with distinct names, and each run's config validates."""
    from diyllm.lab.sweep import SweepPlan

    plan = SweepPlan(str(path), [], [], None)
    assert len(plan.combos) >= 2 and plan.description
    assert str(plan.out_root).startswith("runs/exp_")
    cfgs = [plan.config_for(c, n) for c, n in zip(plan.combos, plan.names)]
    for c, cfg in zip(plan.combos, cfgs):
        for k, v in c.items():
            if k != "name":
                assert getattr(cfg, k) == v
    if path.stem == "grad_accum":
        assert {c.batch_size * c.gradient_accumulation_steps for c in cfgs} == {64}
    if path.stem == "model_size":
        from diyllm.lab.common import count_params

        sizes = [count_params(c, vocab_size=4096) for c in cfgs]
        assert sizes == sorted(sizes) and len(set(sizes)) == 4


def test_experiment_file_errors_name_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('max_iter = 3\n[sweep]\nbase = "pystdlib_cpu"\ngrid = { learning_rate = [1e-3] }\n')
    assert main(["sweep", str(bad), "--dry_run"]) == 2
    assert f"{bad}: unknown option 'max_iter'; did you mean 'max_iters'?" in capsys.readouterr().err
    bad.write_text('[sweep]\nvariants = [{ batch_sise = 2 }]\n')
    assert main(["sweep", str(bad), "--dry_run"]) == 2
    assert "variants: unknown option 'batch_sise'" in capsys.readouterr().err
