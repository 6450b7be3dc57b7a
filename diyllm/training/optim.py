"""AdamW, Muon and gradient clipping, written out.

AdamW keeps, per parameter, running means of the gradient (m) and of its square (v); the step is
m̂ / (√v̂ + eps), i.e. each coordinate is scaled by its own recent gradient size. Weight decay is
*decoupled*: the weights shrink by lr·λ directly instead of adding λ·w to the gradient (which Adam's
scaling would distort).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from diyllm.training.newton_schulz import NS_COEFFICIENTS, newton_schulz_orthogonalize


class AdamW(torch.optim.Optimizer):
    """Matches torch.optim.AdamW (amsgrad off). `foreach=True` does the same arithmetic on whole
    lists of tensors at once (torch._foreach_*), which removes per-parameter Python overhead.

    `fused=True` (the default) runs it instead through torch's fused kernel `torch._fused_adamw_` where the
    installed torch has one for these tensors (CPU and CUDA, plain dense tensors, not FSDP's DTensors):
    the whole update of a tensor in one pass over memory instead of eight `_foreach_*` passes, which on a
    CPU loop over the tensors one op at a time. On benchmarks/bench_train.py's small shape the step takes
    0.3 ms instead of 1.6 ms. It equals the `_foreach_*` version to float32 rounding, not bit for bit (the
    kernel orders the arithmetic differently; tests/test_optim.py bounds the drift); `fused=False` keeps the
    written-out arithmetic below.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        foreach: bool = True,
        fused: bool = True,
    ):
        if lr < 0:
            raise ValueError(f"invalid learning rate {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}: each must be in [0, 1)")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach,
                                      fused=fused))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._group_step(group)
        return loss

    def _group_step(self, group: dict) -> None:
        """One parameter group's update (Muon overrides this to route its groups)."""
        self._adamw_group(group)

    def _adamw_group(self, group: dict) -> None:
        """One AdamW step for the parameters of `group` that have a gradient."""
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
        if group.get("fused", False) and fused_kernel_fits(params):  # (a group saved before `fused` existed)
            self._step_fused(group, params)
        elif group["foreach"]:
            self._step_foreach(group, params)
        else:
            self._step_loop(group, params)

    def _step_loop(self, group: dict, params: list[torch.Tensor]) -> None:
        """The readable version: one parameter at a time."""
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        for p in params:
            state = self.state[p]
            t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
            p.mul_(1 - lr * wd)  # decoupled weight decay
            m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            # Bias correction: m and v start at 0, so early averages are too small by (1 - β^t).
            step_size = lr / (1 - beta1**t)
            denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
            p.addcdiv_(m, denom, value=-step_size)

    def _step_foreach(self, group: dict, params: list[torch.Tensor]) -> None:
        """Same arithmetic as _step_loop, over lists; parameters that share a step count go together."""
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        by_step: dict[int, list[torch.Tensor]] = {}
        for p in params:
            by_step.setdefault(self.state[p]["step"], []).append(p)
        for t, ps in by_step.items():
            grads = [p.grad for p in ps]
            ms = [self.state[p]["exp_avg"] for p in ps]
            vs = [self.state[p]["exp_avg_sq"] for p in ps]
            if wd:
                torch._foreach_mul_(ps, 1 - lr * wd)
            torch._foreach_lerp_(ms, grads, 1 - beta1)  # m += (1-β1)(g - m)  ==  β1·m + (1-β1)·g
            torch._foreach_mul_(vs, beta2)
            torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
            denom = torch._foreach_sqrt(vs)
            torch._foreach_div_(denom, math.sqrt(1 - beta2**t))
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(ps, ms, denom, value=-lr / (1 - beta1**t))

    def _step_fused(self, group: dict, params: list[torch.Tensor]) -> None:
        """Same arithmetic again, one `torch._fused_adamw_` call per (device, dtype, step count)."""
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        batches: dict[tuple, list[torch.Tensor]] = {}
        for p in params:
            batches.setdefault((p.device, p.dtype, self.state[p]["step"]), []).append(p)
        for (device, _, t), ps in batches.items():
            # The kernel reads the step count from a float tensor per parameter (one shared tensor here).
            step = torch.tensor(float(t), device=device)
            try:
                torch._fused_adamw_(ps, [p.grad for p in ps], [self.state[p]["exp_avg"] for p in ps],
                                    [self.state[p]["exp_avg_sq"] for p in ps], [], [step] * len(ps), lr=lr,
                                    beta1=beta1, beta2=beta2, weight_decay=wd, eps=eps, amsgrad=False,
                                    maximize=False)
            except (NotImplementedError, RuntimeError):  # no kernel for this device/dtype (e.g. CPU, torch < 2.4)
                self._step_foreach(group, ps)  # it refuses before writing anything: nothing is applied twice


