"""A fast path for y = x Wᵀ on CPUs where torch's BLAS leaves half of each vector unit idle.

torch's x86 builds send float32 matmuls to MKL, and MKL on AMD processors runs its AVX2 kernels, also
on cores that execute AVX-512 at full width (Zen 5: 512-bit FMA pipes, so AVX2 code gets half the peak).
oneDNN ships inside the same torch builds and picks its kernels by instruction set, not by vendor.
Measured on a 2-core AMD EPYC Zen 5 (cpu family 26), float32, 4096 rows (one batch of
benchmarks/bench_train.py's medium shape): x Wᵀ 186 → 395 GFLOP/s, dy W 187 → 428, dyᵀ x 178 → 260;
a whole training step of the medium shape 1.57-1.60x faster (docs/training.md, Speed). With oneDNN held to AVX2
(ONEDNN_MAX_CPU_ISA=AVX2) the two libraries are even, and the weight gradient is slower, so the gain is
the wider vectors: where MKL already uses them (Intel), or where they are not wider (AVX2 CPUs; Zen 4
runs AVX-512 at AVX2's width), nothing is expected and the plain path stays.

The choice is made once per process from the CPU, never from a timing, so that two runs on one machine
run the same kernels (exact resume compares bits): `auto` (the default) takes oneDNN on AMD CPUs of
family 26 and later whose torch build runs AVX-512; DIYLLM_CPU_MATMUL=onednn or =blas overrides it,
e.g. to try oneDNN on another CPU (`python benchmarks/bench_train.py --cpu-matmul onednn` measures it).
oneDNN and MKL round differently (both within a few 1e-7, relative, of the float64 product),
so a matmul's last bits depend on this choice, as they depend on the thread count.

Small products stay on BLAS (below MIN_MACS oneDNN's fixed cost per call can lose). So do products with
no backward to record, except where their shapes repeat: oneDNN builds a kernel for each shape it has not
met yet (0.3–0.9 ms on that CPU, against 60–640 µs for the product itself), which training pays once per
run and prompts of ever new lengths would pay every time. So training steps, full-size evaluation
batches and the large products of decoding steps (≤ 8 rows: 1 × 768 → 50304, GPT-2's head, 9.5 → 3.8 ms)
take oneDNN; prompts and no-cache decoding run as before. Also on BLAS: float64, autocast, torch.compile
(inductor picks its own kernels) and sharded (DTensor) weights. tests/test_cpu_matmul.py checks the fast
path against the plain one.
"""

from __future__ import annotations

import functools
import os
import platform
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

ENV_VAR = "DIYLLM_CPU_MATMUL"
CHOICES = ("auto", "onednn", "blas")
MIN_MACS = 1 << 22  # rows · d_in · d_out below this: BLAS's lower call overhead can win (120 × 128 × 128 did)
MIN_ROWS_NO_GRAD = 1024  # fewest rows for oneDNN outside a recorded backward (see use_onednn)
MAX_DECODE_ROWS = 8  # a decoding step: one row per sequence of the batch, the same shape every step
MIN_DECODE_MACS = 1 << 20  # 1 × 768 → 2048 (1.6M) measured 1.5x faster on oneDNN, 1 × 768 → 768 (0.6M) even


def _onednn_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a bᵀ through oneDNN's matmul (inductor's CPU linear op: dense inputs, any strides, no bias)."""
    return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")


@functools.lru_cache(maxsize=1)
def onednn_available() -> bool:
    """True where this torch build has oneDNN and its linear op runs (x86 and Arm builds have it)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    try:
        a = torch.ones(2, 3)
        return bool(torch.equal(_onednn_mm(a, a), torch.full((2, 2), 3.0)))
    except (RuntimeError, NotImplementedError):  # an op registered for another backend only
        return False


@functools.lru_cache(maxsize=1)
def _cpu_vendor_and_family() -> tuple[str, int]:
    """("AuthenticAMD" / "GenuineIntel" / "", cpu family) from /proc/cpuinfo, or Windows' processor string."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            fields = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        return fields.get("vendor_id", ""), int(fields.get("cpu family", "0") or 0)
    except (OSError, ValueError):
        pass
    text = platform.processor()  # Windows: "AMD64 Family 26 Model 68 Stepping 0, AuthenticAMD"
    family = re.search(r"Family (\d+)", text)
    vendor = re.search(r"AuthenticAMD|GenuineIntel", text)
    return (vendor.group(0) if vendor else ""), (int(family.group(1)) if family else 0)


def auto_prefers_onednn() -> bool:
    """`auto`'s rule: an AMD CPU of family 26 (Zen 5) or later, on which torch runs AVX-512 code."""
    vendor, family = _cpu_vendor_and_family()
    return vendor == "AuthenticAMD" and family >= 26 and torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def requested() -> str:
    """What DIYLLM_CPU_MATMUL asks for, normalised ("auto" when unset; not checked against CHOICES)."""
    return os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"


