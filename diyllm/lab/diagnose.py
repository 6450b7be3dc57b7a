"""Look inside a model: per-layer gradient norms, weight statistics, update sizes, dead units.

    diyllm diagnose --ckpt runs/demo/latest.pt            # a trained checkpoint
    diyllm diagnose configs/pystdlib_cpu.toml              # a fresh model of that config's shape

One forward/backward on a batch gives each parameter's gradient; the update-to-weight ratio
lr·|update|/|w| comes from the checkpoint's AdamW moments when they are there (the step the optimizer
would take next), otherwise from one real optimizer step on a copy of the model. A healthy run keeps
that ratio around 1e-3 per step (much less: the layer is not learning; much more: it is thrashing).
Gradient norms that shrink or grow by orders of magnitude from the last layer to the first point to
vanishing / exploding gradients; the heat map (rows = layers, columns = weight kinds) makes it visible.
Hints for dead SwiGLU units (gate stuck in silu's flat negative region) and collapsed attention
(heads whose attention entropy is near zero: every query looks at one token) are printed too.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from diyllm.atomic import atomic_write
from diyllm.checkpoints import read_checkpoint, resolve_checkpoint_path
from diyllm.errors import UserError
from diyllm.lab.common import save_png
from diyllm.model import DIYConfig, DIYForCausalLM
from diyllm.model.attention import causal_mask
from diyllm.model.rope import apply_rotary
from diyllm.training.optim import AdamW

ACCEPTS_OVERRIDES = True
GATE_OFF = -4.0  # silu(x) for x < -4 is within 0.08 of 0 and its slope is < 0.06: the unit barely passes signal
DEAD_UNIT_FRACTION = 0.99  # a unit whose gate is off on ≥ 99 % of tokens is called dead
COLLAPSED_ENTROPY = 0.1  # mean attention entropy / log(#visible keys) below this: the head looks at ~one token


@dataclass
class ParamStats:
    name: str
    layer: str
    kind: str
    numel: int
    weight_mean: float
    weight_std: float
    weight_absmax: float
    grad_norm: float
    update_ratio: float | None  # |Δw| / |w| for one step
    grad_mean: float = 0.0  # over the parameter's elements: a mean far from 0 is a consistent push
    grad_std: float = 0.0
    grad_absmax: float = 0.0  # one huge element can dominate a clipped global norm


@dataclass
class LayerStats:
    layer: str
    grad_norm: float  # L2 norm over all the layer's gradients
    weight_norm: float
    weight_std: float
    weight_absmax: float
    update_ratio: float | None
    gate_off_fraction: float | None = None  # SwiGLU gate pre-activations < GATE_OFF
    dead_units: float | None = None  # fraction of d_ff units off on ≥ 99 % of tokens
    attn_entropy: float | None = None  # mean over heads of entropy / log(#keys), 1 = uniform
    collapsed_heads: int | None = None


@dataclass
class Diagnosis:
    loss: float
    ln_vocab: float
    update_source: str
    layers: list[LayerStats]
    params: list[ParamStats]
    hints: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def layer_of(name: str) -> tuple[str, str]:
    """('layers.3', 'attn.q_proj') from 'layers.3.attn.q_proj.weight'; embeddings and head get their own rows."""
    m = re.match(r"layers\.(\d+)\.(.+?)(?:\.weight)?$", name)
    if m:
        return f"layers.{m.group(1)}", m.group(2)
    if name.startswith("token_embeddings"):
        return "embed", "token_embeddings"
    return "head", name.removesuffix(".weight")


def _layer_order(model: DIYForCausalLM) -> list[str]:
    return ["embed", *[f"layers.{i}" for i in range(len(model.layers))], "head"]


def _adam_updates_from_state(model: nn.Module, opt_state: dict) -> dict[str, torch.Tensor] | None:
    """Per-parameter next AdamW step lr·m̂/(√v̂+eps) + lr·wd·w from a saved optimizer state_dict.

    The state is keyed by position in the optimizer's parameter list, which is not stored by name; we
    try the orders a trainer commonly uses (all parameters; 2-D weights then the rest) and accept one
    only if every moment tensor's shape matches its parameter's. None when nothing fits.
    """
    groups, state = opt_state.get("param_groups"), opt_state.get("state")
    if not groups or not state:
        return None
    named = list(model.named_parameters())
    orders = [named, [p for p in named if p[1].dim() >= 2] + [p for p in named if p[1].dim() < 2]]
    indices = [i for g in groups for i in g["params"]]
    group_of = {i: g for g in groups for i in g["params"]}
    for order in orders:
        if len(order) != len(indices):
            continue
        pairs = list(zip(indices, order))
        if not all(i in state and state[i]["exp_avg"].shape == p.shape for i, (_, p) in pairs):
            continue
        updates = {}
        for i, (name, p) in pairs:
            g, s = group_of[i], state[i]
            t = float(s["step"])
            b1, b2 = g["betas"]
            m_hat = s["exp_avg"].float() / (1 - b1**t)
            v_hat = s["exp_avg_sq"].float() / (1 - b2**t)
            step = g["lr"] * m_hat / (v_hat.sqrt() + g.get("eps", 1e-8))
            updates[name] = step + g["lr"] * g.get("weight_decay", 0.0) * p.detach().float()
        return updates
    return None


def _one_step_updates(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float) -> dict[str, torch.Tensor]:
    """Take one real AdamW step on a copy of the model and return Δw per parameter."""
    clone = copy.deepcopy(model)
    clone.train()
    opt = AdamW(clone.parameters(), lr=lr, weight_decay=0.0)
    clone(x, targets=y).loss.backward()
    before = {n: p.detach().clone() for n, p in clone.named_parameters()}
    opt.step()
    return {n: (p.detach() - before[n]) for n, p in clone.named_parameters()}


class _ActivationProbe:
    """Forward hooks that record SwiGLU gate statistics and attention entropy per block."""

    def __init__(self, model: DIYForCausalLM):
        self.gate: dict[int, tuple[float, float]] = {}
        self.entropy: dict[int, list[float]] = {}
        self.handles = []
        for i, block in enumerate(model.layers):
            self.handles.append(block.ffn.register_forward_hook(self._gate_hook(i)))
            self.handles.append(block.attn.register_forward_hook(self._attn_hook(i)))

    def _gate_hook(self, i: int):
        def hook(module, inputs, output):
            gate = inputs[0] @ module.w1.weight.t()  # (B, T, d_ff) pre-activations of silu
            off = gate < GATE_OFF
            per_unit = off.float().reshape(-1, off.shape[-1]).mean(0)
            self.gate[i] = (off.float().mean().item(), (per_unit >= DEAD_UNIT_FRACTION).float().mean().item())
        return hook

    def _attn_hook(self, i: int):
        def hook(module, inputs, output):
            x = inputs[0]
            B, T, _ = x.shape
            H, Hkv, D = module.num_heads, module.num_kv_heads, module.head_dim
            q = (x @ module.q_proj.weight.t()).view(B, T, H, D).transpose(1, 2)
            k = (x @ module.k_proj.weight.t()).view(B, T, Hkv, D).transpose(1, 2)
            if module.rope is not None:
                cos, sin = module.rope.cos_sin(None, T)
                q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            k = k.repeat_interleave(H // Hkv, dim=1)
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(D)
            scores = scores.masked_fill(~causal_mask(T, T, x.device), float("-inf"))
            p = torch.softmax(scores.float(), dim=-1)
            ent = -(p * torch.log(p.clamp_min(1e-12))).sum(-1)  # (B, H, T)
            visible = torch.log(torch.arange(1, T + 1, device=x.device, dtype=torch.float32))
            # Query 0 sees one key (entropy 0 by necessity); normalise the rest by their maximum.
            norm = (ent[..., 1:] / visible[1:]).mean(dim=(0, 2)) if T > 1 else torch.ones(H)
            self.entropy[i] = norm.tolist()
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def diagnose_model(
    model: DIYForCausalLM,
    x: torch.Tensor,
    y: torch.Tensor,
    lr: float = 1e-3,
    optimizer_state: dict | None = None,
) -> Diagnosis:
    """Statistics per parameter and per layer for one batch (model left unchanged, gradients cleared)."""
    model.eval()  # no dropout: measure the network itself
    probe = _ActivationProbe(model)
    try:
        model.zero_grad(set_to_none=True)
        loss = model(x, targets=y).loss
        loss.backward()
    finally:
        probe.remove()
    updates = _adam_updates_from_state(model, optimizer_state) if optimizer_state else None
    source = "checkpoint AdamW moments (the next step)"
    grads = {n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for n, p in
             model.named_parameters()}
    model.zero_grad(set_to_none=True)
    if updates is None:
        updates = _one_step_updates(model, x, y, lr)
        source = f"one AdamW step with lr={lr:g} on a copy (a fresh optimizer's first step is ~lr per weight)"

    params = []
    for name, p in model.named_parameters():
        w = p.detach().float()
        layer, kind = layer_of(name)
        w_norm = w.norm().item()
        upd = updates.get(name)
        ratio = upd.float().norm().item() / w_norm if upd is not None and w_norm > 0 else None
        std = w.std().item() if w.numel() > 1 else 0.0
        g = grads[name].float()
        params.append(ParamStats(name, layer, kind, w.numel(), w.mean().item(), std, w.abs().max().item(),
                                 g.norm().item(), ratio, g.mean().item(), g.std().item() if g.numel() > 1 else 0.0,
                                 g.abs().max().item()))

    layers = []
    for layer in _layer_order(model):
        ps = [p for p in params if p.layer == layer]
        if not ps:
            continue
        w_all = torch.cat([dict(model.named_parameters())[p.name].detach().float().flatten() for p in ps])
        ratios = [p.update_ratio * math.sqrt(p.numel) for p in ps if p.update_ratio is not None]
        weights = [math.sqrt(p.numel) for p in ps if p.update_ratio is not None]
        stats = LayerStats(
            layer=layer,
            grad_norm=math.sqrt(sum(p.grad_norm**2 for p in ps)),
            weight_norm=w_all.norm().item(),
            weight_std=w_all.std().item(),
            weight_absmax=w_all.abs().max().item(),
            update_ratio=sum(ratios) / sum(weights) if weights else None,
        )
        if layer.startswith("layers."):
            i = int(layer.split(".")[1])
            if i in probe.gate:
                stats.gate_off_fraction, stats.dead_units = probe.gate[i]
            if i in probe.entropy:
                ents = probe.entropy[i]
                stats.attn_entropy = sum(ents) / len(ents)
                stats.collapsed_heads = sum(e < COLLAPSED_ENTROPY for e in ents)
        layers.append(stats)
    diag = Diagnosis(loss.item(), math.log(model.config.vocab_size), source, layers, params)
    diag.hints = _hints(diag)
    return diag


def _hints(d: Diagnosis) -> list[str]:
    hints = []
    if not math.isfinite(d.loss):
        hints.append("loss is not finite: look for an LR that is too high or fp16 overflow")
    blocks = [s for s in d.layers if s.layer.startswith("layers.")]
    if len(blocks) >= 2 and blocks[0].grad_norm > 0 and blocks[-1].grad_norm > 0:
        r = blocks[0].grad_norm / blocks[-1].grad_norm
        if r < 1e-2:
            hints.append(f"first block's grad norm is {r:.1e}x the last block's: gradients vanish towards the input")
        elif r > 1e2:
            hints.append(f"first block's grad norm is {r:.1e}x the last block's: gradients explode towards the input")
    fresh = "" if d.update_source.startswith("checkpoint") else (
        " — measured with a fresh optimizer, whose first step is ~lr per weight: this is what warmup is for")
    for s in d.layers:
        if s.update_ratio is not None and s.update_ratio > 1e-1:
            hints.append(f"{s.layer}: update/weight ratio {s.update_ratio:.1e} per step is large (LR too high?){fresh}")
        elif s.update_ratio is not None and s.update_ratio < 1e-5:
            hints.append(f"{s.layer}: update/weight ratio {s.update_ratio:.1e} per step is tiny (LR too low / frozen?)")
        if s.dead_units:
            hints.append(f"{s.layer}: {s.dead_units:.0%} of SwiGLU units have their gate off on ≥99% of tokens (dead)")
        if s.collapsed_heads:
            hints.append(f"{s.layer}: {s.collapsed_heads} attention head(s) with near-zero entropy (collapsed)")
    if d.loss > 1.5 * d.ln_vocab:
        hints.append(f"loss {d.loss:.2f} is far above ln(V) = {d.ln_vocab:.2f}: initial logits too large?")
    return hints or ["nothing unusual"]


def format_report(d: Diagnosis) -> str:
    lines = [f"loss on this batch {d.loss:.4f}  (ln V = {d.ln_vocab:.4f}, the loss of a uniform guess)",
             f"update sizes from: {d.update_source}",
             f"{'layer':<10} {'grad norm':>10} {'|w|':>9} {'w std':>8} {'max|w|':>8} {'upd/w':>9} "
             f"{'gate off':>8} {'dead':>6} {'attn H':>7}"]
    for s in d.layers:
        def opt(v, spec):
            return format(v, spec) if v is not None else "–"
        lines.append(f"{s.layer:<10} {s.grad_norm:>10.3e} {s.weight_norm:>9.3f} {s.weight_std:>8.4f} "
                     f"{s.weight_absmax:>8.3f} {opt(s.update_ratio, '9.2e'):>9} {opt(s.gate_off_fraction, '8.1%'):>8} "
                     f"{opt(s.dead_units, '6.1%'):>6} {opt(s.attn_entropy, '7.3f'):>7}")
    lines.append("attn H = mean attention entropy / log(#keys) (1 uniform, 0 one token); gate off = SwiGLU gate < -4")
    lines += ["hints:"] + [f"  - {h}" for h in d.hints]
    return "\n".join(lines)


def format_param_table(d: Diagnosis) -> str:
    """One row per parameter tensor: gradient mean / std / max|g| and norm next to the weight's std."""
    lines = [f"{'parameter':<34} {'numel':>8} {'grad mean':>10} {'grad std':>9} {'max|grad|':>9} "
             f"{'grad norm':>9} {'w std':>8}"]
    lines += [f"{p.name:<34} {p.numel:>8,} {p.grad_mean:>+10.2e} {p.grad_std:>9.2e} {p.grad_absmax:>9.2e} "
              f"{p.grad_norm:>9.2e} {p.weight_std:>8.4f}" for p in d.params]
    return "\n".join(lines)