def fused_kernel_fits(params: list[torch.Tensor]) -> bool:
    """True where `torch._fused_adamw_` can update `params`: the installed torch has it, and every parameter
    and gradient is a plain dense floating tensor on CPU or CUDA (FSDP's DTensors take the foreach path)."""
    return hasattr(torch, "_fused_adamw_") and all(
        type(p.detach()) is torch.Tensor and p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point
        and not p.grad.is_sparse and p.grad.dtype == p.dtype for p in params)


# ---- Muon ------------------------------------------------------------------------------------------
ADJUST_LR_FNS = ("original", "match_rms_adamw", "none")


def muon_lr_ratio(shape: torch.Size | tuple[int, ...], adjust_lr_fn: str) -> float:
    """How much a (rows, cols) matrix's step is scaled, so updates of different shapes compare.

    original: √max(1, rows/cols) (Keller Jordan's: an orthogonal tall matrix has a smaller RMS).
    match_rms_adamw: 0.2·√max(rows, cols) (Moonshot's: the update's RMS matches AdamW's typical 0.2, so
    AdamW's learning rate and weight decay can be reused). none: 1.
    """
    rows, cols = shape[0], shape[1]
    if adjust_lr_fn == "original":
        return math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    if adjust_lr_fn == "none":
        return 1.0
    raise ValueError(f"adjust_lr_fn={adjust_lr_fn!r} must be one of {ADJUST_LR_FNS}")


def _whole_matrix(t: torch.Tensor) -> torch.Tensor:
    """The full matrix of a sharded (FSDP2 DTensor) tensor; a plain tensor as it is. Newton-Schulz mixes
    every row with every other, so it cannot run shard by shard."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _like(full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`full` laid out like `ref`: re-sharded when ref is a DTensor. Every rank computed the same full
    matrix, so each keeps its own shard without communication (src_data_rank=None, torch >= 2.6)."""
    if not hasattr(ref, "full_tensor"):
        return full
    from torch.distributed.tensor import distribute_tensor

    try:
        return distribute_tensor(full, ref.device_mesh, ref.placements, src_data_rank=None)
    except TypeError:  # older torch: scatter from rank 0 (same values, one extra collective)
        return distribute_tensor(full, ref.device_mesh, ref.placements)


