"""The memory planner against measured peak memory, and `diyllm plan` on every shipped config."""

from __future__ import annotations

import pytest
import torch

from diyllm.cli import main
from diyllm.errors import UserError
from diyllm.model import DIYConfig, DIYForCausalLM
from diyllm.training.config import available_configs, load_config
from diyllm.training.fsdp import enable_activation_checkpointing
from diyllm.training.memory_plan import (
    GiB,
    check_fits,
    count_parameters,
    estimate_for_train_config,
    estimate_memory,
    parse_bytes,
)
from diyllm.training.optim import AdamW, clip_grad_norm_


@pytest.mark.parametrize("kw", [dict(), dict(tie_embeddings=True), dict(num_kv_heads=2, d_ff=100), dict(mlp="relu2")])
def test_parameter_count_matches_the_model(kw):
    config = DIYConfig(vocab_size=77, context_length=16, d_model=32, num_layers=3, num_heads=4, **kw)
    assert count_parameters(config)["total"] == DIYForCausalLM(config).num_parameters()


def allocator_peak(config: DIYConfig, batch: int, checkpointed: bool, bf16: bool, accumulation: int) -> int:
    """The most bytes the CPU allocator had handed out at once during two AdamW steps of training
    (the second with the optimizer state allocated), from the profiler's allocation events: the CPU
    counterpart of torch.cuda.max_memory_allocated, and the same on any machine (RSS is not: glibc keeps
    freed blocks, differently from one machine to the next)."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    x = torch.randint(0, config.vocab_size, (batch, config.context_length))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = DIYForCausalLM(config)
        if checkpointed:
            enable_activation_checkpointing(model)
        optimizer = AdamW(model.parameters(), lr=1e-3)
        for _ in range(2):
            for _ in range(accumulation):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = model(x, targets=x).loss
                (loss / accumulation).backward()
            clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        del model, optimizer, loss
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:  # allocations are positive, frees negative
        live += nbytes
        peak = max(peak, live)
    return peak


BASE = dict(vocab_size=4096, context_length=256, d_model=192, num_layers=4, num_heads=4, num_kv_heads=2)


@pytest.mark.parametrize("case", [
    dict(),
    dict(checkpointed=True),
    dict(shape=dict(num_kv_heads=4, tie_embeddings=True, vocab_size=8192)),
    dict(shape=dict(qk_norm=True, mlp="relu2", logit_softcap=15.0)),
    dict(bf16=True),
    dict(bf16=True, checkpointed=True),
    dict(shape=dict(dropout=0.1)),  # CPU SDPA with dropout materialises the T x T scores
    dict(shape=dict(attn_impl="diy", context_length=128), batch=8),
    dict(accumulation=2),  # the gradients coexist with the second micro-step's activations
    dict(shape=dict(vocab_size=65, d_model=384, num_layers=6, num_heads=6, num_kv_heads=6, dropout=0.2), batch=16),
    # block-dominated (tiny vocab): where a miscount of the layers' saved tensors shows most
    dict(shape=dict(vocab_size=65, d_model=384, num_layers=6, num_heads=6, num_kv_heads=6), batch=16),
], ids=["plain", "checkpointed", "mha-tied-big-vocab", "qknorm-relu2-softcap", "bf16", "bf16-checkpointed",
        "dropout", "diy-attention", "accumulation", "shakespeare-char-shape", "shakespeare-char-no-dropout"])
def test_estimate_within_30_percent_of_measured_peak(case):
    config = DIYConfig(**{**BASE, **case.get("shape", {})})
    batch, checkpointed, bf16 = case.get("batch", 4), case.get("checkpointed", False), case.get("bf16", False)
    accumulation = case.get("accumulation", 1)
    measured = allocator_peak(config, batch, checkpointed, bf16, accumulation)
    est = estimate_memory(config, batch_size=batch, activation_checkpointing=checkpointed, device_type="cpu",
                          compute_dtype="bfloat16" if bf16 else "float32", accumulation_steps=accumulation)
    # The issue asks for +-30%; below is the harmful side (a run that does not fit), so allow only 10%.
    # Measured on torch 2.13: 1.06-1.16 (the raw sum 0.96-1.05, the rest is the 10% workspace).
    assert 0.9 * measured <= est.total <= 1.3 * measured, (est.total / measured, est.total, measured)


def test_checkpointing_saves_what_the_planner_says():
    plain = allocator_peak(DIYConfig(**BASE), 4, checkpointed=False, bf16=False, accumulation=1)
    checkpointed = allocator_peak(DIYConfig(**BASE), 4, checkpointed=True, bf16=False, accumulation=1)
    est = estimate_memory(DIYConfig(**BASE), batch_size=4, device_type="cpu")
    assert plain > 1.2 * checkpointed  # checkpointing does save memory ...
    saved = est.activations_plain - est.activations_checkpointed  # ... about as much as estimated
    assert 0.7 * (plain - checkpointed) <= saved <= 1.3 * (plain - checkpointed)


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
