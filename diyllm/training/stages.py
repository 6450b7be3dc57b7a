"""The trainer's setup, one method per stage, in the order `Trainer.setup` runs them:

    runtime   processes (torchrun), device, dtype, threads, deterministic mode, seeds
    data      the batch source, checked against the config
    model     built from the config, or from init_from's shape and weights; moved to the device
    wrap      torch.compile (if asked) and the parallel wrapper: the module the hot loop calls
    optimizer AdamW over the (possibly wrapped) parameters, the fp16 GradScaler, the health monitor
    restore   init_from=resume: weights, optimizer, counters, data position, RNGs (last)
    outputs   the run folder, metrics, and the evaluation / checkpoint / early-stopping parts

Each stage reads what the earlier ones set on the trainer and sets its own attributes; nothing later
changes the config (only the model stage may, explicitly, adopt a checkpoint's shape).
"""

from __future__ import annotations

from pathlib import Path

import torch

from diyllm.atomic import atomic_write
from diyllm.checkpoints import unwrap_model
from diyllm.errors import UserError
from diyllm.loading import read_model_reference
from diyllm.model import DIYForCausalLM
from diyllm.sharded_checkpoints import ShardedCheckpointer
from diyllm.training import build, resume
from diyllm.training.checkpointer import SingleFileCheckpointer
from diyllm.training.components import CheckpointSchedule, EarlyStopping, Evaluator, FinalSplitEval
from diyllm.training.data_source import make_source
from diyllm.training.device import resolve_device, resolve_dtype
from diyllm.training.distributed import init_distributed
from diyllm.training.fsdp import FullyShardedParallel, enable_activation_checkpointing
from diyllm.training.health import HealthMonitor
from diyllm.training.loop_state import LoopState
from diyllm.training.memory_plan import check_memory
from diyllm.training.metrics import MetricsLogger, peak_flops
from diyllm.training.parallel import default_parallel
from diyllm.training.schedule import check_resume_schedule


