"""Muon against torch.optim.Muon (torch >= 2.9) and against its own definition (any torch); its state in
checkpoints (exact resume); the trainer's optimizer="muon"."""

from __future__ import annotations

import io

import pytest
import torch
from test_trainer import make_char_dataset, tiny_cfg, train_losses

from diyllm.errors import UserError
from diyllm.training import newton_schulz
from diyllm.training.checkpoint import read_checkpoint
from diyllm.training.device import native_bf16_matmul
from diyllm.training.newton_schulz import newton_schulz_dtype, newton_schulz_orthogonalize
from diyllm.training.optim import AdamW, Muon, is_hidden_matrix


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_char_dataset(tmp_path_factory.mktemp("data") / "chars")


SHAPES = [(48, 32), (32, 80), (64, 64)]  # wide, tall and square: both orientations of Newton-Schulz


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g) * 0.1) for s in SHAPES]


def _run(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], steps: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
@pytest.mark.parametrize("nesterov,adjust,wd", [(True, "original", 0.0), (False, "match_rms_adamw", 0.1),
                                                (True, "match_rms_adamw", 0.05)])
def test_muon_matches_torch_optim_muon(nesterov, adjust, wd):
    ours, ref = _params(0), _params(0)
    kw = dict(lr=0.02, weight_decay=wd, momentum=0.9, nesterov=nesterov, adjust_lr_fn=adjust)
    # torch's Muon always works in bfloat16; ours picks float32 on a CPU without native bfloat16
    opt, ref_opt = Muon(ours, ns_dtype=torch.bfloat16, **kw), torch.optim.Muon(ref, **kw)
    _run(opt, ours, 10)
    _run(ref_opt, ref, 10)
    for a, b in zip(ours, ref):
        # Both run Newton-Schulz in bfloat16 with the same operations; 10 steps of lr 0.02 moved each
        # weight by ~0.2, so 1e-3 would catch any difference of convention (momentum, ratio, decay).
        torch.testing.assert_close(a, b, rtol=0, atol=1e-3)
    moved = [(a - p0).abs().max() for a, p0 in zip(ours, _params(0))]
    assert min(moved) > 0.01


@pytest.mark.parametrize("shape", SHAPES)
def test_newton_schulz_approximates_the_orthogonal_polar_factor(shape):
    """For g = U S Vᵀ the result is ≈ U Vᵀ: singular values pushed into ~[0.6, 1.3], same vectors. (Five
    steps cannot lift a singular value that starts near 0, as a random square matrix's smallest one does.)"""
    g = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    polar = u @ vh
    for dtype in (torch.bfloat16, torch.float32):
        o = newton_schulz_orthogonalize(g, dtype=dtype).double()
        assert o.shape == g.shape
        s = torch.linalg.svdvals(o)
        assert torch.quantile(s, 0.05) > 0.55 and s.max() < 1.35, (dtype, s)
        cosine = (o * polar).sum() / (o.norm() * polar.norm())
        assert cosine > 0.97, (dtype, cosine)


