"""Fully sharded data parallelism (PyTorch FSDP2, `fully_shard`) for models that one process cannot hold.

Under DDP every rank keeps all weights, gradients and AdamW moments (16 bytes per parameter). FSDP2
splits each of them over the ranks: a parameter becomes a DTensor holding 1/N of its rows; just before a
block computes, its full weights are all-gathered, and right after its backward the gradients are
reduce-scattered so each rank keeps the slice it owns (and optimises only that slice).

    mesh = device_mesh("cuda", world_size=8, replicas=1)
    shard_model(model, mesh, compute_dtype=torch.bfloat16)

Units: every transformer block is one `fully_shard` unit; the embedding and the head are one more each
(one together when they are tied: a tied matrix is a single parameter and must live in one unit); the
root unit holds the final norm. With `replicas > 1` the mesh is 2-D (replicate x shard): HSDP shards
within a group (a node) and replicates across groups, so the big all-gathers stay on the fast links.

Also here: activation checkpointing per block (plain PyTorch, usable with or without FSDP), the global
gradient norm of sharded gradients, and building a model on the `meta` device whose shards are then
initialised exactly as a plain `DIYForCausalLM(config)` would have been for the same RNG state.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from diyllm.errors import UserError
from diyllm.training.optim import per_tensor_norms
from diyllm.training.parallel import ParallelWrapper


def fsdp_api() -> tuple[Callable, type, type]:
    """(fully_shard, MixedPrecisionPolicy, CPUOffloadPolicy): public since torch 2.6, under
    torch.distributed._composable.fsdp in 2.4/2.5."""
    try:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
        except ImportError:
            raise UserError(f"parallelism=fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard, PyTorch >= 2.4); "
                            f"this PyTorch is {torch.__version__}. Use parallelism=ddp or upgrade PyTorch") from None
    return fully_shard, MixedPrecisionPolicy, CPUOffloadPolicy


def dtensor_api() -> tuple[type, Callable]:
    """(DTensor, distribute_tensor): public in torch.distributed.tensor since 2.5."""
    try:
        from torch.distributed.tensor import DTensor, distribute_tensor
    except ImportError:
        from torch.distributed._tensor import DTensor, distribute_tensor
    return DTensor, distribute_tensor


def is_dtensor(t: Any) -> bool:
    try:
        DTensor, _ = dtensor_api()
    except ImportError:
        return False
    return isinstance(t, DTensor)


def device_mesh(device_type: str, world_size: int, replicas: int = 1):
    """The ranks as a 1-D mesh (FSDP) or a 2-D (replicate, shard) mesh (HSDP). On CPU the mesh is
    "cpu" (gloo); on GPUs "cuda" (NCCL)."""
    from torch.distributed.device_mesh import init_device_mesh

    if replicas < 1 or world_size % replicas:
        raise UserError(f"fsdp_replicas={replicas} must divide the {world_size} processes (e.g. the number of "
                        "nodes: 2 nodes x 8 GPUs -> fsdp_replicas=2)")
    if replicas == 1:
        return init_device_mesh(device_type, (world_size,), mesh_dim_names=("shard",))
    return init_device_mesh(device_type, (replicas, world_size // replicas), mesh_dim_names=("replicate", "shard"))


def shard_model(
    model: nn.Module,
    mesh,
    compute_dtype: torch.dtype = torch.float32,
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
) -> nn.Module:
    """fully_shard each block, the embedding and the head (tied: one unit), then the root; in place.

    compute_dtype bfloat16: weights are gathered in bf16 for compute and gradients reduced in fp32
    (MixedPrecisionPolicy); the sharded master weights and AdamW state stay fp32. float16 is refused:
    FSDP2 would need a sharded gradient scaler, which diyllm does not implement; bf16 needs none.
    """
    fully_shard, MixedPrecisionPolicy, CPUOffloadPolicy = fsdp_api()
    if compute_dtype == torch.float16:
        raise UserError("parallelism=fsdp supports dtype=bfloat16 or float32, not float16 (which needs a sharded "
                        "gradient scaler); use dtype=bfloat16")
    kw: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if compute_dtype == torch.bfloat16:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    for block in model.layers:
        fully_shard(block, **kw)
    if not getattr(model.config, "tie_embeddings", False):
        fully_shard(model.token_embeddings, **kw)
        # The head runs last in forward and first in backward: resharding it in between saves nothing.
        fully_shard(model.lm_head, **{**kw, "reshard_after_forward": False})
    fully_shard(model, **kw)  # the root: final norm (+ the tied embedding/head matrix)
    return model


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """Accumulation: on all but the last micro-step keep gradients unreduced (and weights gathered)."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)
    if hasattr(model, "set_reshard_after_backward"):
        model.set_reshard_after_backward(sync)