class SetupStages:
    """Mixed into Trainer: see the module docstring. `self` is the Trainer."""

    def _setup_runtime(self) -> None:
        cfg = self.cfg
        self.dist, rank_device = init_distributed(cfg.device)
        self.device = rank_device or resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        if cfg.gradient_accumulation_steps % self.dist.world_size:
            raise UserError(
                f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} is not divisible by the "
                f"{self.dist.world_size} processes; the global batch is split across ranks, so use a multiple "
                f"of {self.dist.world_size}")
        self.accum = cfg.gradient_accumulation_steps // self.dist.world_size  # micro-steps on this rank
        self._deterministic_before = torch.are_deterministic_algorithms_enabled()  # close() puts it back
        build.configure_numerics(cfg, self.device)
        build.seed_everything(cfg.seed, self.dist.rank)

    def _setup_data(self) -> None:
        cfg, dist = self.cfg, self.dist
        if self.source is None:
            self.source = make_source(cfg, dist.rank, dist.world_size)
        elif dist.enabled and hasattr(self.source, "set_rank"):
            self.source.set_rank(dist.rank, dist.world_size)
        self.data_vocab = int(self.source.vocab_size)
        if cfg.vocab_size and cfg.vocab_size < self.data_vocab:
            raise UserError(f"vocab_size={cfg.vocab_size} is smaller than the data's vocabulary "
                            f"({self.data_vocab}); set vocab_size=0 to take it from the data")
        self.seq_len = int(getattr(self.source, "context_length", cfg.context_length))
        if self.seq_len > cfg.context_length:
            raise UserError(f"the data source makes sequences of {self.seq_len} tokens but context_length="
                            f"{cfg.context_length}; they must fit the model's context")
        self.tokens_per_iter = cfg.batch_size * self.accum * self.seq_len * dist.world_size

    def _setup_model(self) -> None:
        cfg = self.cfg
        init_ckpt = None
        # chosen here, not in the wrap stage: a sharding wrapper builds the model itself (meta device)
        if self.parallel is None and cfg.parallelism == "fsdp" and self.dist.enabled:
            self.parallel = FullyShardedParallel.from_config(cfg, self.device, self.dist.world_size, self.dtype)
        self.parallel = self.parallel or default_parallel(self.dist, self.device)
        build_sharded = getattr(self.parallel, "build_model", None)
        if cfg.init_from not in ("scratch", "resume"):
            init_ckpt, where = read_model_reference(cfg.init_from)  # a .pt, a run folder, or hf:DIR
            self.ckpt_path = Path(where)
            self.carried_tokenizer = init_ckpt.get("tokenizer")
        if self.given_model is not None:
            self.model = self.given_model
            self.model_config = getattr(unwrap_model(self.model), "config", None) or build.model_config_from(
                cfg, cfg.vocab_size or self.data_vocab)
        else:
            if init_ckpt is not None:  # the weights decide the shape: the config adopts it, visibly
                self.cfg, self.model_config = build.checkpoint_shape(cfg, init_ckpt, self.log)
            else:
                self.model_config = build.model_config_from(cfg, cfg.vocab_size or self.data_vocab)
            self.memory_report = check_memory(self.cfg, self.model_config, self.dist.world_size, self.device,
                                              self.dtype)
            if build_sharded is not None:  # each rank materialises only its own shards
                self.model = build_sharded(self.model_config)
            else:
                self.model = DIYForCausalLM(self.model_config)
        if self.model_config.vocab_size < self.data_vocab:
            raise UserError(f"the model's vocab_size {self.model_config.vocab_size} is smaller than the data's "
                            f"{self.data_vocab}: the data was tokenized with a different tokenizer")
        if init_ckpt is not None:
            resume.check_compatible(init_ckpt, self.model_config, getattr(self.source, "tokenizer", None),
                                    str(cfg.init_from))
            if getattr(self.parallel, "load_full_state_dict", None) is not None and self.given_model is None:
                self.parallel.load_full_state_dict(self.model, init_ckpt["model"])
            else:
                unwrap_model(self.model).load_state_dict(init_ckpt["model"])
        if build_sharded is None or self.given_model is not None:
            self.model.to(self.device)
            if cfg.activation_checkpointing and build_sharded is None:
                enable_activation_checkpointing(unwrap_model(self.model))
        self.num_params = sum(p.numel() for p in unwrap_model(self.model).parameters())
        build.seed_dropout(self.cfg.seed, self.dist.rank)
        self.objective.prepare(unwrap_model(self.model), self.device)
        if hasattr(self.source, "attach_model"):  # e.g. an RL source generating rollouts with this model
            self.source.attach_model(unwrap_model(self.model))

    def _setup_wrap(self) -> None:
        plain = unwrap_model(self.model)
        self.compiled = build.try_compile(plain, self.warn) if self.cfg.compile else None
        # compile errors mostly surface at the first call: that micro-step falls back to eager itself
        self.micro_step = self._first_compiled_micro_step if self.compiled is not None else self._micro_step
        self.eval_model = self.compiled if self.compiled is not None else plain
        self.parallel = self.parallel or default_parallel(self.dist, self.device)
        self.train_model = self.parallel.wrap(self.eval_model)

    def _setup_optimizer(self) -> None:
        self.optimizer = build.build_optimizer(self.cfg, unwrap_model(self.model))
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        fp16 = self.dtype == torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=True) if fp16 else None
        self.health = HealthMonitor(self.cfg.max_nonfinite_steps, self.cfg.grad_spike_factor, fp16=fp16)

    def _setup_restore(self) -> None:
        cfg = self.cfg
        self.out_dir = Path(cfg.out_dir)
        if self.checkpointer is None:  # fsdp: sharded folders latest/ and best/, also on one process
            sharded = cfg.parallelism == "fsdp"
            self.checkpointer = ShardedCheckpointer(self.out_dir) if sharded else SingleFileCheckpointer(
                self.out_dir, self.dist, cfg.keep_checkpoints)
        self.resumed = cfg.init_from == "resume"
        if not self.resumed:
            self.state = LoopState()
            return
        # latest.pt, or (with a warning) the newest good previous*.pt when it is missing or damaged
        ckpt, self.ckpt_path = self.checkpointer.load_for_resume(self.warn)
        self.carried_tokenizer = ckpt.get("tokenizer")
        check_resume_schedule(cfg, ckpt, self.ckpt_path, self.warn)
        resume.check_compatible(ckpt, self.model_config, getattr(self.source, "tokenizer", None),
                                str(self.ckpt_path))
        self.checkpointer.restore(ckpt, self.model, self.optimizer)
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.state = LoopState.from_checkpoint(ckpt)
        self.health.load_state_dict((ckpt.get("trainer") or {}).get("health", {}))
        self.objective.load_state_dict(ckpt.get("objective") or {})
        resume.restore_data_position(ckpt, self.source, self.dist, self.warn)
        self._resume_ckpt = ckpt  # RNGs are restored at the very end of setup (_setup_outputs)

    def _build_final_eval(self) -> FinalSplitEval:
        """final_val_tokens: the end-of-run score over the val split (a prepared dataset, next-token loss)."""
        from diyllm.training.objective import NextTokenLoss

        val = getattr(self.source, "splits", {}).get("val")
        if val is None:
            raise UserError("final_val_tokens scores the val split of a prepared dataset (data_format bin); this "
                            f"run reads {type(self.source).__name__} batches, so set final_val_tokens = 0 or "
                            "train on a folder made by `diyllm prepare`")
        if type(self.objective) is not NextTokenLoss:
            raise UserError(f"final_val_tokens scores the next-token loss; this run trains with "
                            f"{type(self.objective).__name__}, so set final_val_tokens = 0")
        final = FinalSplitEval(val, self.seq_len, self.cfg.final_val_tokens, self.cfg.batch_size, self.objective,
                               self.device, self.dtype, self.dist, getattr(self.source, "tokenizer", None),
                               getattr(self.source, "meta", {}))
        if final.num_tokens == 0:
            raise UserError(f"final_val_tokens={self.cfg.final_val_tokens} is less than one window of "
                            f"context_length={self.seq_len} tokens; set it to at least {self.seq_len}, or 0 for off")
        return final

    def _setup_outputs(self) -> None:
        cfg, dist = self.cfg, self.dist
        # a data folder without tokenizer.json must not strip the tokenizer from the new checkpoints
        self.tokenizer_json = resume.tokenizer_text(self.source) or getattr(self, "carried_tokenizer", None)
        self.bytes_per_token = getattr(self.source, "bytes_per_token", None)
        if dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with atomic_write(self.out_dir / "config.json", "w", encoding="utf-8") as f:
                f.write(cfg.to_json() + "\n")
            if self.tokenizer_json:
                with atomic_write(self.out_dir / "tokenizer.json", "w", encoding="utf-8") as f:
                    f.write(self.tokenizer_json)
        self.run_name = cfg.run_name or self.out_dir.resolve().name
        self.metrics = MetricsLogger(self.out_dir, dist.is_main, cfg.tensorboard, cfg.wandb_project, self.run_name,
                                     cfg.to_dict(), resume_iter=self.state.iteration if self.resumed else None)
        self.peak = peak_flops(self.device, cfg.peak_flops)
        plain = unwrap_model(self.model)
        self.flops_per_token = plain.flops_per_token(self.seq_len) if hasattr(plain, "flops_per_token") else None
        self.evaluator = Evaluator(self.source, self.objective, interval=cfg.eval_interval, iters=cfg.eval_iters,
                                   batch_size=cfg.batch_size, max_iters=cfg.max_iters, device=self.device,
                                   dtype=self.dtype, dist=dist, bytes_per_token=self.bytes_per_token,
                                   train=cfg.eval_train)
        self.final_eval = self._build_final_eval() if cfg.final_val_tokens else None
        self.checkpoints = CheckpointSchedule(cfg.checkpoint_interval, self.state.iteration)
        self.early_stopping = EarlyStopping(cfg.patience)
        # issue 18: benchmark evals (eval_tasks), a component that decides when it acts; rank 0 only
        from diyllm.eval.during_training import component_from_config

        self.task_eval = component_from_config(cfg, self.tokenizer_json, self.metrics.log, self.log) \
            if dist.is_main else None
        if self.resumed:  # last: building, moving and compiling the model above may draw random numbers
            resume.restore_rngs(self._resume_ckpt, dist)
            del self._resume_ckpt
