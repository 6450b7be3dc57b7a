"""The memory planner against measured peak memory, and `diyllm plan` on every shipped config."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from diyllm.cli import main
from diyllm.errors import UserError
from diyllm.model import DIYConfig, DIYForCausalLM
from diyllm.training.config import available_configs, load_config
from diyllm.training.memory_plan import (
    GiB,
    check_fits,
    count_parameters,
    estimate_for_train_config,
    estimate_memory,
    parse_bytes,
)


@pytest.mark.parametrize("kw", [dict(), dict(tie_embeddings=True), dict(num_kv_heads=2, d_ff=100)])
def test_parameter_count_matches_the_model(kw):
    config = DIYConfig(vocab_size=77, context_length=16, d_model=32, num_layers=3, num_heads=4, **kw)
    assert count_parameters(config)["total"] == DIYForCausalLM(config).num_parameters()


MEASURE = textwrap.dedent("""
    import json, sys, torch
    from diyllm.model import DIYConfig, DIYForCausalLM
    from diyllm.training.fsdp import enable_activation_checkpointing
    from diyllm.training.optim import AdamW, clip_grad_norm_
    kw = json.loads(sys.argv[1])
    batch, modes = kw.pop("batch"), kw.pop("modes")
    config = DIYConfig(**kw)
    x = torch.randint(0, config.vocab_size, (batch, config.context_length))
    torch.ones(512, 512) @ torch.ones(512, 512)  # warm the allocator and the matmul workspaces
    def peak_rss():  # this process's own peak (VmHWM): ru_maxrss would inherit a big parent's across exec
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    before = peak_rss()
    for checkpointed in modes:  # one mode per process: the peak only ever grows
        model = DIYForCausalLM(config)
        if checkpointed:
            enable_activation_checkpointing(model)
        optimizer = AdamW(model.parameters(), lr=1e-3)
        for _ in range(2):  # the second step runs with the optimizer state allocated
            model(x, targets=x).loss.backward()
            clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        del model, optimizer
        print(peak_rss() - before)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss is in KiB on Linux only")
@pytest.mark.xfail(strict=True, reason="known: measured with the process's own peak (VmHWM), the CPU peak is "
                   "~1.3-1.5x the planner's estimate at this shape (e.g. 288 MiB measured vs 192 MiB estimated); "
                   "the test passed before only because ru_maxrss inherits a large parent's peak across exec. "
                   "The planner's cross-entropy backward temporaries need recounting (issue 15)")
def test_estimate_within_30_percent_of_measured_peak_rss():
    shape = dict(vocab_size=4096, context_length=256, d_model=192, num_layers=4, num_heads=4, num_kv_heads=2)
    measured = {}
    for checkpointed in (True, False):  # a fresh process each: the peak of one never hides the other's
        args = json.dumps({**shape, "batch": 4, "modes": [checkpointed]})
        proc = subprocess.run([sys.executable, "-c", MEASURE, args], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        measured[checkpointed] = int(proc.stdout.split()[0])
    for checkpointed, peak in measured.items():
        est = estimate_memory(DIYConfig(**shape), batch_size=4, activation_checkpointing=checkpointed)
        assert 0.7 * peak <= est.total <= 1.3 * peak, (checkpointed, est.total, peak)
    assert measured[False] > 1.2 * measured[True]  # checkpointing does save memory


def test_fsdp_divides_the_state_and_checkpointing_shrinks_activations():
    c = DIYConfig(vocab_size=32000, context_length=1024, d_model=1024, num_layers=16, num_heads=16)
    one = estimate_memory(c, batch_size=4, world_size=8, parallelism="ddp", compute_dtype="bfloat16")
    sharded = estimate_memory(c, batch_size=4, world_size=8, parallelism="fsdp", compute_dtype="bfloat16",
                              activation_checkpointing=True)
    assert sharded.optimizer * 8 == pytest.approx(one.optimizer, rel=1e-6)
    assert sharded.activations < one.activations / 2
    hsdp = estimate_memory(c, batch_size=4, world_size=8, parallelism="fsdp", fsdp_replicas=2)
    assert hsdp.optimizer * 4 == pytest.approx(one.optimizer, rel=1e-6)  # sharded within groups of 4


def test_too_large_run_is_refused_with_suggestions():
    cfg = load_config("gpt2_small", ["--batch_size=32", "--vocab_size=50304"])
    est = estimate_for_train_config(cfg, 50304, world_size=1, compute_dtype="bfloat16")
    with pytest.raises(UserError, match=r"(?s)needs about .* GiB per rank.*activation_checkpointing=true.*"
                                        r"batch_size=16 with gradient_accumulation_steps=80"):
        check_fits(cfg, est, 16 * GiB, "a 16 GB card", world_size=1)
    check_fits(cfg, est, 1024 * GiB, "plenty", world_size=1)  # fits: no error


def test_parse_bytes():
    assert parse_bytes("80GB") == 80 * GiB and parse_bytes("512MiB") == 512 * 2**20 and parse_bytes("24") == 24 * GiB
    with pytest.raises(UserError, match="80GB"):
        parse_bytes("lots")


@pytest.mark.parametrize("name", available_configs())
def test_plan_runs_on_every_shipped_config(name, capsys):
    assert main(["plan", name, "--nproc", "1", "--gpu-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "memory per rank (estimate)" in out and "tokens per step" in out and "ETA at 40% MFU" in out


def test_plan_nproc_must_divide_accumulation(capsys):
    assert main(["plan", "gpt2_small", "--nproc", "3"]) == 2
    assert "gradient_accumulation_steps=40 is not divisible by --nproc 3" in capsys.readouterr().err


def test_plan_figures_for_fsdp_on_eight_gpus(capsys):
    assert main(["plan", "gpt2_small", "--nproc", "8", "--parallelism=fsdp", "--gpu-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    model = DIYForCausalLM  # the FLOPs formula is the model's own
    with torch.device("meta"):
        m = model(DIYConfig(vocab_size=50304, context_length=1024, d_model=768, num_layers=12, num_heads=12,
                            tie_embeddings=True))
    assert f"training FLOPs per token: {m.flops_per_token() / 1e6:.1f} MFLOP" in out
    assert "tokens per step: 491,520" in out and "split over 8 ranks" in out and "fits" in out


def test_train_refuses_a_run_that_cannot_fit_before_building_the_model(tmp_path, monkeypatch):
    from test_trainer import make_char_dataset

    from diyllm.training import memory_plan
    from diyllm.training.trainer import Trainer

    data = make_char_dataset(tmp_path / "data", n_chars=5000)
    monkeypatch.setattr(memory_plan, "device_memory", lambda device: (2 * GiB, "a 2 GiB test device"))
    cfg = load_config("shakespeare_char_cpu", [f"--data_dir={data}", f"--out_dir={tmp_path / 'run'}",
                                               "--batch_size=4096", "--context_length=64", "--progress=false"])
    with pytest.raises(UserError, match=r"(?s)needs about .* but the device has 2\.00 GiB \(a 2 GiB test device\)"
                                        r".*batch_size=2048 with gradient_accumulation_steps=2"):
        Trainer(cfg).setup()
    assert not (tmp_path / "run" / "latest.pt").exists()
    small = load_config("shakespeare_char_cpu", [f"--data_dir={data}", f"--out_dir={tmp_path / 'run'}",
                                                 "--batch_size=4096", "--context_length=64", "--memory_check=false"])
    Trainer(small).setup().close()  # memory_check=false: starts anyway
