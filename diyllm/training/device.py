"""Choosing the compute device and numeric precision ("auto" means: the best this machine has)."""

from __future__ import annotations

import contextlib
import functools

import torch

from diyllm.errors import UserError


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA, then Apple MPS, then CPU; anything else is passed to torch.device."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name!r} but CUDA is not available here; use device=auto or device=cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 autocast on GPUs that support it and float32 elsewhere."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise UserError(f"unknown dtype {name!r}: use auto, float32, bfloat16 or float16")
    return table[name]


@functools.cache
def native_bf16_matmul(device_type: str) -> bool:
    """Whether bfloat16 matrix products run in hardware here, so they are faster than float32 rather than
    many times slower. CUDA: the GPU says (Ampere and newer). CPU: AVX-512 BF16 or AMX; without them
    torch converts every element in software (on a 2-core AVX2 EPYC a 384x384 Newton-Schulz stack took
    1.5 s in bfloat16 against 58 ms in float32). Elsewhere (MPS, unknown CPUs): no."""
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return False
        try:  # torch >= 2.4 can also say True for GPUs that only emulate it
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:
            return torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu, torch >= 2.3
        return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)
    return False


def autocast_context(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass; a no-op in float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
