"""LoRA: fine-tune a frozen model through small low-rank corrections of its projection matrices.

A targeted projection y = x Wᵀ becomes

    y = x Wᵀ + scale · dropout(x) Aᵀ Bᵀ,      A: (rank, d_in), B: (d_out, rank), scale = alpha / rank

W stays frozen (requires_grad=False, so the optimizer holds no state for it); only A and B train. A
starts random and B at zero, so B·A = 0 and the first forward is exactly the base model's. Dividing by
rank keeps the update's size comparable when the rank changes (alpha is the knob to tune, not rank).

`merge_lora` folds the correction in (W + scale · B·A), giving a plain model that every command reads.
State dict keys stay the base model's ("layers.0.attn.q_proj.weight") plus "….lora_A"/"….lora_B", so a
plain checkpoint loads into the base part unchanged and an adapters-only checkpoint is just the
"lora_" keys (see `lora_state_dict`).

Fused projections: attention may stack q|k|v (and SwiGLU w1|w3) into one matmul from the parts'
`.weight`; that stacked weight would miss the adapters, so modules with a wrapped part stop fusing.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diyllm.errors import UserError
from diyllm.model.layers import Linear

# short target name -> attribute path inside one TransformerBlock
TARGET_PATHS = {"q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj", "o": "attn.output_proj",
                "w1": "ffn.w1", "w2": "ffn.w2", "w3": "ffn.w3"}
DEFAULT_TARGETS = ("q", "k", "v", "o", "w1", "w2", "w3")
TARGET_GROUPS = {"all": DEFAULT_TARGETS, "attn": ("q", "k", "v", "o"), "mlp": ("w1", "w2", "w3")}
# whole matrices trained in full beside the adapters (needed when new tokens were added to the vocabulary)
FULL_TARGETS = {"lm_head": "lm_head", "embed": "token_embeddings"}


class LoRALinear(Linear):
    """A frozen Linear plus a trainable low-rank correction scale · B·A (see the module docstring).

    `weight` is the base matrix itself (same tensor, same state_dict key); `enabled = False` makes the
    layer the base layer again (the DPO/RL reference model without a second copy of the weights).
    """

    def __init__(self, base: Linear, rank: int, alpha: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.rank, self.alpha, self.scale, self.lora_dropout = int(rank), float(alpha), float(alpha) / rank, dropout
        w = base.weight
        # Kaiming-uniform like nn.Linear's default: x Aᵀ has roughly unit variance per rank direction.
        # Drawn on the CPU from `generator` (when given), so a seeded run gets the same adapters anywhere.
        a = nn.init.kaiming_uniform_(torch.empty(rank, self.in_features), a=math.sqrt(5), generator=generator)
        self.lora_A = nn.Parameter(a.to(device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))
        self.enabled = True

    def delta_weight(self) -> torch.Tensor:
        """scale · B·A, the (d_out, d_in) correction that merging adds to W."""
        return (self.lora_B @ self.lora_A) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)  # the base Linear's own product (and kernel): a fresh adapter equals its base
        if not self.enabled:
            return y
        h = F.dropout(x, self.lora_dropout) if (self.training and self.lora_dropout) else x
        return y + ((h @ self.lora_A.t()) @ self.lora_B.t()) * self.scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def parse_targets(spec: str | Sequence[str] | None) -> tuple[list[str], list[str]]:
    """(adapter targets, fully trained matrices) from "q,k,v,o,w1,w2,w3" / "all" / "attn,mlp,lm_head"."""
    if spec is None or spec == "" or spec == "default":
        return list(DEFAULT_TARGETS), []
    words = [w.strip() for w in (spec.split(",") if isinstance(spec, str) else spec) if w.strip()]
    adapters, full = [], []
    for w in words:
        w = w.removesuffix("_proj") if w in ("q_proj", "k_proj", "v_proj") else w
        w = "o" if w in ("output_proj", "o_proj") else w
        if w in TARGET_GROUPS:
            adapters += [t for t in TARGET_GROUPS[w] if t not in adapters]
        elif w in TARGET_PATHS:
            adapters += [w] if w not in adapters else []
        elif w in FULL_TARGETS:
            full += [w] if w not in full else []
        else:
            known = ", ".join([*TARGET_PATHS, *TARGET_GROUPS, *FULL_TARGETS])
            raise UserError(f"lora_targets: unknown target {w!r}; use a comma-separated list of {known}")
    return adapters, full


def _get(module: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def apply_lora(model: nn.Module, rank: int, alpha: float | None = None, dropout: float = 0.0,
               targets: str | Sequence[str] | None = None, seed: int | None = None) -> list[str]:
    """Freeze `model` and wrap its targeted projections with LoRA adapters, in place; return their names.

    alpha defaults to rank (scale 1). Fully trained targets ("lm_head", "embed") keep requires_grad.
    A target the model does not have is a UserError naming it. `seed` makes the A matrices depend on it
    alone (not on the global RNG's history), as exact resume and reproducible runs need.
    """
    generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    if int(rank) <= 0:
        raise UserError(f"lora_rank must be a positive integer, got {rank}")
    alpha = float(rank if alpha is None or alpha == 0 else alpha)
    adapters, full = parse_targets(targets)
    for p in model.parameters():
        p.requires_grad_(False)
    layers = getattr(model, "layers", None)
    if layers is None or not len(layers):
        raise UserError("LoRA needs a model with transformer layers (model.layers); this one has none")
    wrapped, missing = [], []
    for i, layer in enumerate(layers):
        for t in adapters:
            path = TARGET_PATHS[t]
            parent_path, _, attr = path.rpartition(".")
            parent, child = _get(layer, parent_path), _get(layer, path)
            if not isinstance(child, Linear):
                missing.append(f"layers.{i}.{path}")
                continue
            if isinstance(child, LoRALinear):
                raise UserError(f"layers.{i}.{path} already has a LoRA adapter; merge it first (diyllm lora merge)")
            setattr(parent, attr, LoRALinear(child, rank, alpha, dropout, generator))
            if getattr(parent, "fused", None) is not False and hasattr(parent, "fused_parts"):
                parent.fused = False  # a stacked q|k|v weight would bypass the adapters
            wrapped.append(f"layers.{i}.{path}")
    for t in full:
        module = _get(model, FULL_TARGETS[t])
        if module is None:
            missing.append(FULL_TARGETS[t])
        else:
            module.weight.requires_grad_(True)
    if missing:
        raise UserError(f"LoRA targets not found in this model: {', '.join(missing[:8])}"
                        f"{' …' if len(missing) > 8 else ''}; choose lora_targets among {', '.join(TARGET_PATHS)}")
    return wrapped


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield name, m


def has_lora(model: nn.Module) -> bool:
    return any(True for _ in lora_modules(model))


def lora_config(model: nn.Module, full: Sequence[str] = ()) -> dict[str, Any]:
    """rank/alpha/dropout/targets of the adapters in `model` (what rebuilding them needs)."""
    mods = list(lora_modules(model))
    if not mods:
        raise ValueError("model has no LoRA adapters")
    first = mods[0][1]
    targets = sorted({next(t for t, p in TARGET_PATHS.items() if name.endswith(p)) for name, _ in mods},
                     key=list(TARGET_PATHS).index)
    return {"rank": first.rank, "alpha": first.alpha, "dropout": first.lora_dropout,
            "targets": ",".join(targets + list(full))}


def trained_full_targets(model: nn.Module) -> list[str]:
    """The FULL_TARGETS whose weights train beside the adapters (requires_grad)."""
    out = []
    for t, path in FULL_TARGETS.items():
        m = _get(model, path)
        if m is not None and m.weight.requires_grad:
            out.append(t)
    return out


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only what a LoRA run changed: the adapters (plus fully trained targets), detached copies."""
    full_keys = {f"{FULL_TARGETS[t]}.weight" for t in trained_full_targets(model)}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".lora_" in k or k in full_keys}


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes its base (adapter-free) outputs; fully trained targets are
    not undone, so use a separate reference model when any are trained."""
    mods = [m for _, m in lora_modules(model)]
    saved = [m.enabled for m in mods]
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m, s in zip(mods, saved):
            m.enabled = s


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += scale · B·A) and put plain Linear layers back, in
    place; every parameter becomes trainable again (a merged model is an ordinary model)."""
    for name, m in list(lora_modules(model)):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        plain = Linear.__new__(Linear)
        nn.Module.__init__(plain)
        plain.in_features, plain.out_features = m.in_features, m.out_features
        merged = m.weight + (m.delta_weight() if m.enabled else 0)
        plain.weight = nn.Parameter(merged.to(m.weight.dtype))
        setattr(parent, attr, plain)
        if hasattr(parent, "fused") and hasattr(parent, "fused_parts"):
            parent.fused = getattr(getattr(model, "config", None), "fused_projections", None)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


