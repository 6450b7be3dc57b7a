"""The training loop shared by pretraining and supervised fine-tuning.

    result = train(load_config("shakespeare_char_cpu"))

One iteration = one optimizer step:
    lr from the schedule -> for each micro-step: batch, forward (autocast), loss / accumulation, backward
    (DDP syncs gradients only on the last micro-step) -> unscale (fp16) -> clip -> health check -> step.

Around it: evaluation every `eval_interval` (train/val loss, val bits-per-byte, best.pt, early stopping),
`latest.pt` every `checkpoint_interval`, SIGINT/SIGTERM -> checkpoint and a clean exit, and exact resume:
a checkpoint holds everything that decides what happens next (weights, optimizer, schedule position,
every RNG, the data sampler's state, the scaler, counters), so N + N iterations equal 2N bit for bit.
Pretraining and SFT differ only in the `BatchSource` (what the batches and loss masks are), not here.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import random
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diyllm.atomic import atomic_write
from diyllm.errors import UserError
from diyllm.model import DIYConfig, DIYForCausalLM
from diyllm.training.checkpoint import (
    read_checkpoint,
    read_init_checkpoint,
    save_checkpoint,
    tokenizer_from_text,
    unwrap_model,
)
from diyllm.training.config import TrainConfig
from diyllm.training.data_source import BatchSource, make_source
from diyllm.training.device import autocast_context, resolve_device, resolve_dtype
from diyllm.training.distributed import (
    all_reduce_mean,
    any_rank,
    cleanup_distributed,
    gather_objects,
    init_distributed,
)
from diyllm.training.health import HealthMonitor
from diyllm.training.metrics import MetricsLogger, format_eval_line, format_train_line, peak_flops
from diyllm.training.optim import build_optimizer, clip_grad_norm_
from diyllm.training.schedule import cosine_lr

# DIYConfig fields that decide the weights' shapes/meaning: a checkpoint must agree on all of them.
SHAPE_FIELDS = ("vocab_size", "context_length", "d_model", "num_layers", "num_heads", "num_kv_heads", "d_ff",
                "tie_embeddings", "rope_theta", "norm_eps")


@dataclass
class TrainResult:
    out_dir: str
    iterations: int
    tokens_seen: int
    best_val_loss: float
    final_train_loss: float
    final_val_loss: float
    wall_time_s: float
    num_params: int
    stopped_early: bool
    stop_reason: str = ""  # "" (ran to max_iters) | "early_stopping" | "signal"
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss/gradient


def train(cfg: TrainConfig, source: BatchSource | None = None, model: nn.Module | None = None) -> TrainResult:
    """Run (or resume) training as `cfg` says; return a summary. Files go to cfg.out_dir.

    source: where batches come from (default: make_source(cfg), chosen by cfg.data_format).
    model: a ready model to train (default: a DIYForCausalLM built from cfg's shape fields, or from the
    checkpoint's shape when init_from is a path). With init_from=PATH its weights are loaded into `model`.
    """
    return Trainer(cfg, source, model).run()


# ---- small pure helpers -----------------------------------------------------------------------------


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate for optimizer step number `step + 1` (so the first step's lr is not 0 and the last
    step of the decay reaches min_lr). Warmup applies with or without decay."""
    it = step + 1
    if not cfg.decay_lr:
        return cfg.learning_rate * min(1.0, it / cfg.warmup_iters) if cfg.warmup_iters else cfg.learning_rate
    return cosine_lr(it, cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, cfg.effective_lr_decay_iters)


def model_config_from(cfg: TrainConfig, vocab_size: int) -> DIYConfig:
    try:
        return DIYConfig(vocab_size=vocab_size, context_length=cfg.context_length, d_model=cfg.d_model,
                         num_layers=cfg.num_layers, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                         d_ff=cfg.d_ff, rope_theta=cfg.rope_theta, norm_eps=cfg.norm_eps, dropout=cfg.dropout,
                         tie_embeddings=cfg.tie_embeddings, attn_impl=cfg.attn_impl,
                         fused_projections=cfg.fused_projections, init_std=cfg.init_std,
                         qk_norm=cfg.qk_norm, mlp=cfg.mlp, zero_init_proj=cfg.zero_init_proj,  # issue 19
                         logit_softcap=cfg.logit_softcap)
    except ValueError as exc:
        raise UserError(str(exc)) from exc


def optimizer_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (embeddings, projections) but not vectors (norm gains): shrinking a gain towards 0
    only fights the normalisation. A tied matrix appears once (parameters() de-duplicates)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def shape_differences(saved: dict, current: DIYConfig) -> list[str]:
    now = current.to_dict()
    return [f"{k}: checkpoint {saved.get(k)!r} vs now {now[k]!r}" for k in SHAPE_FIELDS if saved.get(k) != now[k]]


def tokenizer_differences(saved: Any, current: Any) -> list[str]:
    """What makes two tokenizers incompatible for the same weights: size, special tokens, kind."""
    if saved is None or current is None:
        return []
    diffs = []
    if saved.vocab_size != current.vocab_size:
        diffs.append(f"tokenizer vocab_size: checkpoint {saved.vocab_size} vs data {current.vocab_size}")
    specials = [list(getattr(t, "special_tokens", None) or []) for t in (saved, current)]
    if specials[0] != specials[1]:
        diffs.append(f"special tokens: checkpoint {specials[0]} vs data {specials[1]}")
    kinds = [getattr(t, "kind", type(t).__name__) for t in (saved, current)]
    if kinds[0] != kinds[1]:
        diffs.append(f"tokenizer kind: checkpoint {kinds[0]} vs data {kinds[1]}")
    if not diffs and hasattr(saved, "token_bytes"):  # same size: do the ids mean the same strings?
        for i in range(saved.vocab_size):
            a, b = saved.token_bytes(i), current.token_bytes(i)
            if a != b:
                diffs.append(f"tokenizer vocabularies differ (first at id {i}: checkpoint {a!r} vs data {b!r})")
                break
    return diffs


def tokenizer_text(source: Any) -> str | None:
    """The tokenizer's JSON file text, embedded in checkpoints so they are self-contained."""
    path = getattr(source, "tokenizer_path", None)
    if path and os.path.exists(path):
        return Path(path).read_text(encoding="utf-8")
    tok = getattr(source, "tokenizer", None)
    if tok is None or not hasattr(tok, "save"):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "tokenizer.json")
        tok.save(out)
        return Path(out).read_text(encoding="utf-8")


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = np_state["state"]["key"].tolist()  # weights_only loading takes no arrays
    state = {"python": random.getstate(), "numpy": np_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_to_tuple(state["python"]))
    np_state = copy.deepcopy(state["numpy"])
    np_state["state"]["key"] = np.asarray(np_state["state"]["key"], dtype=np.uint32)
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):  # fewer GPUs than when saved: keep fresh ones
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _to_tuple(x: Any) -> Any:
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