@pytest.mark.parametrize("shape", [(6, 48, 32), (4, 32, 80), (5, 64, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_batched_newton_schulz_equals_the_plain_one_per_matrix(shape, dtype):
    """A stack of same-shape matrices in one call gives each matrix its own result; the matrices have
    very different scales, so a norm taken over the whole stack would show."""
    g = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    g = g * torch.logspace(-2, 2, shape[0]).view(-1, 1, 1)
    batched = newton_schulz_orthogonalize(g, dtype=dtype)
    for i in range(shape[0]):
        torch.testing.assert_close(batched[i], newton_schulz_orthogonalize(g[i], dtype=dtype), rtol=0,
                                   atol=1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("shape", [(6, 48, 128), (4, 200, 64), (3, 40, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_newton_schulz_on_the_gram_matrix_equals_the_plain_iteration(shape, dtype):
    """The fast path for long matrices (only r×r products in the loop) is the same polynomial, so it gives
    the plain loop's result to rounding; the default takes it for float matrices at least 1.5x as long as
    wide, both orientations, and keeps the plain loop otherwise (square-ish shapes, bfloat16)."""
    g = torch.randn(shape, generator=torch.Generator().manual_seed(8), dtype=dtype)
    g = g * torch.logspace(-2, 2, shape[0], dtype=dtype).view(-1, 1, 1)  # each matrix its own scale
    plain = newton_schulz_orthogonalize(g, dtype=dtype, via_gram=False)
    fast = newton_schulz_orthogonalize(g, dtype=dtype, via_gram=True)
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-12)
    long_enough = max(shape[1:]) >= 1.5 * min(shape[1:])
    assert torch.equal(newton_schulz_orthogonalize(g, dtype=dtype), fast if long_enough else plain)
    low = g.to(torch.bfloat16)
    assert torch.equal(newton_schulz_orthogonalize(low, dtype=torch.bfloat16),
                       newton_schulz_orthogonalize(low, dtype=torch.bfloat16, via_gram=False))


def _cpu_flags() -> set[str] | None:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), None)
    except OSError:
        return None


@pytest.mark.skipif(_cpu_flags() is None, reason="needs /proc/cpuinfo's x86 flags")
def test_native_bf16_matmul_follows_the_cpus_own_flags():
    """bfloat16 only where the CPU multiplies it in hardware (AVX-512 BF16 or AMX): elsewhere torch converts
    every element in software, 20-40x slower than float32 (an AVX2 EPYC: 1.5 s against 58 ms)."""
    flags = _cpu_flags()
    native = bool({"avx512_bf16", "amx_tile"} & flags)
    assert native_bf16_matmul("cpu") is native
    assert newton_schulz_dtype("cpu") == (torch.bfloat16 if native else torch.float32)
    assert native_bf16_matmul("mps") is False  # unknown hardware: the safe precision


@pytest.mark.parametrize("native", [True, False])
def test_auto_newton_schulz_precision_is_the_hardwares(native, monkeypatch):
    """ns_dtype=None (Muon's default, muon_ns_dtype=auto) takes the precision `native_bf16_matmul` says,
    in the function and in the optimizer, and a checkpoint keeps "auto" rather than this machine's pick."""
    monkeypatch.setattr(newton_schulz, "native_bf16_matmul", lambda device_type: native)
    want = torch.bfloat16 if native else torch.float32
    g = torch.randn(3, 48, 32, generator=torch.Generator().manual_seed(6))
    assert torch.equal(newton_schulz_orthogonalize(g), newton_schulz_orthogonalize(g, dtype=want))
    auto, fixed = _params(7), _params(7)
    opt = Muon(auto, lr=0.02)
    _run(opt, auto, 2)
    _run(Muon(fixed, lr=0.02, ns_dtype=want), fixed, 2)
    for a, b in zip(auto, fixed):
        assert torch.equal(a, b)
    assert all(group["ns_dtype"] is None for group in opt.state_dict()["param_groups"])


def test_muon_on_same_shape_matrices_equals_one_matrix_at_a_time():
    """Several q/k/v-like matrices of one shape take the batched path; each must move exactly as it does
    when optimised alone (the plain path)."""
    gen = torch.Generator().manual_seed(4)
    init = [torch.randn(32, 32, generator=gen) * 0.1 for _ in range(4)] + [torch.randn(64, 32, generator=gen)]
    together = [torch.nn.Parameter(t.clone()) for t in init]
    alone = [torch.nn.Parameter(t.clone()) for t in init]
    opt = Muon(together, lr=0.02, weight_decay=0.1, momentum=0.9)
    singles = [Muon([p], lr=0.02, weight_decay=0.1, momentum=0.9) for p in alone]
    for _ in range(3):
        grads = [torch.randn(t.shape, generator=gen) for t in init]
        for p, q, g in zip(together, alone, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        for single in singles:
            single.step()
    for p, q in zip(together, alone):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-4)


def test_muon_step_is_its_formula_on_a_plain_loop():
    """Any torch (no torch.optim.Muon needed): one Nesterov step written out in float64."""
    (p,) = [torch.nn.Parameter(torch.randn(24, 40, dtype=torch.float64))]
    p0 = p.detach().clone()
    opt = Muon([p], lr=0.05, momentum=0.8, weight_decay=0.1, ns_dtype=torch.float64)
    g1, g2 = torch.randn(24, 40, dtype=torch.float64), torch.randn(24, 40, dtype=torch.float64)
    p.grad = g1
    opt.step()
    p.grad = g2
    opt.step()
    buf = 0.2 * g1  # B1 = 0.8·0 + 0.2·g1
    p_ref = p0 * (1 - 0.05 * 0.1) - 0.05 * newton_schulz_orthogonalize(0.2 * g1 + 0.8 * buf, dtype=torch.float64)
    buf = 0.8 * buf + 0.2 * g2
    p_ref = p_ref * (1 - 0.05 * 0.1) - 0.05 * newton_schulz_orthogonalize(0.2 * g2 + 0.8 * buf, dtype=torch.float64)
    torch.testing.assert_close(p.detach(), p_ref, rtol=1e-10, atol=1e-12)


def test_adamw_groups_inside_muon_equal_adamw_and_lr_scale_scales_muon_only():
    torch.manual_seed(0)
    gain_a = torch.nn.Parameter(torch.randn(16))
    gain_b = torch.nn.Parameter(gain_a.detach().clone())
    mat_a = torch.nn.Parameter(torch.randn(16, 16))
    mat_b = torch.nn.Parameter(mat_a.detach().clone())
    muon = Muon([{"params": [gain_a], "use_muon": False, "weight_decay": 0.0},
                 {"params": [mat_a], "lr_scale": 4.0}], lr=1e-2, betas=(0.9, 0.95), momentum=0.9)
    adamw = AdamW([gain_b], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    plain = Muon([mat_b], lr=4e-2, momentum=0.9)
    for _ in range(5):
        g = torch.randn(16)
        gm = torch.randn(16, 16)
        gain_a.grad, gain_b.grad, mat_a.grad, mat_b.grad = g.clone(), g.clone(), gm.clone(), gm.clone()
        for o in (muon, adamw, plain):
            o.step()
    torch.testing.assert_close(gain_a, gain_b, rtol=0, atol=0)
    torch.testing.assert_close(mat_a, mat_b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="2-D matrices only"):
        Muon([torch.nn.Parameter(torch.ones(3))])


def test_muon_state_dict_round_trip_through_torch_save_continues_identically():
    a = _params(5)
    opt = Muon(a, lr=0.02)
    _run(opt, a, 3)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_b = Muon(b, lr=0.02)
    buf.seek(0)
    opt_b.load_state_dict(torch.load(buf, weights_only=True))
    _run(opt, a, 3, seed=9)
    _run(opt_b, b, 3, seed=9)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_build_optimizer_puts_hidden_matrices_on_muon_and_the_rest_on_adamw(tiny_data, tmp_path):
    from diyllm.model import DIYConfig, DIYForCausalLM
    from diyllm.training.build import build_optimizer
    from diyllm.training.report import muon_line

    model = DIYForCausalLM(DIYConfig(vocab_size=40, context_length=16, d_model=32, num_layers=2, num_heads=2))
    cfg = tiny_cfg(tiny_data, tmp_path, optimizer="muon", muon_lr=0.03)
    opt = build_optimizer(cfg, model)
    names = {id(p): n for n, p in model.named_parameters()}
    on_muon = {names[id(p)] for g in opt.param_groups if g["use_muon"] for p in g["params"]}
    on_adamw = {names[id(p)] for g in opt.param_groups if not g["use_muon"] for p in g["params"]}
    assert "layers.0.attn.q_proj.weight" in on_muon and "layers.1.ffn.w2.weight" in on_muon
    assert {"token_embeddings.weight", "lm_head.weight", "ln_final.weight"} <= on_adamw
    assert on_muon.isdisjoint(on_adamw) and len(on_muon | on_adamw) == len(names)
    assert all(is_hidden_matrix(n, dict(model.named_parameters())[n]) for n in on_muon)
    (muon_group,) = [g for g in opt.param_groups if g["use_muon"]]
    assert muon_group["lr_scale"] == pytest.approx(0.03 / cfg.learning_rate)
    assert muon_group["ns_dtype"] is None  # muon_ns_dtype=auto: chosen per machine at each step
    auto = newton_schulz_dtype("cpu")
    assert muon_line(opt, torch.device("cpu")) == (
        f"optimizer: muon on {len(on_muon)} hidden matrices (Newton-Schulz in {str(auto)[6:]}, auto: "
        + ("native here)" if auto == torch.bfloat16 else "this cpu has no native bfloat16 matmul)")
        + ", adamw on the rest")
    forced = build_optimizer(tiny_cfg(tiny_data, tmp_path, optimizer="muon", muon_ns_dtype="float32"), model)
    assert [g["ns_dtype"] for g in forced.param_groups if g["use_muon"]] == [torch.float32]
    assert "(Newton-Schulz in float32, muon_ns_dtype)" in muon_line(forced, torch.device("cpu"))
    with pytest.raises(UserError, match="muon_ns_dtype='fp16' must be auto, bfloat16 or float32"):
        tiny_cfg(tiny_data, tmp_path, optimizer="muon", muon_ns_dtype="fp16").validate()


def test_muon_training_learns_and_resumes_bit_identically(tiny_data, tmp_path):
    from diyllm.training.trainer import train

    # A realistic-ish shape and torch's default thread count (never pinned to 1): resume must be exact anyway.
    kw = dict(max_iters=12, lr_decay_iters=12, eval_interval=6, checkpoint_interval=6, optimizer="muon",
              muon_lr=0.02, d_model=64, num_heads=4, d_ff=192, context_length=64, batch_size=8, num_threads=0)
    train(tiny_cfg(tiny_data, tmp_path / "full", **kw))
    train(tiny_cfg(tiny_data, tmp_path / "split", **{**kw, "max_iters": 6}))
    train(tiny_cfg(tiny_data, tmp_path / "split", **{**kw, "init_from": "resume"}))
    lf, ls = train_losses(tmp_path / "full"), train_losses(tmp_path / "split")
    assert [lf[i] for i in range(1, 13)] == [ls[i] for i in range(1, 13)]  # 6 + 6 == 12, exactly
    assert lf[12] < lf[1] - 0.5
    a, b = read_checkpoint(tmp_path / "full" / "latest.pt"), read_checkpoint(tmp_path / "split" / "latest.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    bufs = [s for s in a["optimizer"]["state"].values() if "momentum_buffer" in s]
    assert bufs and all(s["momentum_buffer"].abs().sum() > 0 for s in bufs)  # Muon's state is in the file


@pytest.mark.parametrize("name,vocab", [("shakespeare_char_speedrun", 65), ("shakespeare_speedrun", 512)])
def test_the_speedrun_configs_build_their_model_and_muon(tmp_path, name, vocab):
    from diyllm.model import DIYForCausalLM
    from diyllm.training.build import build_optimizer, model_config_from
    from diyllm.training.config import load_config

    cfg = load_config(name, [f"--out_dir={tmp_path}"])
    model = DIYForCausalLM(model_config_from(cfg, vocab))
    assert model.config.qk_norm and model.config.mlp == "swiglu" and model.config.logit_softcap > 0
    assert model.layers[0].attn.output_proj.weight.abs().sum() == 0  # zero_init_proj
    opt = build_optimizer(cfg, model)
    assert isinstance(opt, Muon) and sum(g["use_muon"] for g in opt.param_groups) == 1
    x = torch.randint(0, vocab, (2, cfg.context_length))
    model(x, targets=x).loss.backward()
    opt.step()  # a zero-initialised matrix gets a non-zero orthogonalised update
    assert model.layers[0].attn.output_proj.weight.abs().sum() > 0
