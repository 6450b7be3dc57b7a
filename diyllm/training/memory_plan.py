"""How much memory one training process needs, estimated before anything is allocated.

    est = estimate_memory(model_config, batch_size=12, seq_len=1024, world_size=8, parallelism="fsdp")
    print(format_estimate(est, device_bytes=80 * 2**30))

Training memory per rank is what is live at its peak:
  - parameters: fp32 master weights (4 bytes each), divided by the shard count under FSDP;
  - gradients: 4 bytes per parameter (sharded likewise); DDP adds its gradient buckets (another copy);
  - optimizer state: AdamW keeps two fp32 moments, 8 bytes per parameter (sharded likewise);
  - FSDP's gathered weights: the one or two blocks whose full weights (and unsharded gradients) exist
    while they compute; all of them when `fsdp_reshard_after_forward = false`;
  - activations: what the forward pass saves for backward, per token and layer (counted tensor by
    tensor from the model's code, see `activation_bytes_per_token`), plus the head's float32
    log-probabilities (batch x context x vocab, often the largest single item) and the backward's
    temporaries. With activation checkpointing a block keeps only its input and recomputes the rest.
Without gradient accumulation the gradients only appear as backward frees the activations, so the
peak holds the larger of the two ("not live at the same time" in the table).
The numbers are estimates of what the allocator hands out (torch.cuda.max_memory_allocated on a GPU;
library workspaces and allocator caching come on top: `workspace` is a flat 10%).
tests/test_memory_plan.py checks them on CPU against the allocator's measured peak (within 30%) for
several shapes; the process's RSS on CPU is higher still, as glibc keeps freed blocks for reuse.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from diyllm.errors import UserError
from diyllm.model import DIYConfig

MiB, GiB = 2**20, 2**30


@dataclass
class MemoryEstimate:
    """Bytes per rank on the training device (host RAM for what fsdp_cpu_offload moves there)."""

    num_params: int
    params: int
    grads: int
    optimizer: int
    gathered: int  # FSDP: full weights/grads of the blocks being computed
    activations: int  # with the chosen activation_checkpointing setting
    activations_plain: int  # without activation checkpointing
    activations_checkpointed: int  # with it
    workspace: int
    offloaded: int = 0  # bytes moved to host RAM by fsdp_cpu_offload (not in total)
    notes: list[str] = field(default_factory=list)
    not_at_once: int = 0  # <= 0: bytes of the rows above that are never live at the same moment

    @property
    def total(self) -> int:
        return (self.params + self.grads + self.optimizer + self.gathered + self.activations + self.workspace
                + self.not_at_once)


def count_parameters(c: DIYConfig) -> dict[str, int]:
    """Parameter counts by part, from the shape alone (equals DIYForCausalLM(c).num_parameters())."""
    d, kv = c.d_model, c.num_kv_heads * c.head_dim
    ffn_matrices = 2 if c.mlp == "relu2" else 3  # relu2: w1, w2; SwiGLU: w1, w2, w3
    block = 2 * d + 2 * d * d + 2 * d * kv + ffn_matrices * d * c.d_ff
    embedding = c.vocab_size * d
    head = 0 if c.tie_embeddings else c.vocab_size * d
    return {"embedding": embedding, "block": block, "blocks": c.num_layers * block, "head": head,
            "final_norm": d, "total": embedding + c.num_layers * block + head + d}


def activation_bytes_per_token(c: DIYConfig, act_bytes: int, seq_len: int, math_attention: bool) -> dict[str, int]:
    """Bytes saved for backward per token, counted tensor by tensor from this repo's layers (checked by
    tests/test_memory_plan.py against the bytes the allocator hands out).

    One block: each RMSNorm saves 1/rms and the normalised input in float32 (its training fast path,
    model/fast_paths.py), and its output goes on as the next matmul's input (in the compute dtype);
    attention saves q, k and v (k/v expanded to all query heads), the SDPA output and its log-sum-exp;
    SwiGLU saves gate, up, silu(gate) and the product (4·d_ff; relu²: 2·d_ff). qk_norm adds the
    normalised q, k and their 1/rms. Autocast adds a few cast copies (~3·d). Attention that materialises
    the T x T scores (the from-scratch `attn_impl = "diy"`, or SDPA with dropout on CPU, where no fused
    kernel does dropout) saves 3-4 score-sized tensors per head: that term grows with the context length.
    The head saves the final norm and the float32 log-probabilities (4·vocab bytes: the cross-entropy
    upcasts, and log_softmax's backward reads only its output), plus the soft-capped logits when
    logit_softcap is on; its backward holds two float32 logit-sized gradients at once (`head_backward`),
    a block's backward the gradients of its two widest tensors (`block_backward`, 2·d_ff).
    """
    d, kv, h, a = c.d_model, c.num_kv_heads * c.head_dim, c.num_heads, act_bytes
    norm = (d + 1) * 4 + d * a  # 1/rms and x·(1/rms) in float32; the weighted output (next matmul's input)
    attention = 4 * d * a + 4 * h  # q, k, v (expanded), output; log-sum-exp per head (float32)
    if c.qk_norm:
        attention += 4 * (d + kv + h + c.num_kv_heads)
    if c.attn_impl == "diy":
        attention += 3 * h * seq_len * a  # scores, softmax, probabilities before @ v
    elif math_attention and c.dropout > 0:
        attention += 14 * h * seq_len - 4 * h  # math SDPA: scores, softmax, dropout mask, dropped probs
    ffn = (2 if c.mlp == "relu2" else 4) * c.d_ff * a
    casts = 3 * d * a if a < 4 else 0
    block = 2 * norm + attention + ffn + casts
    head = norm + 4 * c.vocab_size + 17 + (c.vocab_size * a if c.logit_softcap else 0)
    return {"block": block, "block_input": d * 4, "block_backward": 2 * c.d_ff * a, "head": head,
            "head_backward": 2 * c.vocab_size * 4}


def estimate_memory(
    c: DIYConfig,
    *,
    batch_size: int,
    seq_len: int | None = None,
    world_size: int = 1,
    parallelism: str = "ddp",
    compute_dtype: str = "float32",
    activation_checkpointing: bool = False,
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
    fsdp_replicas: int = 1,
    accumulation_steps: int = 1,
    device_type: str = "cuda",
) -> MemoryEstimate:
    """Per-rank training memory for micro-batches of batch_size x seq_len tokens (see module docstring).

    accumulation_steps is per rank: above 1, a micro-step's activations coexist with the gradients the
    earlier ones left; at 1 the gradients only appear as backward frees the activations, so the peak
    holds the larger of the two (plus DDP's buckets, which live throughout)."""
    seq_len = seq_len or c.context_length
    counts = count_parameters(c)
    n = counts["total"]
    low_precision = compute_dtype in ("bfloat16", "bf16", "float16", "fp16")
    act_bytes = 2 if low_precision else 4
    fsdp = parallelism == "fsdp" and world_size > 1
    shards = world_size // max(fsdp_replicas, 1) if fsdp else 1
    notes: list[str] = []

    params, grads, optimizer = 4 * n, 4 * n, 8 * n
    gathered = buckets = 0
    if fsdp:
        params, grads, optimizer = (math.ceil(x / shards) for x in (params, grads, optimizer))
        unit = max(counts["block"], counts["embedding"], counts["head"])
        gather_bytes = act_bytes if low_precision else 4
        if reshard_after_forward:
            gathered = 2 * unit * (gather_bytes + 4)  # this unit + the prefetched next one, weights + grads
        else:
            gathered = n * gather_bytes + 2 * unit * 4
        notes.append(f"fsdp: parameters, gradients and optimizer state split over {shards} ranks")
    elif world_size > 1:
        buckets = 4 * n  # DDP's gradient buckets hold a second copy
        grads += buckets
        notes.append("ddp: every rank holds all weights, gradients (+ DDP buckets) and optimizer state")
    if low_precision and not fsdp:
        gathered = act_bytes * n  # autocast caches a low-precision copy of each weight during forward
    elif not fsdp and (c.fused_projections if c.fused_projections is not None else device_type != "cpu"):
        # float32 fused projections: each block's stacked q|k|v and w1|w3 matrices live until backward
        kv = c.num_kv_heads * c.head_dim
        stacked = c.d_model * (c.d_model + 2 * kv) + (2 * c.d_model * c.d_ff if c.mlp != "relu2" else 0)
        gathered = 4 * c.num_layers * stacked
    offloaded = 0
    if cpu_offload and fsdp:
        offloaded = params + grads + optimizer
        params = grads = optimizer = 0
        notes.append("fsdp_cpu_offload: sharded weights, gradients and optimizer state live in host RAM")

    tokens = batch_size * seq_len
    per = activation_bytes_per_token(c, act_bytes, seq_len, math_attention=device_type == "cpu")
    head = tokens * (per["head"] + per["head_backward"])
    block, block_backward = tokens * per["block"], tokens * per["block_backward"]
    # Plain: every block's saved tensors, then either the head's backward or (once the head is freed)
    # one block's backward temporaries on top. Checkpointed: only the block inputs stay, and one block
    # at a time is recomputed (its saved tensors + its backward temporaries).
    plain = c.num_layers * block + max(head, block_backward)
    checkpointed = tokens * c.num_layers * per["block_input"] + max(head, block + block_backward)
    activations = checkpointed if activation_checkpointing else plain
    # What lives at the peak: the gradients coexist with the activations only under accumulation.
    live_grads = grads if accumulation_steps > 1 else buckets
    peak = params + optimizer + gathered + max(activations + live_grads, grads)
    workspace = int(0.10 * peak)
    if device_type == "cpu":
        notes.append("CPU: the process's resident memory (RSS) runs up to ~2x this, as the C allocator keeps "
                     "freed blocks for reuse")
    return MemoryEstimate(n, params, grads, optimizer, gathered, activations, plain, checkpointed, workspace,
                          offloaded, notes, peak - params - optimizer - gathered - activations - grads)


def estimate_for_train_config(cfg, vocab_size: int, world_size: int = 1, compute_dtype: str | None = None,
                              device_type: str = "cuda", model_config: DIYConfig | None = None) -> MemoryEstimate:
    """estimate_memory for a TrainConfig (batch_size is per process and micro-step); model_config
    overrides the config's model keys (a run that starts from a checkpoint takes its shape)."""
    from diyllm.training.build import model_config_from

    return estimate_memory(
        model_config or model_config_from(cfg, vocab_size), batch_size=cfg.batch_size, seq_len=cfg.context_length,
        world_size=world_size, parallelism=cfg.parallelism, compute_dtype=compute_dtype or cfg.dtype,
        activation_checkpointing=cfg.activation_checkpointing, reshard_after_forward=cfg.fsdp_reshard_after_forward,
        cpu_offload=cfg.fsdp_cpu_offload, fsdp_replicas=cfg.fsdp_replicas,
        accumulation_steps=max(1, cfg.gradient_accumulation_steps // max(world_size, 1)), device_type=device_type)


def human_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


def parse_bytes(text: str) -> int:
    """'80GB', '80GiB', '24g', '512MB' -> bytes (GB and GiB both mean 2**30 here, as GPU vendors'
    "80GB" cards report about 79-80 GiB)."""
    t = text.strip().lower().replace(" ", "")
    units = {"tib": 2**40, "tb": 2**40, "t": 2**40, "gib": GiB, "gb": GiB, "g": GiB, "mib": MiB, "mb": MiB,
             "m": MiB, "b": 1}
    for unit, scale in units.items():
        if t.endswith(unit):
            try:
                return int(float(t[: -len(unit)]) * scale)
            except ValueError:
                break
    try:
        return int(float(t) * GiB)  # a bare number means GiB
    except ValueError:
        raise UserError(f"cannot read memory size {text!r}; write it like 80GB, 24GiB or 512MB") from None


def device_memory(device) -> tuple[int, str]:
    """(bytes available to one process, where the figure comes from) for a torch.device."""
    if device.type == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info(device)
        return int(total), f"torch.cuda.mem_get_info ({torch.cuda.get_device_name(device)})"
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0, "unknown"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return ram // max(local, 1), f"physical RAM / {local} local process(es)"


def format_estimate(est: MemoryEstimate, device_bytes: int = 0, device_note: str = "") -> str:
    rows = [
        ("parameters (fp32 master)", est.params),
        ("gradients", est.grads),
        ("optimizer state (AdamW)", est.optimizer),
        ("gathered/low-precision weights", est.gathered),
        ("activations", est.activations),
        ("workspace (+10%)", est.workspace),
    ]
    if est.not_at_once:
        rows.append(("not live at the same time", est.not_at_once))
    lines = [f"memory per rank (estimate) for {est.num_params / 1e6:.1f}M parameters:"]
    lines += [f"  {name:<32} {human_bytes(value):>12}" for name, value in rows]
    lines.append(f"  {'total':<32} {human_bytes(est.total):>12}")
    lines.append(f"  activations without / with activation checkpointing: {human_bytes(est.activations_plain)}"
                 f" / {human_bytes(est.activations_checkpointed)}")
    if est.offloaded:
        lines.append(f"  host RAM for offloaded state: {human_bytes(est.offloaded)}")
    lines += [f"  note: {n}" for n in est.notes]
    if device_bytes:
        share = est.total / device_bytes
        verdict = "fits" if share <= 0.95 else "DOES NOT FIT"
        lines.append(f"  device memory {human_bytes(device_bytes)}{f' ({device_note})' if device_note else ''}: "
                     f"{verdict} ({100 * share:.0f}% used)")
    return "\n".join(lines)


def suggestions(cfg, est: MemoryEstimate, world_size: int) -> list[str]:
    """What would make a too-large run fit, most effective first."""
    out = []
    if not cfg.activation_checkpointing and est.activations_plain > 1.2 * est.activations_checkpointed:
        out.append(f"activation_checkpointing=true (activations {human_bytes(est.activations_plain)} -> "
                   f"{human_bytes(est.activations_checkpointed)}, ~1/3 more compute)")
    if cfg.batch_size > 1:
        half = max(1, cfg.batch_size // 2)
        out.append(f"batch_size={half} with gradient_accumulation_steps={cfg.gradient_accumulation_steps * 2} "
                   "(same global batch, about half the activations)")
    if world_size > 1 and cfg.parallelism != "fsdp":
        out.append(f"parallelism=fsdp (weights, gradients and optimizer state split over {world_size} ranks)")
    elif world_size == 1:
        out.append("more GPUs with parallelism=fsdp (torchrun --nproc_per_node=N) to shard the weights")
    if cfg.parallelism == "fsdp" and not cfg.fsdp_cpu_offload:
        out.append("fsdp_cpu_offload=true (sharded state in host RAM; slower)")
    if cfg.dtype in ("float32", "fp32"):
        out.append("dtype=bfloat16 (halves the activations on GPUs that support it)")
    return out


def check_fits(cfg, est: MemoryEstimate, device_bytes: int, device_note: str, world_size: int) -> None:
    """Raise UserError with suggestions when the estimate exceeds 95% of the device's memory."""
    if not device_bytes or est.total <= 0.95 * device_bytes:
        return
    tips = "\n  - ".join(suggestions(cfg, est, world_size))
    raise UserError(
        f"this run needs about {human_bytes(est.total)} per rank but the device has {human_bytes(device_bytes)} "
        f"({device_note}):\n{format_estimate(est, device_bytes, device_note)}\nto fit, try:\n  - {tips}\n"
        "(memory_check=false starts anyway)")


def check_memory(cfg, model_config: DIYConfig, world_size: int, device, dtype) -> str:
    """The training run's estimate as text (for the run header); UserError with suggestions when it
    cannot fit the device and cfg.memory_check is on."""
    compute = str(dtype).replace("torch.", "")
    est = estimate_for_train_config(cfg, model_config.vocab_size, world_size, compute, device_type=device.type,
                                    model_config=model_config)
    device_bytes, where = device_memory(device)
    if cfg.memory_check:
        check_fits(cfg, est, device_bytes, where, world_size)
    return format_estimate(est, device_bytes, where)


__all__ = ["check_memory", "MemoryEstimate", "estimate_memory", "estimate_for_train_config", "count_parameters",
           "format_estimate", "check_fits", "suggestions", "parse_bytes", "human_bytes", "device_memory"]