@functools.lru_cache(maxsize=1)
def onednn_enabled() -> bool:
    """Whether this process sends large float32 CPU matmuls to oneDNN (decided once; see the module doc)."""
    choice = requested()
    if choice not in CHOICES:
        warnings.warn(f"{ENV_VAR}={choice!r} is not one of {', '.join(CHOICES)}; using auto", stacklevel=2)
        choice = "auto"
    if choice == "blas":
        return False
    if not onednn_available():
        if choice == "onednn":
            warnings.warn(f"{ENV_VAR}=onednn, but this torch build cannot run oneDNN's matmul; using BLAS",
                          stacklevel=2)
        return False
    return choice == "onednn" or auto_prefers_onednn()


def describe() -> str:
    """The choice and why, for a run's header: "onednn (auto: ...)", "blas", "blas (DIYLLM_CPU_MATMUL=blas)"."""
    asked = requested()
    if onednn_enabled():
        why = f"{ENV_VAR}=onednn" if asked == "onednn" else "auto: an AMD Zen 5 or later with AVX-512"
        return f"onednn ({why})"
    return f"blas ({ENV_VAR}={asked})" if asked in ("blas", "onednn") else "blas"


def set_cpu_matmul(choice: str) -> None:
    """Switch the backend for the rest of this process ("auto" / "onednn" / "blas"), as the env var does.

    For benchmarks comparing the two in one run; training switches nothing mid-run."""
    if choice not in CHOICES:
        raise ValueError(f"cpu matmul must be one of {', '.join(CHOICES)}, not {choice!r}")
    os.environ[ENV_VAR] = choice
    onednn_enabled.cache_clear()


@contextmanager
def cpu_matmul_choice(choice: str) -> Iterator[None]:
    """`set_cpu_matmul(choice)` inside the block; afterwards the env var is as it was (set or not)."""
    before = os.environ.get(ENV_VAR)
    set_cpu_matmul(choice)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = before
        onednn_enabled.cache_clear()


def _autocast_on() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4 takes no device argument
        return torch.is_autocast_cpu_enabled()


def use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True where x Wᵀ should take oneDNN: a product that pays, eager, enabled, float32 on CPU, plain tensors.

    oneDNN builds a kernel for each new shape it meets, so products with no backward to record take it
    only where shapes repeat: batches of at least MIN_ROWS_NO_GRAD rows (evaluation), and decoding steps
    of at most MAX_DECODE_ROWS rows whose product is large (a wide MLP, the vocabulary head). Prompts of
    other lengths stay on BLAS: no-cache decoding, whose length grows by a row per token, ran at half
    speed on oneDNN. Ordered cheapest refusal first: decoding calls this ~50 times per token."""
    rows = x.numel() // max(1, x.shape[-1])
    macs = rows * x.shape[-1] * weight.shape[0]
    pays = ((macs >= MIN_MACS and (rows >= MIN_ROWS_NO_GRAD
                                   or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))))
            or (rows <= MAX_DECODE_ROWS and macs >= MIN_DECODE_MACS))
    return (pays
            and not torch.compiler.is_compiling()  # before onednn_enabled: dynamo then traces none of it
            and onednn_enabled()
            and x.dtype == torch.float32 and weight.dtype == torch.float32 and x.device.type == "cpu"
            and type(weight) in (nn.Parameter, torch.Tensor) and type(x) in (nn.Parameter, torch.Tensor)
            and not _autocast_on())


class OneDNNLinearFunction(torch.autograd.Function):
    """y = x Wᵀ with both gradients through oneDNN too: dx = dy W, dW = dyᵀ x (no bias)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # rows × d_in (a view where x is contiguous)
        ctx.save_for_backward(x2 if ctx.needs_input_grad[1] else None, weight)
        ctx.x_shape = x.shape
        return _onednn_mm(x2, weight).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x2, weight = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = _onednn_mm(dy2, weight.t()).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        dw = _onednn_mm(dy2.t(), x2.t()) if ctx.needs_input_grad[1] else None  # (d_out, d_in), contiguous
        return dx, dw


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x Wᵀ: the plain matmul, or oneDNN's where `use_onednn` says it is the faster kernel."""
    if not use_onednn(x, weight):
        return x @ weight.t()
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return OneDNNLinearFunction.apply(x, weight)
    return _onednn_mm(x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], weight.shape[0])


__all__ = ["OneDNNLinearFunction", "cpu_matmul_choice", "describe", "linear", "onednn_available", "onednn_enabled",
           "requested", "set_cpu_matmul", "use_onednn"]