@torch.no_grad()
def load_lora_state(model: nn.Module, state: dict[str, torch.Tensor], where: str = "adapters") -> None:
    """Load an adapters-only state (lora_state_dict) into a model that has the same adapters.

    Fully trained matrices (lm_head / embedding) may have more rows than the base when the fine-tuning
    run added tokens: they replace the base's matrices, and the vocabulary size follows them."""
    for key, module_path in (("lm_head.weight", "lm_head"), ("token_embeddings.weight", "token_embeddings")):
        module = _get(model, module_path)
        if key in state and module is not None and state[key].shape != module.weight.shape:
            module.weight = nn.Parameter(state[key].clone().to(module.weight.device))
            rows = state[key].shape[0]
            if module_path == "lm_head":
                module.out_features = rows
            else:
                module.num_embeddings = rows
            model.config.vocab_size = rows
    wanted = set(lora_state_dict(model))
    _, unexpected = model.load_state_dict(state, strict=False)
    missing = wanted - set(state)
    if unexpected or missing:
        raise UserError(f"{where}: adapters do not fit the base model (unexpected {sorted(unexpected)[:4]}, "
                        f"missing {sorted(missing)[:4]})")
    if getattr(model.config, "tie_embeddings", False):
        model.token_embeddings.weight = model.lm_head.weight


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """A hash of the tensors (names, dtypes, shapes, values): identifies the base weights an adapter
    checkpoint was trained on, whatever file format they were stored in."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def trainable_fraction(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (a tied matrix counts once)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