def enable_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Make every block recompute its activations during backward instead of storing them.

    Only the block's input is kept (d_model numbers per token instead of ~20·d_model); backward runs the
    block's forward again first, about a third more compute. The block's forward is replaced on the
    instance, so module names and state_dict keys are unchanged. Non-reentrant checkpointing restores the
    RNG state, so dropout masks (and therefore gradients) are the same as without it.
    """
    from torch.utils.checkpoint import checkpoint

    for block in model.layers:
        if getattr(block, "activation_checkpointed", False):
            continue
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():  # eval / generation: nothing to save, nothing to recompute
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward
        block.activation_checkpointed = True
    return model


@torch.no_grad()
def clip_grad_norm_sharded_(parameters: Iterable[torch.Tensor], max_norm: float, eps: float = 1e-6) -> torch.Tensor:
    """Global L2 norm of all gradients, plain or sharded (DTensor); scale them to at most max_norm
    (max_norm <= 0: measure only). Returns the norm before clipping, a plain tensor.

    A sharded gradient's norm is the square root of the sum over ranks of each local slice's squared
    norm: sum locally, all-reduce over the mesh dimensions the gradient is sharded on (not the
    replicate dimension of HSDP, where every group holds the same values)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    sharded = [g for g in grads if is_dtensor(g)]
    local = [g.to_local() if is_dtensor(g) else g for g in grads]
    squares = torch.stack([n.square().to(local[0].device) for n in per_tensor_norms(local)]).sum()
    if sharded:
        mesh, placements = sharded[0].device_mesh, sharded[0].placements
        comm = squares.to(mesh.device_type)
        for dim, placement in enumerate(placements):
            if placement.is_shard():
                dist.all_reduce(comm, group=mesh.get_group(dim))
        squares = comm.to(squares.device)
    total = squares.sqrt()
    if max_norm > 0:
        scale = (max_norm / (total + eps)).clamp(max=1.0)
        for device in {t.device for t in local}:
            on_device = [t for t in local if t.device == device]
            torch._foreach_mul_(on_device, scale.to(device))
    return total


# ---- meta-device init ---------------------------------------------------------------------------------


def init_schedule(model: nn.Module) -> list[nn.Module]:
    """The modules whose constructors draw initial values, in construction (= registration) order."""
    return [m for m in model.modules() if hasattr(m, "reset_parameters") and m._parameters]


def materialize_meta_model(model: nn.Module, device: torch.device | str, rng_state: torch.Tensor,
                           schedule: list[nn.Module] | None = None) -> nn.Module:
    """Give a model built on the meta device (and possibly sharded since) real storage on `device` and the
    exact values `DIYForCausalLM(config)` would have drawn from the CPU RNG state `rng_state`.

    Each parameter is drawn in full on the CPU, in the constructors' order, then only this rank's slice is
    kept: one parameter at a time exists in full, never the whole model. The CPU RNG ends in the state a
    plain construction leaves it in, so anything drawn afterwards matches too. Pass `schedule`
    (init_schedule(model) taken before fully_shard) when sharding may have reordered modules.
    """
    from diyllm.model.rope import RotaryEmbedding
    from diyllm.model.transformer import gpt2_init_std

    schedule = schedule if schedule is not None else init_schedule(model)
    model.to_empty(device=device)
    torch.set_rng_state(rng_state)
    with torch.no_grad():
        for module in schedule:
            # A stand-in of the layer's own class (not FSDP's subclass) whose parameters are full-size CPU
            # tensors: its reset_parameters draws exactly what the constructor drew.
            base = next(c for c in type(module).__mro__ if "reset_parameters" in c.__dict__)
            twin = object.__new__(base)
            twin.__dict__.update(module.__dict__)
            twin._parameters = {name: nn.Parameter(torch.empty(p.shape, dtype=p.dtype))
                                for name, p in module._parameters.items() if p is not None}
            twin.reset_parameters()
            for name, full in twin._parameters.items():
                _copy_full_into(module._parameters[name], full)
        config = getattr(model, "config", None)
        if config is not None and getattr(config, "init_std", None) is not None:
            for name, p in model.named_parameters(remove_duplicate=False):
                if p.dim() < 2:
                    continue
                std = gpt2_init_std(name, config.init_std, config.num_layers)
                full = torch.empty(p.shape, dtype=p.dtype)
                nn.init.trunc_normal_(full, 0.0, std, -3 * std, 3 * std)
                _copy_full_into(p, full)
        for module in model.modules():  # buffers are a function of the config: recompute them
            if isinstance(module, RotaryEmbedding):
                fresh = RotaryEmbedding(module.theta, module.d_k, module.max_seq_len)
                module.cos.copy_(fresh.cos)
                module.sin.copy_(fresh.sin)
    return model