def plot_diagnosis(d: Diagnosis, out: str | Path) -> Path:
    """Heat maps (rows = layers, cols = weight kinds) of log10 grad norm and log10 update ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [s.layer for s in d.layers]
    kinds = list(dict.fromkeys(p.kind for p in d.params))
    grad = np.full((len(rows), len(kinds)), np.nan)
    upd = np.full_like(grad, np.nan)
    for p in d.params:
        r, c = rows.index(p.layer), kinds.index(p.kind)
        grad[r, c] = math.log10(p.grad_norm) if p.grad_norm > 0 else np.nan
        if p.update_ratio:
            upd[r, c] = math.log10(p.update_ratio)
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.35 * len(rows) + 3.2))
    for ax, data, title in ((axes[0], grad, "log10 gradient norm"), (axes[1], upd, "log10 |update| / |w| per step")):
        im = ax.imshow(data, aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(kinds)), kinds, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(rows)), rows, fontsize=7)
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(f"diagnose: loss {d.loss:.3f} (ln V {d.ln_vocab:.3f}); blank = not applicable", fontsize=9)
    fig.tight_layout()
    return save_png(fig, out, dpi=80)


# ---- building the model and a batch --------------------------------------------------------------------
def _batch_from(data_dir: str | None, vocab_size: int, context_length: int, batch_size: int, seed: int):
    """A batch of real validation tokens when the data folder exists, else uniform random tokens."""
    if data_dir and Path(data_dir, "meta.json").is_file():
        from diyllm.data.batch import get_batch
        from diyllm.data.dataset import load_split

        data = load_split(data_dir, "val", verify_checksums=True)  # a damaged shard: one error, as train gives
        if len(data) <= context_length:
            data = load_split(data_dir, "train", verify_checksums=True)
        x, y = get_batch(data, batch_size, context_length, generator=np.random.default_rng(seed))
        return x, y, f"{batch_size} windows of {data_dir}"
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch_size, context_length + 1), generator=g)
    return ids[:, :-1], ids[:, 1:], f"{batch_size} windows of random tokens (no data folder found)"


def load_for_diagnosis(ckpt: str) -> tuple[DIYForCausalLM, dict]:
    """Model (float32, CPU) and checkpoint dict, without needing the tokenizer."""
    state = read_checkpoint(resolve_checkpoint_path(ckpt))  # a run folder means its best.pt / latest.pt
    if "model_config" not in state:
        raise UserError(f"{ckpt} has no 'model_config'; it was not written by `diyllm train`")
    model = DIYForCausalLM(DIYConfig.from_dict(state["model_config"]))
    model.load_state_dict(state["model"])
    return model, state


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", default=None,
                        help="config file/name: diagnose a FRESH model of its shape (instead of --ckpt)")
    parser.add_argument("--ckpt", default=None, help="checkpoint to diagnose (e.g. runs/demo/latest.pt)")
    parser.add_argument("--data_dir", default=None, help="prepared data for the batch (default: the run's)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None, help="LR for the one-step estimate (default: the run's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="PNG path (default: next to the checkpoint, or diagnose.png)")
    parser.add_argument("--per_param", action="store_true",
                        help="also print gradient mean/std/max per parameter tensor (not only per layer)")


def run(args: argparse.Namespace) -> int:
    if (args.ckpt is None) == (args.config is None):
        raise UserError("give either --ckpt PATH (a trained model) or a CONFIG (a fresh model of that shape)")
    torch.manual_seed(args.seed)
    if args.ckpt:
        model, state = load_for_diagnosis(args.ckpt)
        tc = state.get("train_config") or {}
        opt_state = state.get("optimizer")
        default_out = Path(resolve_checkpoint_path(args.ckpt)).with_name("diagnose.png")
    else:
        from diyllm.training.config import load_config

        cfg = load_config(args.config, list(args.overrides))
        tc = asdict(cfg) if hasattr(cfg, "__dataclass_fields__") else dict(vars(cfg))
        vocab = tc.get("vocab_size") or 0
        data_dir = args.data_dir or tc.get("data_dir")
        if not vocab and data_dir and Path(data_dir, "meta.json").is_file():
            from diyllm.data.dataset import read_meta

            vocab = int(read_meta(data_dir)["vocab_size"])
        shape = {k: tc[k] for k in ("context_length", "d_model", "num_layers", "num_heads", "num_kv_heads", "d_ff",
                                     "rope_theta", "tie_embeddings", "init_std") if k in tc}
        model = DIYForCausalLM(DIYConfig(vocab_size=vocab or 256, **shape))
        opt_state = None
        default_out = Path("diagnose.png")
    if args.overrides and args.ckpt:
        raise UserError(f"unexpected arguments {args.overrides} (overrides apply to a CONFIG, not --ckpt)")
    cfg = model.config
    data_dir = args.data_dir or tc.get("data_dir")
    x, y, what = _batch_from(data_dir, cfg.vocab_size, cfg.context_length, args.batch_size, args.seed)
    lr = args.lr if args.lr is not None else float(tc.get("learning_rate", 1e-3))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {cfg.num_layers} layers, d_model {cfg.d_model}, {n_params:,} parameters; batch: {what}")
    d = diagnose_model(model, x, y, lr=lr, optimizer_state=opt_state)
    print(format_report(d))
    if args.per_param:
        print(format_param_table(d))
    out = Path(args.out) if args.out else default_out
    plot_diagnosis(d, out)
    json_path = out.with_suffix(".json")
    with atomic_write(json_path, "w", encoding="utf-8") as f:
        json.dump(d.to_dict(), f, indent=1)
    print(f"wrote {out} and {json_path}")
    return 0