class Muon(AdamW):
    """Muon (MomentUm Orthogonalized by Newton-Schulz) for 2-D hidden matrices, AdamW for the rest.

    Per matrix: the momentum buffer is an EMA of the gradient (B ← μ·B + (1-μ)·g); Nesterov looks one
    step ahead (u = (1-μ)·g + μ·B); u is orthogonalised (`newton_schulz_orthogonalize`), so every
    direction of the update moves by the same amount whatever the gradient's spectrum; then decoupled
    weight decay p ← p·(1 - lr·λ) and p ← p - lr·ratio·O (`muon_lr_ratio`). This is torch.optim.Muon's
    arithmetic (tests compare the two).

    Groups with `use_muon=False` take AdamW's update (betas, eps, weight_decay as in AdamW), so one
    optimizer, one state_dict and one checkpoint entry hold both: embeddings, the output head and the
    norm gains must stay on AdamW (a lookup table or a classifier is not a "hidden" linear map, and a
    vector cannot be orthogonalised). `lr_scale` multiplies a group's scheduled `lr` (the trainer sets
    every group's lr from one schedule; Muon's own peak lr is learning_rate·lr_scale).

    `ns_dtype=None` (the default) picks Newton-Schulz's precision from the hardware at each step
    (`newton_schulz_dtype`), so a checkpoint moved between machines takes each one's fast path.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter] | Iterable[dict],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str = "original",
        ns_dtype: torch.dtype | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        adamw_eps: float = 1e-8,
        foreach: bool = True,
    ):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"invalid momentum {momentum}: must be in [0, 1)")
        if ns_steps < 1:
            raise ValueError(f"ns_steps must be >= 1, got {ns_steps}")
        muon_lr_ratio((1, 1), adjust_lr_fn)  # validates the name
        super().__init__(params, lr=lr, betas=betas, eps=adamw_eps, weight_decay=weight_decay, foreach=foreach)
        extra = dict(use_muon=True, lr_scale=1.0, momentum=momentum, nesterov=nesterov,
                     ns_coefficients=tuple(ns_coefficients), ns_eps=eps, ns_steps=ns_steps,
                     adjust_lr_fn=adjust_lr_fn, ns_dtype=ns_dtype)
        for key, value in extra.items():
            self.defaults[key] = value
            for group in self.param_groups:
                group.setdefault(key, value)
        for group in self.param_groups:
            if group["use_muon"]:
                bad = [tuple(p.shape) for p in group["params"] if p.dim() != 2]
                if bad:
                    raise ValueError(f"Muon groups take 2-D matrices only, got shapes {bad}; put vectors "
                                     "and embeddings in a group with use_muon=False (AdamW)")

    def _group_step(self, group: dict) -> None:
        if group["use_muon"]:
            self._muon_group(group)
        else:
            self._adamw_group(dict(group, lr=group["lr"] * group["lr_scale"]))

    def _muon_group(self, group: dict) -> None:
        lr, wd, mu = group["lr"] * group["lr_scale"], group["weight_decay"], group["momentum"]
        ns_args = (group["ns_steps"], group["ns_coefficients"], group["ns_eps"], group["ns_dtype"])
        params, updates = [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - mu)
            params.append(p)
            updates.append(p.grad.lerp(buf, mu) if group["nesterov"] else buf)
        for p, ortho in zip(params, _orthogonalize_all(updates, ns_args)):
            if wd:
                p.mul_(1 - lr * wd)
            p.add_(_like(ortho.to(p.dtype), p), alpha=-lr * muon_lr_ratio(p.shape, group["adjust_lr_fn"]))


def _orthogonalize_all(updates: list[torch.Tensor], ns_args: tuple) -> list[torch.Tensor]:
    """Newton-Schulz of every update, in order: plain tensors of the same shape go through one stacked
    call together; a sharded (DTensor) one is gathered and done on its own."""
    out: list[torch.Tensor | None] = [None] * len(updates)
    by_shape: dict[tuple, list[int]] = {}
    for i, u in enumerate(updates):
        if hasattr(u, "full_tensor"):
            out[i] = newton_schulz_orthogonalize(_whole_matrix(u), *ns_args)
        else:
            by_shape.setdefault((tuple(u.shape), u.dtype, u.device), []).append(i)
    for idx in by_shape.values():
        if len(idx) == 1:
            out[idx[0]] = newton_schulz_orthogonalize(updates[idx[0]], *ns_args)
            continue
        for i, ortho in zip(idx, newton_schulz_orthogonalize(torch.stack([updates[i] for i in idx]), *ns_args)):
            out[i] = ortho
    return out


def is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    """A 2-D weight that maps hidden states to hidden states: what Muon is for. Embedding tables (names
    with 'embed') and the output head ('lm_head') are excluded by name, vectors by shape."""
    return p.dim() == 2 and "embed" not in name and "lm_head" not in name


@torch.no_grad()
def per_tensor_norms(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The float32 L2 norm of each tensor: one fused `_foreach_norm` call where torch has it (one kernel
    launch instead of one per parameter), else one vector_norm per tensor."""
    try:
        return list(torch._foreach_norm(tensors, 2, dtype=torch.float32))
    except (AttributeError, TypeError, RuntimeError):  # older torch: no _foreach_norm, or no dtype argument
        return [torch.linalg.vector_norm(t.float()) for t in tensors]


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all `tensors` together, as if flattened into one vector (float32)."""
    return torch.linalg.vector_norm(torch.stack(per_tensor_norms(tensors)))


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.nn.Parameter], max_l2_norm: float, eps: float = 1e-6) -> torch.Tensor:
    """Scale all gradients together so their global L2 norm is at most max_l2_norm; return the norm
    before clipping. Clipping the *global* norm keeps the update's direction, only its length shrinks."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    total = global_norm(grads)
    scale = (max_l2_norm / (total + eps)).clamp(max=1.0)
    torch._foreach_mul_(grads, scale.to(grads[0].device))
    return total


def muon_optimizer(cfg, model: torch.nn.Module, groups: list[dict]) -> Muon:
    """optimizer="muon": the hidden matrices (`is_hidden_matrix`) of AdamW's `groups` (its decay / no-decay
    split) move to one Muon group with muon_lr (as a multiple of the scheduled lr), muon_momentum and
    muon_weight_decay; embeddings, head and gains stay in their AdamW groups with the AdamW keys."""
    hidden = [p for name, p in model.named_parameters() if p.requires_grad and is_hidden_matrix(name, p)]
    hidden_ids = {id(p) for p in hidden}
    adamw_groups = [dict(g, params=[p for p in g["params"] if id(p) not in hidden_ids], use_muon=False)
                    for g in groups]
    muon_group = dict(params=[p for g in groups for p in g["params"] if id(p) in hidden_ids], use_muon=True,
                      weight_decay=cfg.muon_weight_decay, lr_scale=cfg.muon_lr / cfg.learning_rate)
    return Muon([g for g in adamw_groups if g["params"]] + ([muon_group] if muon_group["params"] else []),
                lr=cfg.learning_rate, momentum=cfg.muon_momentum, nesterov=cfg.muon_nesterov,
                ns_steps=cfg.muon_ns_steps, adjust_lr_fn=cfg.muon_adjust_lr, betas=(cfg.beta1, cfg.beta2),
                adamw_eps=cfg.eps, foreach=True,
                ns_dtype=None if cfg.muon_ns_dtype == "auto" else getattr(torch, cfg.muon_ns_dtype))