def _copy_full_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """Write the full value `full` into `param`, a plain tensor or a DTensor shard of it."""
    if is_dtensor(param):
        _, distribute_tensor = dtensor_api()
        kwargs = {}
        if "src_data_rank" in inspect.signature(distribute_tensor).parameters:
            kwargs["src_data_rank"] = None  # every rank drew the same values: slice locally, no scatter
        source = full.to(param.device_mesh.device_type)
        param.to_local().copy_(distribute_tensor(source, param.device_mesh, param.placements, **kwargs).to_local())
    else:
        param.copy_(full.to(param.device))


def build_sharded_model(config, device: torch.device, shard: Callable[[nn.Module], Any] | None = None) -> nn.Module:
    """A DIYForCausalLM built on the meta device, sharded by `shard` (e.g. shard_model with a mesh), then
    materialised on `device` with the same values a plain build would draw from the current CPU RNG."""
    from diyllm.model import DIYForCausalLM

    rng = torch.get_rng_state()
    with torch.device("meta"):
        model = DIYForCausalLM(config)
    schedule = init_schedule(model)
    if shard is not None:
        shard(model)
    return materialize_meta_model(model, device, rng, schedule)


class FullyShardedParallel(ParallelWrapper):
    """The loop's parallel wrapper for parallelism = "fsdp" (see diyllm.training.parallel for the seam).

    Beyond the seam's three methods it can build the model itself (`build_model`: on the meta device,
    sharded, each rank materialising its slices) and load a full state_dict into a sharded model
    (`load_full_state_dict`, for init_from=PATH). `wrap` shards a model that is not sharded yet (a model
    handed to train()) in place and returns the module it was given (compiled or not), so the compiled
    wrapper keeps calling the now-sharded module.
    """

    name = "fsdp"

    def __init__(self, device: torch.device, world_size: int, compute_dtype: torch.dtype = torch.float32,
                 reshard_after_forward: bool = True, cpu_offload: bool = False, replicas: int = 1,
                 activation_checkpointing: bool = False):
        self.device, self.world_size, self.compute_dtype = device, world_size, compute_dtype
        self.reshard_after_forward, self.cpu_offload, self.replicas = reshard_after_forward, cpu_offload, replicas
        self.activation_checkpointing = activation_checkpointing
        self.mesh = None

    @classmethod
    def from_config(cls, cfg, device: torch.device, world_size: int, compute_dtype: torch.dtype):
        return cls(device, world_size, compute_dtype, cfg.fsdp_reshard_after_forward, cfg.fsdp_cpu_offload,
                   cfg.fsdp_replicas, cfg.activation_checkpointing)

    def shard(self, model: nn.Module) -> nn.Module:
        if getattr(model, "diyllm_sharded", False):
            return model
        if self.activation_checkpointing:
            enable_activation_checkpointing(model)
        if self.mesh is None:
            self.mesh = device_mesh(self.device.type, self.world_size, self.replicas)
        shard_model(model, self.mesh, compute_dtype=self.compute_dtype,
                    reshard_after_forward=self.reshard_after_forward, cpu_offload=self.cpu_offload)
        model.diyllm_sharded = True
        return model

    def build_model(self, config) -> nn.Module:
        return build_sharded_model(config, self.device, self.shard)

    def load_full_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))

    def wrap(self, model: nn.Module) -> nn.Module:
        from diyllm.training.checkpoint import unwrap_model

        self.shard(unwrap_model(model))
        return model

    def sync_gradients(self, train_model: nn.Module, sync: bool) -> AbstractContextManager:
        from diyllm.training.checkpoint import unwrap_model

        set_gradient_sync(unwrap_model(train_model), sync)
        return contextlib.nullcontext()

    def clip_grad_norm(self, params: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
        return clip_grad_norm_sharded_(list(params), max_norm)


__all__ = ["FullyShardedParallel", "fsdp_api", "device_mesh", "shard_model", "set_gradient_sync",
           "enable_activation_checkpointing", "clip_grad_norm_sharded_", "build_sharded_model",
           "materialize_meta_model", "init_schedule", "is_dtensor"]
