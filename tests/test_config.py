"""TrainConfig loading: TOML files, --key=value overrides, type checks, suggestions, impossible settings."""

from __future__ import annotations

import json

import pytest

from diyllm.cli import main
from diyllm.errors import UserError
from diyllm.training.config import TrainConfig, available_configs, load_config, parse_overrides


def write(tmp_path, text: str, name: str = "run.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_file_then_overrides_with_types(tmp_path):
    path = write(tmp_path, '[model]\nd_model = 64\nnum_heads = 4\n[optim]\nlearning_rate = 1e-3\nmax_iters = 200\n'
                           'out_dir = "runs/x"\n')
    cfg = load_config(str(path), ["--max_iters=1e3", "--learning_rate", "5e-3", "--compile", "--decay_lr=0",
                                  "--init_std=none", "--num_kv_heads=2", "--out_dir=runs/y"])
    assert (cfg.d_model, cfg.num_heads) == (64, 4)  # from the file's [model] table
    assert cfg.max_iters == 1000 and isinstance(cfg.max_iters, int)
    assert cfg.learning_rate == 5e-3 and cfg.compile is True and cfg.decay_lr is False
    assert cfg.init_std is None and cfg.num_kv_heads == 2 and cfg.out_dir == "runs/y"


@pytest.mark.parametrize("word,value", [("true", True), ("1", True), ("yes", True), ("false", False), ("0", False)])
def test_booleans(word, value):
    assert load_config(None, [f"--progress={word}"]).progress is value


def test_unknown_key_on_command_line_suggests_the_nearest():
    with pytest.raises(UserError, match=r"command line: unknown option 'max_iter'; did you mean 'max_iters'\?"):
        load_config(None, ["--max_iter=3"])


def test_unknown_key_in_file_names_the_file(tmp_path):
    path = write(tmp_path, "[optim]\nlearning_rte = 0.1\n")
    with pytest.raises(UserError, match=rf"{path}: unknown option 'learning_rte'; did you mean 'learning_rate'\?"):
        load_config(str(path), [])


@pytest.mark.parametrize("override,expected", [
    ("--max_iters=abc", "expects an integer"),
    ("--max_iters=1.5", "expects an integer"),
    ("--learning_rate=fast", "expects a number"),
    ("--compile=maybe", r"expects true/false \(or 1/0\), got"),
    ("--fused_projections=maybe", r"expects true/false \(or 1/0, or none\)"),
])
def test_bad_values_on_command_line(override, expected):
    with pytest.raises(UserError, match=expected):
        load_config(None, [override])


def test_wrong_types_in_file(tmp_path):
    with pytest.raises(UserError, match=r"option 'max_iters' expects an integer, got True"):
        load_config(str(write(tmp_path, "max_iters = true\n")), [])
    with pytest.raises(UserError, match=r"option 'out_dir' expects a string"):
        load_config(str(write(tmp_path, "out_dir = 3\n")), [])
    with pytest.raises(UserError, match="invalid TOML"):
        load_config(str(write(tmp_path, "max_iters = = 3\n")), [])
    with pytest.raises(UserError, match="set twice"):
        load_config(str(write(tmp_path, "max_iters = 3\n[optim]\nmax_iters = 4\n")), [])


@pytest.mark.parametrize("overrides,expected", [
    (["--warmup_iters=500", "--max_iters=100"], "warmup_iters=500 > max_iters=100"),
    (["--min_lr=1", "--learning_rate=0.1"], "min_lr=1.0 is above learning_rate=0.1"),
    (["--d_model=100", "--num_heads=3"], "must be divisible by num_heads=3"),
    (["--num_heads=6", "--num_kv_heads=4"], "must be a multiple of num_kv_heads=4"),
    (["--batch_size=0"], "batch_size must be positive"),
    (["--dropout=1.0"], r"dropout=1.0 must be in \[0, 1\)"),
    (["--dtype=fp8"], "dtype='fp8' must be one of"),
    (["--init_from=/no/such/ckpt.pt"], "neither scratch, resume, hf:DIR nor an existing checkpoint"),
    (["--init_from=hf:/no/such/dir"], "is not a folder"),
    (["--jsonl_mode=packed"], "jsonl_mode='packed' must be pack or pad"),
])
def test_impossible_settings_fail_before_training(overrides, expected):
    with pytest.raises(UserError, match=expected):
        load_config(None, overrides)


def test_several_problems_are_reported_together():
    with pytest.raises(UserError) as info:
        load_config(None, ["--batch_size=0", "--beta1=1.5"])
    assert "batch_size" in str(info.value) and "beta1" in str(info.value)


def test_shipped_configs_load_by_name():
    names = available_configs()
    assert {"shakespeare_char", "shakespeare_char_cpu", "pystdlib_cpu", "gpt2_small"} <= set(names)
    for name in names:
        assert isinstance(load_config(name, []), TrainConfig)
    gpu = load_config("shakespeare_char", [])
    assert (gpu.num_layers, gpu.num_heads, gpu.d_model, gpu.context_length, gpu.compile, gpu.dtype) == (
        6, 6, 384, 256, True, "auto")
    big = load_config("gpt2_small", [])
    assert (big.num_layers, big.num_heads, big.d_model, big.context_length, big.vocab_size) == (12, 12, 768, 1024,
                                                                                                  50304)
    with pytest.raises(UserError, match=r"config 'shakespear_char' not found; did you mean 'shakespeare_char'"):
        load_config("shakespear_char", [])


def test_override_word_forms():
    assert parse_overrides(["--a=1", "--b", "2", "c=3", "--compile"]) == {"a": "1", "b": "2", "c": "3",
                                                                          "compile": "true"}
    with pytest.raises(UserError, match="needs a value"):
        parse_overrides(["--max_iters"])


def test_cli_print_config_and_errors(capsys):
    assert main(["train", "shakespeare_char_cpu", "--max_iters=700", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["max_iters"] == 700
    assert main(["train", "shakespeare_char_cpu", "--max_iter=7"]) == 2
    assert "did you mean 'max_iters'" in capsys.readouterr().err


def test_roundtrip_through_dict():
    cfg = load_config("pystdlib_cpu", ["--seed=7"])
    assert TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg
    assert TrainConfig.from_dict({**cfg.to_dict(), "from_the_future": 1}, strict=False) == cfg