class StopSignal:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, checkpoints, and exits. A second SIGINT
    interrupts at once (the last complete checkpoint stays valid: files are replaced atomically)."""

    def __init__(self, log):
        self.requested = False
        self.log = log
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.log(f"\n{signal.Signals(signum).name} received: finishing this step, saving a checkpoint, then "
                 "exiting (Ctrl-C again to abort now)")

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ---- the trainer --------------------------------------------------------------------------------------


class Trainer:
    def __init__(self, cfg: TrainConfig, source: BatchSource | None = None, model: nn.Module | None = None):
        self.cfg = cfg.validate()
        self.source = source
        self.given_model = model
        self.bar = None

    # -- output helpers --
    def log(self, msg: str) -> None:
        if not self.dist.is_main:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def warn(self, msg: str) -> None:
        self.log(f"warning: {msg}")

    # -- entry point --
    def run(self) -> TrainResult:
        try:
            self.setup()
            with StopSignal(self.log) as self.stop_signal:
                return self._loop()
        finally:
            self.close()

    def setup(self) -> Trainer:
        """Join DDP (if launched by torchrun), build data/model/optimizer, restore a checkpoint."""
        self.dist, rank_device = init_distributed(self.cfg.device)
        self._setup(rank_device)
        return self

    def close(self) -> None:
        if getattr(self, "metrics", None) is not None:
            self.metrics.close()
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if getattr(self, "dist", None) is not None:
            cleanup_distributed(self.dist)

    # -- setup --
    def _setup(self, rank_device: torch.device | None) -> None:
        cfg, dist = self.cfg, self.dist
        self.device = rank_device or resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        if cfg.gradient_accumulation_steps % dist.world_size:
            raise UserError(
                f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} is not divisible by the "
                f"{dist.world_size} processes; the global batch is split across ranks, so use a multiple of "
                f"{dist.world_size}"
            )
        self.accum = cfg.gradient_accumulation_steps // dist.world_size
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.set_float32_matmul_precision("high")
        random.seed(cfg.seed + dist.rank)
        np.random.seed(cfg.seed + dist.rank)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank

        # data
        if self.source is None:
            self.source = make_source(cfg, dist.rank, dist.world_size)
        elif dist.enabled and hasattr(self.source, "set_rank"):
            self.source.set_rank(dist.rank, dist.world_size)
        data_vocab = int(self.source.vocab_size)
        if cfg.vocab_size and cfg.vocab_size < data_vocab:
            raise UserError(f"vocab_size={cfg.vocab_size} is smaller than the data's vocabulary ({data_vocab}); "
                            "set vocab_size=0 to take it from the data")
        src_ctx = int(getattr(self.source, "context_length", cfg.context_length))
        if src_ctx > cfg.context_length:
            raise UserError(f"the data source makes sequences of {src_ctx} tokens but context_length="
                            f"{cfg.context_length}; they must fit the model's context")

        # where we start from
        self.out_dir = Path(cfg.out_dir)
        self.resume_ckpt: dict | None = None
        init_ckpt: dict | None = None
        if cfg.init_from == "resume":
            path = self.out_dir / "latest.pt"
            if not path.exists():
                raise UserError(f"init_from=resume but {path} does not exist; nothing to resume "
                                "(use init_from=scratch to start a new run)")
            self.resume_ckpt = read_checkpoint(path)
            self.ckpt_path = path
        elif cfg.init_from != "scratch":
            init_ckpt, where = read_init_checkpoint(cfg.init_from)  # a .pt, a run folder, or hf:DIR
            self.ckpt_path = Path(where)

        # model
        if self.given_model is not None:
            self.model = self.given_model
            self.model_config = getattr(unwrap_model(self.model), "config", None) or model_config_from(
                cfg, cfg.vocab_size or data_vocab)
        else:
            if init_ckpt is not None:
                self.model_config = self._config_from_checkpoint(init_ckpt)
            else:
                self.model_config = model_config_from(cfg, cfg.vocab_size or data_vocab)
            self.model = DIYForCausalLM(self.model_config)
            cfg = self.cfg  # init_from=PATH may have taken the shape fields from the checkpoint
        if self.model_config.vocab_size < data_vocab:
            raise UserError(f"the model's vocab_size {self.model_config.vocab_size} is smaller than the data's "
                            f"{data_vocab}: the data was tokenized with a different tokenizer")
        for ckpt, path in ((self.resume_ckpt, "latest.pt"), (init_ckpt, cfg.init_from)):
            if ckpt is not None:
                self._check_compatible(ckpt, str(path))
                unwrap_model(self.model).load_state_dict(ckpt["model"])
        self.model.to(self.device)
        self.num_params = sum(p.numel() for p in unwrap_model(self.model).parameters())
        if dist.rank:
            torch.manual_seed(cfg.seed + dist.rank)  # but different dropout masks per rank

        # optimizer, scaler
        self.optimizer = build_optimizer(cfg, unwrap_model(self.model),  # AdamW or Muon (cfg.optimizer)
                                         optimizer_groups(unwrap_model(self.model), cfg.weight_decay))
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        fp16 = self.dtype == torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=fp16) if fp16 else None
        self.health = HealthMonitor(cfg.max_nonfinite_steps, cfg.grad_spike_factor, fp16=fp16)

        # the state a resume continues from
        self.step = 0
        self.tokens_seen = 0
        self.best_val_loss = math.inf
        self.evals_since_best = 0
        self.last_eval_iter = -1
        self.elapsed_before = 0.0
        self.last_eval: dict[str, Any] = {}
        if self.resume_ckpt is not None:
            self._restore_training_state(self.resume_ckpt)

        # compile, DDP
        self.compile_pending = False
        self.compiled = None
        if cfg.compile:
            self.compiled = self._try_compile(unwrap_model(self.model))
            self.compile_pending = self.compiled is not None
        self._wrap(self.compiled if self.compiled is not None else unwrap_model(self.model))

        # files
        self.tokenizer_json = tokenizer_text(self.source)
        self.bytes_per_token = getattr(self.source, "bytes_per_token", None)
        self.tokens_per_iter = cfg.batch_size * self.accum * src_ctx * dist.world_size
        if dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if cfg.init_from == "scratch" and (self.out_dir / "latest.pt").exists():
                self.warn(f"{self.out_dir} holds a previous run; its checkpoints will be overwritten "
                          "(use --init_from=resume to continue it instead)")
            with atomic_write(self.out_dir / "config.json", "w", encoding="utf-8") as f:
                f.write(cfg.to_json() + "\n")
            if self.tokenizer_json:
                with atomic_write(self.out_dir / "tokenizer.json", "w", encoding="utf-8") as f:
                    f.write(self.tokenizer_json)
        self.run_name = cfg.run_name or self.out_dir.resolve().name
        self.metrics = MetricsLogger(self.out_dir, dist.is_main, cfg.tensorboard, cfg.wandb_project, self.run_name,
                                     cfg.to_dict(), resume_iter=self.step if self.resume_ckpt else None)
        self.peak = peak_flops(self.device, cfg.peak_flops)
        self.flops_per_token = (unwrap_model(self.model).flops_per_token(src_ctx)
                                if hasattr(unwrap_model(self.model), "flops_per_token") else None)
        # Restore the RNGs last: building/moving/compiling the model above may draw random numbers.
        if self.resume_ckpt is not None:
            self._restore_rng(self.resume_ckpt)

    def _config_from_checkpoint(self, ckpt: dict) -> DIYConfig:
        """init_from=PATH: the weights decide the shape; the config's training-time knobs still apply."""
        saved = ckpt.get("model_config")
        if not isinstance(saved, dict):
            raise UserError(f"{self.cfg.init_from} has no model_config; cannot rebuild its model")
        mc = DIYConfig.from_dict({**saved, "dropout": self.cfg.dropout, "attn_impl": self.cfg.attn_impl,
                                  "fused_projections": self.cfg.fused_projections})
        changed = {k: getattr(mc, k) for k in SHAPE_FIELDS if k in TrainConfig.__dataclass_fields__
                   and getattr(self.cfg, k) not in (getattr(mc, k), None) and not (k == "vocab_size"
                                                                                  and self.cfg.vocab_size == 0)}
        if changed:
            self.log(f"note: model shape taken from {self.cfg.init_from}: {changed}")
        self.cfg = dataclasses.replace(self.cfg, **{k: getattr(mc, k) for k in SHAPE_FIELDS
                                                    if k in TrainConfig.__dataclass_fields__})
        return mc

    def _check_compatible(self, ckpt: dict, path: str) -> None:
        diffs = []
        if isinstance(ckpt.get("model_config"), dict):
            diffs += shape_differences(ckpt["model_config"], self.model_config)
        saved_tok = tokenizer_from_text(ckpt.get("tokenizer"), path) if ckpt.get("tokenizer") else None
        diffs += tokenizer_differences(saved_tok, getattr(self.source, "tokenizer", None))
        if diffs:
            raise UserError(f"checkpoint {path} does not fit this run:\n  - " + "\n  - ".join(diffs)
                            + "\n(train a new model with init_from=scratch, or use matching settings/data)")

    def _restore_training_state(self, ckpt: dict) -> None:
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step = int(ckpt["iteration"])
        self.best_val_loss = float(ckpt.get("best_val_loss", math.inf))
        t = ckpt.get("trainer", {})
        self.tokens_seen = int(t.get("tokens_seen", 0))
        self.evals_since_best = int(t.get("evals_since_best", 0))
        self.last_eval_iter = int(t.get("last_eval_iter", -1))
        self.elapsed_before = float(t.get("elapsed", 0.0))
        self.last_eval = dict(t.get("last_eval", {}))
        self.health.load_state_dict(t.get("health", {}))
        rank_states = ckpt.get("rank_states")
        if self.dist.enabled and rank_states and len(rank_states) == self.dist.world_size:
            self.source.load_state_dict(rank_states[self.dist.rank]["data_state"])
        elif self.dist.enabled:
            self.warn("the checkpoint was written with a different number of processes: data order and RNG "
                      "streams start fresh (training continues, but not bit-exactly)")
        elif ckpt.get("data_state") is not None:
            self.source.load_state_dict(ckpt["data_state"])

    def _restore_rng(self, ckpt: dict) -> None:
        rank_states = ckpt.get("rank_states")
        if self.dist.enabled:
            if rank_states and len(rank_states) == self.dist.world_size:
                set_rng_state(rank_states[self.dist.rank]["rng"])
        elif ckpt.get("rng"):
            set_rng_state(ckpt["rng"])

    def _try_compile(self, model: nn.Module) -> nn.Module | None:
        try:
            return torch.compile(model)
        except Exception as exc:  # noqa: BLE001 - any failure means: run eager
            self._compile_failed(exc)
            return None

    def _compile_failed(self, exc: BaseException) -> None:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        self.warn(f"torch.compile is not usable here ({type(exc).__name__}: {first[:200]}); "
                  "continuing in eager mode (same results, slower). Set compile=false to silence this.")

    def _wrap(self, module: nn.Module) -> None:
        """The module the hot loop calls: compiled or eager, inside DDP when distributed."""
        self.eval_model = module
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DDP(module, device_ids=ids)
        else:
            self.train_model = module

    # -- one optimizer step --
    def _micro_step(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None, sync: bool) -> torch.Tensor:
        no_sync = self.train_model.no_sync() if (self.dist.enabled and not sync) else contextlib.nullcontext()
        with no_sync:
            with autocast_context(self.device, self.dtype):
                loss = self.train_model(x, targets=y, loss_mask=mask).loss
            scaled = loss / self.accum
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        return loss.detach()

    def forward_backward(self) -> torch.Tensor:
        """All micro-steps of one optimizer step: leaves the (DDP-averaged) gradients of the mean loss over
        the global batch in .grad and returns this rank's summed micro-step losses (a tensor, no sync)."""
        cfg = self.cfg
        loss_sum = None
        for micro in range(self.accum):
            x, y, mask = self.source.get_batch("train", cfg.batch_size, self.device)
            sync = micro == self.accum - 1
            if self.compile_pending:
                try:
                    loss = self._micro_step(x, y, mask, sync)
                    self.compile_pending = False
                except Exception as exc:  # noqa: BLE001 - compile errors surface at the first call
                    if isinstance(exc, UserError):
                        raise
                    self._compile_failed(exc)
                    self.optimizer.zero_grad(set_to_none=True)
                    self.compile_pending, self.compiled = False, None
                    self._wrap(unwrap_model(self.model))
                    loss = self._micro_step(x, y, mask, sync)
            else:
                loss = self._micro_step(x, y, mask, sync)
            loss_sum = loss if loss_sum is None else loss_sum + loss
        return loss_sum

    def _train_step(self) -> tuple[float, float, bool, str | None]:
        """One optimizer step; returns (loss, grad_norm, stepped, warning)."""
        cfg = self.cfg
        lr = lr_at(cfg, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = self.forward_backward()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if cfg.grad_clip > 0:
            grad_norm = clip_grad_norm_(self.params, cfg.grad_clip)
        else:
            grads = [p.grad for p in self.params if p.grad is not None]
            grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        # The one host sync per step: the health check needs both numbers.
        loss_value, norm_value = torch.stack([loss_sum.float() / self.accum, grad_norm.float().to(loss_sum.device)
                                              ]).tolist()
        take, warning = self.health.check(self.step + 1, loss_value, norm_value)
        if take:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
            else:
                self.optimizer.step()
        if self.scaler is not None:
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += self.tokens_per_iter
        return loss_value, norm_value, take, warning

    # -- evaluation --
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean train and val loss over eval_iters batches each (averaged over ranks), plus val bits/byte.

        The train-split batches are drawn and then the sampler is rewound, so evaluating never changes the
        training batch sequence; the val split has its own stream (saved in checkpoints)."""
        model = self.eval_model
        was_training = model.training
        model.eval()
        out = {}
        snapshot = copy.deepcopy(self.source.state_dict())
        for split in ("train", "val"):
            losses = torch.zeros(self.cfg.eval_iters, device=self.device)
            for k in range(self.cfg.eval_iters):
                x, y, mask = self.source.get_batch(split, self.cfg.batch_size, self.device)
                with autocast_context(self.device, self.dtype):
                    losses[k] = model(x, targets=y, loss_mask=mask).loss.float()
            if split == "train":
                self.source.load_state_dict(snapshot)
            out[split] = all_reduce_mean(losses.mean(), self.dist).item()
        model.train(was_training)
        bpb = out["val"] / math.log(2) / self.bytes_per_token if self.bytes_per_token else None
        return {"train_loss": out["train"], "val_loss": out["val"], "val_bpb": bpb}

    # -- checkpoints --
    def _checkpoint_state(self) -> dict[str, Any]:
        rank_state = {"rng": rng_state(), "data_state": self.source.state_dict()}
        all_ranks = gather_objects(rank_state, self.dist)  # a collective: every rank calls it
        return {
            "model_config": self.model_config.to_dict(),
            "train_config": self.cfg.to_dict(),
            "tokenizer": self.tokenizer_json,
            "best_val_loss": self.best_val_loss,
            "rng": rank_state["rng"],
            "data_state": rank_state["data_state"],
            "rank_states": all_ranks if self.dist.enabled else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "trainer": {
                "tokens_seen": self.tokens_seen, "evals_since_best": self.evals_since_best,
                "last_eval_iter": self.last_eval_iter, "elapsed": self.elapsed(),
                "last_eval": self.last_eval, "health": self.health.state_dict(),
                "world_size": self.dist.world_size,
            },
        }

    def save(self, name: str) -> None:
        extra = self._checkpoint_state()
        if self.dist.is_main:
            save_checkpoint(self.model, self.optimizer, self.step, self.out_dir / name, **extra)

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t0

    # -- the loop --
    def _loop(self) -> TrainResult:
        cfg = self.cfg
        self.t0 = time.perf_counter()
        start_step = self.step
        self._print_header(start_step)
        if self.resume_ckpt is not None:
            self.metrics.log({"event": "resume", "iter": self.step, "tokens": self.tokens_seen,
                              "time": self.elapsed()})
        else:
            self.metrics.log({"event": "start", "config": cfg.to_dict(), "num_params": self.num_params,
                              "run_name": self.run_name, "model_config": self.model_config.to_dict(),
                              "world_size": self.dist.world_size, "device": str(self.device),
                              "dtype": str(self.dtype).replace("torch.", ""), "tokens_per_iter": self.tokens_per_iter,
                              "bytes_per_token": self.bytes_per_token})
        if cfg.progress and self.dist.is_main:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=cfg.max_iters, initial=self.step, desc="train", unit="it", dynamic_ncols=True,
                            file=sys.stderr)
        self.train_model.train()
        stop_reason = ""
        last_loss = math.nan
        window_time, window_steps = 0.0, 0
        while True:
            if any_rank(self.stop_signal.requested, self.dist, self.device):
                stop_reason = "signal"
            step = self.step
            eval_due = (cfg.eval_interval and step % cfg.eval_interval == 0) or step >= cfg.max_iters
            if eval_due and step != self.last_eval_iter and not stop_reason:
                stop_reason = self._eval_and_track(step)
            done = step >= cfg.max_iters or bool(stop_reason)
            if done or (cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0 and step != start_step):
                self.save("latest.pt")
            if done:
                break
            t = time.perf_counter()
            loss, norm, took, warning = self._train_step()
            window_time += time.perf_counter() - t
            window_steps += 1
            last_loss = loss
            if warning and self.dist.is_main:
                self.warn(warning)
            if not took:
                self.metrics.log({"event": "nonfinite", "iter": self.step, "tokens": self.tokens_seen,
                                  "time": self.elapsed(), "loss": loss, "grad_norm": norm,
                                  "skipped_total": self.health.total_nonfinite})
            if self.step == 1 and self.resume_ckpt is None:
                self.log(f"initial loss {loss:.4f} (a uniform guess over {self.model_config.vocab_size} tokens "
                         f"scores ln(vocab) = {math.log(self.model_config.vocab_size):.4f})")
            if self.step % cfg.log_interval == 0 or self.step == cfg.max_iters:
                self._log_train(loss, norm, window_time, window_steps)
                window_time, window_steps = 0.0, 0
            if self.bar is not None:
                self.bar.update(1)
                if self.step % cfg.log_interval == 0:
                    self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        result = TrainResult(
            out_dir=str(self.out_dir), iterations=self.step, tokens_seen=self.tokens_seen,
            best_val_loss=self.best_val_loss, final_train_loss=self.last_eval.get("train_loss", last_loss),
            final_val_loss=self.last_eval.get("val_loss", math.nan), wall_time_s=self.elapsed(),
            num_params=self.num_params, stopped_early=bool(stop_reason), stop_reason=stop_reason,
            skipped_steps=self.health.total_nonfinite,
        )
        self.metrics.log({"event": "end", "iter": self.step, "tokens": self.tokens_seen, "time": self.elapsed(),
                          **dataclasses.asdict(result)})
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self._print_footer(result)
        return result

    def _eval_and_track(self, step: int) -> str:
        metrics = self.evaluate()
        self.last_eval_iter = step
        self.last_eval = metrics
        self.metrics.log({"event": "eval", "iter": step, "tokens": self.tokens_seen, "time": self.elapsed(),
                          **metrics})
        self.log(format_eval_line({"iter": step, **metrics}))
        if metrics["val_loss"] < self.best_val_loss:
            self.best_val_loss = metrics["val_loss"]
            self.evals_since_best = 0
            self.save("best.pt")
        else:
            self.evals_since_best += 1
            if self.cfg.patience and self.evals_since_best >= self.cfg.patience:
                self.log(f"early stopping: val loss has not improved for {self.evals_since_best} evaluations "
                         f"(best {self.best_val_loss:.4f})")
                return "early_stopping"
        return ""

    def _log_train(self, loss: float, norm: float, window_time: float, window_steps: int) -> None:
        ms = 1000 * window_time / max(window_steps, 1)
        tok_s = self.tokens_per_iter * window_steps / window_time if window_time > 0 else 0.0
        rec = {"event": "train", "iter": self.step, "tokens": self.tokens_seen, "time": self.elapsed(),
               "loss": loss, "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": norm,
               "ms_per_iter": ms, "tokens_per_sec": tok_s}
        if self.peak and self.flops_per_token:
            rec["mfu"] = self.flops_per_token * tok_s / (self.peak * self.dist.world_size)
        self.metrics.log(rec)
        self.log(format_train_line(rec, self.cfg.max_iters))

    def _print_header(self, start_step: int) -> None:
        cfg = self.cfg
        if not self.dist.is_main:
            return
        m = unwrap_model(self.model)
        non_emb = m.num_parameters(include_embeddings=False) if hasattr(m, "num_parameters") else self.num_params
        lines = [
            f"diyllm train: run {self.run_name!r} -> {self.out_dir}",
            "config (* = changed from the defaults):",
            cfg.pretty(),
            f"model: {self.num_params / 1e6:.2f}M parameters ({non_emb / 1e6:.2f}M without the input embedding), "
            f"vocab {self.model_config.vocab_size}, context {self.model_config.context_length}",
            f"device {self.device}, dtype {str(self.dtype).replace('torch.', '')}, compile "
            f"{'on' if self.compiled is not None else 'off'}, processes {self.dist.world_size}",
            f"batch: {cfg.batch_size} seqs x {self.accum} micro-steps x {self.dist.world_size} processes = "
            f"{self.tokens_per_iter:,} tokens/iter; {cfg.max_iters} iters = {self.tokens_per_iter * cfg.max_iters:,}"
            " tokens",
        ]
        if start_step:
            lines.append(f"resuming from {self.ckpt_path} at iteration {start_step}")
        elif cfg.init_from not in ("scratch", "resume"):
            lines.append(f"initialised from {cfg.init_from} (fresh optimizer)")
        self.log("\n".join(lines))

    def _print_footer(self, r: TrainResult) -> None:
        how = {"": "done", "signal": "stopped by signal", "early_stopping": "stopped early"}[r.stop_reason]
        self.log(f"{how}: {r.iterations} iterations, {r.tokens_seen:,} tokens in {r.wall_time_s:.1f}s; "
                 f"best val loss {r.best_val_loss:.4f}; checkpoints in {r.out_dir}"
                 + (f"; {r.skipped_steps} non-finite steps skipped" if r.skipped_steps else ""))


__all__ = ["train", "TrainResult", "Trainer", "lr_at", "optimizer_groups", "model_config_from"]
