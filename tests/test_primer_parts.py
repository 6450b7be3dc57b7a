"""The primer's first-principles parts, each checked against an independent computation."""

import math

import pytest
import torch

from diyllm.cli import main
from diyllm.lab import primer_parts as parts

quiet = dict(echo=lambda *a: None)


def test_chain_rule_by_hand_equals_autograd_and_a_finite_difference():
    result = parts.chain_rule(**quiet)
    for hand, auto in result.values():
        assert hand == pytest.approx(auto, rel=1e-12)

    def loss(w1, w2, b, x=1.5, y=1.0):
        return (w2 * math.tanh(w1 * x) + b - y) ** 2

    h = 1e-6  # central difference in float64, independent of both
    assert result["w1"][0] == pytest.approx((loss(0.8 + h, -0.5, 0.3) - loss(0.8 - h, -0.5, 0.3)) / (2 * h), rel=1e-6)
    assert result["w2"][0] == pytest.approx((loss(0.8, -0.5 + h, 0.3) - loss(0.8, -0.5 - h, 0.3)) / (2 * h), rel=1e-6)


def test_clipping_example_scales_the_global_norm_to_max_norm_and_keeps_direction():
    before, after, clipped = parts.clip(max_norm=1.0, **quiet)
    assert before == pytest.approx(13.0)
    assert after == pytest.approx(1.0, rel=1e-5)
    assert clipped[0] == pytest.approx([3 / 13, 4 / 13], rel=1e-5) and clipped[1] == pytest.approx([12 / 13], rel=1e-5)


def test_adamw_with_weight_decay_matches_torch_adamw_and_ends_below_two():
    history = parts.adamw_wd(steps=200, **quiet)
    w = torch.nn.Parameter(torch.tensor(0.0, dtype=torch.float64))
    ref = torch.optim.AdamW([w], lr=0.1, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8)
    x = torch.tensor(parts.XS, dtype=torch.float64)
    for step in range(200):
        ref.zero_grad()
        ((w * x - 2 * x) ** 2).mean().backward()
        ref.step()
        assert history[step] == pytest.approx(w.item(), rel=1e-9, abs=1e-12)
    assert 1.9 < history[-1] < 2.0


def test_cross_entropy_example_is_minus_log_p():
    rows = parts.xent((0.7, 0.2, 0.1), **quiet)
    assert [r[0] for r in rows] == pytest.approx([-math.log(0.7), -math.log(0.2), -math.log(0.1)])
    assert [r[1] for r in rows] == pytest.approx([r[0] for r in rows], rel=1e-9)


def test_per_sample_updates_diverge_once_a_large_sample_is_in_the_data():
    runs = parts.per_sample(lr=0.1, epochs=8, **quiet)
    assert abs(runs["full_batch"][-1] - 2) < 0.01  # error x(-0.5) per step
    assert abs(runs["per_sample_1to4"][-1] - 2) < 0.01  # damped by the small samples (x0.28 per epoch)
    errors = [abs(w - 2) for w in runs["per_sample_1to5"]]
    assert all(b > a for a, b in zip(errors, errors[1:]))  # x(-1.13) per epoch: grows every epoch


def test_primer_part_all_prints_every_part(capsys):
    assert main(["primer", "--part", "all"]) == 0
    out = capsys.readouterr().out
    for name in parts.PARTS:
        assert f"--- {name} ---" in out
    assert "final w: by hand" in out  # and the descent itself


def test_diagnose_per_parameter_gradient_table_matches_a_plain_backward(tiny_config):
    from diyllm.lab.diagnose import diagnose_model, format_param_table
    from diyllm.model import DIYForCausalLM

    model = DIYForCausalLM(tiny_config)
    x = torch.randint(0, tiny_config.vocab_size, (4, 16))
    y = torch.randint(0, tiny_config.vocab_size, (4, 16))
    d = diagnose_model(model, x, y, lr=1e-3)
    model.eval()
    model(x, targets=y).loss.backward()
    for stats in d.params:
        g = dict(model.named_parameters())[stats.name].grad
        assert stats.grad_mean == pytest.approx(g.mean().item(), rel=1e-5, abs=1e-9)
        assert stats.grad_std == pytest.approx(g.std().item(), rel=1e-5, abs=1e-9)
        assert stats.grad_absmax == pytest.approx(g.abs().max().item(), rel=1e-5)
    table = format_param_table(d)
    assert len(table.splitlines()) == 1 + len(d.params) and "layers.1.attn.q_proj.weight" in table
