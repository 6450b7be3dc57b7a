"""The one training loop: pretraining, SFT, and (through their objectives) DPO, RL and distillation.

    result = train(load_config("shakespeare_char_cpu"))

One iteration = one optimizer step (`Trainer.train_step`, read it top to bottom):
    lr from the schedule -> micro-steps (batch, forward under autocast, loss / accumulation, backward; DDP
    syncs gradients only on the last) -> unscale (fp16) -> clip -> health check -> step -> log.
Around it (`Trainer.loop`): evaluation, best.pt and early stopping, latest.pt, SIGINT/SIGTERM -> checkpoint
and a clean exit. A checkpoint holds everything that decides what happens next, so N + N iterations equal
2N bit for bit (diyllm.training.resume).

SEAMS: what differs between kinds of training is plugged in, never a second loop:
  source        BatchSource (diyllm.training.data_source): get_batch(split, batch_size, device) -> batch,
                state_dict()/load_state_dict(). The batch is opaque to the loop. A source that generates
                rollouts with the current model defines attach_model(model): called once, before training.
  objective     Objective (diyllm.training.objective): objective(model, batch) -> ObjectiveOutput(loss,
                metrics); prepare(model, device) once (move a frozen reference/teacher model there);
                state_dict()/load_state_dict(); eval_loss(model, batch). Default NextTokenLoss.
  parallel      ParallelWrapper (diyllm.training.parallel): wrap(model), sync_gradients(train_model, sync),
                clip_grad_norm(params, max_norm). Default: DataParallel under torchrun, else SingleProcess.
  checkpointer  Checkpointer (diyllm.training.checkpointer): save(name, model, optimizer, iteration,
                **entries) on every rank, load(name), restore(ckpt, model, optimizer), exists(name).
                Default SingleFileCheckpointer (one .pt per name, written by rank 0).
Setup runs in named stages (`Trainer.setup`): runtime, data, model, wrap, optimizer, restore, outputs.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Any

import torch
from torch import nn

from diyllm.checkpoints import unwrap_model
from diyllm.errors import UserError
from diyllm.training import build, report, resume
from diyllm.training.build import model_config_from, optimizer_groups
from diyllm.training.checkpointer import Checkpointer
from diyllm.training.components import StopSignal
from diyllm.training.config import TrainConfig
from diyllm.training.data_source import BatchSource
from diyllm.training.device import autocast_context
from diyllm.training.distributed import any_rank, cleanup_distributed
from diyllm.training.loop_state import LoopState
from diyllm.training.metrics import format_eval_line, format_final_eval_line, format_train_line
from diyllm.training.objective import NextTokenLoss, Objective, ObjectiveOutput
from diyllm.training.parallel import ParallelWrapper
from diyllm.training.report import TrainResult
from diyllm.training.run_folder import RunFolder
from diyllm.training.schedule import lr_at
from diyllm.training.stages import SetupStages


def train(cfg: TrainConfig, source: BatchSource | None = None, model: nn.Module | None = None, *,
          objective: Objective | None = None, parallel: ParallelWrapper | None = None,
          checkpointer: Checkpointer | None = None) -> TrainResult:
    """Run (or resume) training as `cfg` says; return a summary. Files go to cfg.out_dir.

    source: where batches come from (default: make_source(cfg), chosen by cfg.data_format).
    model: a ready model to train (default: a DIYForCausalLM built from cfg's shape fields, or from the
    checkpoint's shape when init_from is a path). With init_from=PATH its weights are loaded into `model`.
    objective / parallel / checkpointer: the seams above (defaults: next-token loss, DDP under torchrun,
    single-file checkpoints in cfg.out_dir).
    """
    return Trainer(cfg, source, model, objective=objective, parallel=parallel, checkpointer=checkpointer).run()


class Trainer(SetupStages):
    """The loop and its state; the setup stages are inherited from SetupStages (diyllm/training/stages.py)."""

    def __init__(self, cfg: TrainConfig, source: BatchSource | None = None, model: nn.Module | None = None, *,
                 objective: Objective | None = None, parallel: ParallelWrapper | None = None,
                 checkpointer: Checkpointer | None = None):
        self.cfg = cfg.validate()
        self.source, self.given_model, self.objective = source, model, objective or NextTokenLoss()
        self.parallel, self.checkpointer = parallel, checkpointer
        self.state = LoopState()
        self.bar = self.metrics = self.dist = None
        self.run_folder: RunFolder | None = None  # issue 13: the run folder's lock and start-up rules
        self.setup_failed = self.saved_any = False

    # ---- entry points ---------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        try:
            self.setup()
            with StopSignal(self.log) as self.stop_signal:
                return self.loop()
        except UserError:
            # bad input found once training started (e.g. a bad JSONL line read lazily): a run folder this run
            # created and that holds no checkpoint yet is removed again, as after a failed setup
            self.setup_failed = self.setup_failed or not self.saved_any
            raise
        finally:
            self.close()

    def setup(self) -> Trainer:
        """The stages, in the order they depend on each other."""
        try:
            self._setup_stages()
        except BaseException:
            self.setup_failed = True  # close() then removes a run folder this run created
            self.close()  # and releases what setup took (the run folder's lock) even when run() is not the caller
            raise
        return self

    def _setup_stages(self) -> None:
        self._setup_runtime()    # processes (torchrun), device, dtype, threads, seeds
        self._setup_run_folder()  # lock out_dir; refuse one holding a run (unless resume/overwrite); stale temps
        self._setup_data()       # the batch source, checked against the config
        self._setup_model()      # built from the config, or from init_from's shape and weights
        self._setup_wrap()       # compiled and/or parallel: the module the hot loop calls
        self._setup_optimizer()  # after wrap: a sharding wrapper replaces the parameters
        self._setup_restore()    # init_from=resume: weights, optimizer, counters, data position, RNGs
        self._setup_outputs()    # run folder, metrics, evaluation / checkpoint / early-stopping parts

    def _setup_run_folder(self) -> None:
        if self.dist.is_main:  # one writer per run folder (diyllm.training.run_folder)
            self.run_folder = RunFolder(self.cfg.out_dir, self.log).open(resume=self.cfg.init_from == "resume",
                                                                         overwrite=self.cfg.overwrite)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.run_folder is not None:
            self.run_folder.close(failed=self.setup_failed)
            self.run_folder = None
        if self.dist is not None:
            cleanup_distributed(self.dist)
        if self.cfg.deterministic and hasattr(self, "_deterministic_before"):  # a process-wide switch: undo it
            torch.use_deterministic_algorithms(self._deterministic_before)

    # ---- the loop ---------------------------------------------------------------------------------------
    def loop(self) -> TrainResult:
        cfg, state = self.cfg, self.state
        self._begin()
        stop_reason, last_loss = "", math.nan
        while True:
            if any_rank(self.stop_signal.requested, self.dist, self.device):  # all ranks stop together
                stop_reason = "signal"
            if self.evaluator.due(state) and not stop_reason:  # before the step: iteration 0 is measured too
                stop_reason = self.eval_and_track()
            ending = state.iteration >= cfg.max_iters or bool(stop_reason)
            if self.task_eval is not None:  # issue 18: benchmark evals (eval_tasks); it decides when it acts
                self.task_eval.maybe_run(unwrap_model(self.model), state.iteration, state.tokens_seen, self.elapsed(),
                                         final=ending)
            if self.checkpoints.due(state, ending):
                self.save("latest.pt")
            if ending:
                break
            last_loss = self.train_step()
        return self._finish(stop_reason, last_loss)

    def train_step(self) -> float:
        """One optimizer step over the global batch; returns its mean loss."""
        cfg, state, t0 = self.cfg, self.state, time.perf_counter()
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(cfg, state.iteration)  # the schedule decides, the optimizer just reads it
        loss_sum, metric_sums = self.forward_backward()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # fp16: clip and check the true gradients, not scaled ones
        grad_norm = self.parallel.clip_grad_norm(self.params, cfg.grad_clip)
        # The one host sync per step: the health check needs the numbers (metrics ride along for free).
        dev = loss_sum.device
        loss, norm, *metric_values = torch.stack(
            [loss_sum.float() / self.accum, grad_norm.float().to(dev),
             *(v.float().to(dev) / self.accum for v in metric_sums.values())]).tolist()
        take, warning = self.health.check(state.iteration + 1, loss, norm)  # never let NaN/inf reach weights
        if take and self.scaler is not None:
            self.scaler.step(self.optimizer)  # fp16: skips the step itself if the gradients overflowed
        elif take:
            self.optimizer.step()
        if self.scaler is not None:
            self.scaler.update()  # also after a skipped step: the scaler learns from overflows
        self.optimizer.zero_grad(set_to_none=True)
        state.iteration += 1  # a skipped step still counts: the schedule and data moved on
        state.tokens_seen += self.tokens_per_iter
        self.window.add(time.perf_counter() - t0)
        self._after_step(loss, norm, take, warning, dict(zip(metric_sums, metric_values)))
        return loss

    def forward_backward(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """All micro-steps of one optimizer step: leaves the (all-reduced) gradient of the mean loss over the
        global batch in .grad; returns this rank's summed micro-step losses and metrics (tensors, no sync)."""
        loss_sum, metric_sums = None, {}
        for micro in range(self.accum):
            batch = self.source.get_batch("train", self.cfg.batch_size, self.device)
            out = self.micro_step(batch, sync=micro == self.accum - 1)  # only the last micro-step syncs
            loss_sum = out.loss if loss_sum is None else loss_sum + out.loss
            for name, value in out.metrics.items():
                metric_sums[name] = value + metric_sums[name] if name in metric_sums else value
        return loss_sum, metric_sums

    def _micro_step(self, batch: Any, sync: bool) -> ObjectiveOutput:
        with self.parallel.sync_gradients(self.train_model, sync):
            with autocast_context(self.device, self.dtype):
                out = self.objective(self.train_model, batch)
            scaled = out.loss / self.accum  # so the accumulated gradient is that of the mean loss
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        return ObjectiveOutput(out.loss.detach(), {k: v.detach() for k, v in out.metrics.items()})

    def _first_compiled_micro_step(self, batch: Any, sync: bool) -> ObjectiveOutput:
        """The first micro-step of a compiled model: compile errors surface here, and then training goes on
        eagerly. Afterwards `micro_step` is the plain one, so the hot path has no fallback logic."""
        self.micro_step = self._micro_step
        try:
            return self._micro_step(batch, sync)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever compile raised: run eager
            self.warn(build.compile_failure_message(exc))
            self.optimizer.zero_grad(set_to_none=True)
            self.compiled = None
            self.train_model = self.parallel.wrap(unwrap_model(self.model))
            self.eval_model = unwrap_model(self.model)
            return self._micro_step(batch, sync)

    # ---- evaluation and checkpoints ---------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Mean train (unless eval_train=false) and val loss over eval_iters batches each (averaged over
        ranks), plus val bits/byte."""
        return self.evaluator.evaluate(self.eval_model)

    def eval_and_track(self) -> str:
        """Evaluate, keep best.pt, and return "early_stopping" when patience has run out (else "")."""
        state = self.state
        metrics = self.evaluate()
        state.last_eval_iter, state.last_eval = state.iteration, metrics
        self.metrics.log({"event": "eval", "iter": state.iteration, "tokens": state.tokens_seen,
                          "time": self.elapsed(), **metrics})
        self.log(format_eval_line({"iter": state.iteration, **metrics}))
        improved, stop = self.early_stopping.update(state, metrics["val_loss"])
        if improved:
            self.save("best.pt")
        if stop:
            self.log(f"early stopping: val loss has not improved for {state.evals_since_best} evaluations "
                     f"(best {state.best_val_loss:.4f})")
            return "early_stopping"
        return ""

    def _final_split_eval(self) -> dict:
        """final_val_tokens: the last weights scored over the val split (components.FinalSplitEval)."""
        started = time.perf_counter()
        metrics = self.final_eval.evaluate(unwrap_model(self.model))  # eager: no recompile for the last batch
        metrics["seconds"] = time.perf_counter() - started
        self.metrics.log({"event": "final_eval", "iter": self.state.iteration, "tokens": self.state.tokens_seen,
                          "time": self.elapsed(), **metrics})
        self.log(format_final_eval_line({"iter": self.state.iteration, **metrics}))
        return metrics

    def save(self, name: str) -> None:
        """A checkpoint with everything a resume needs (a collective: every rank calls it)."""
        entries = {"model_config": self.model_config.to_dict(), "train_config": self.cfg.to_dict(),
                   "tokenizer": self.tokenizer_json, **resume.rank_entries(self.source, self.dist),
                   "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                   **self.state.to_entries(self.elapsed())}
        entries["trainer"].update(health=self.health.state_dict(), world_size=self.dist.world_size)
        if self.objective.state_dict():
            entries["objective"] = self.objective.state_dict()
        self.checkpointer.save(name, self.model, self.optimizer, self.state.iteration, **entries)
        self.saved_any = True

    def elapsed(self) -> float:
        return self.state.elapsed_before + time.perf_counter() - self.t0

    # ---- output -----------------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.dist is not None and not self.dist.is_main:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def warn(self, msg: str) -> None:
        self.log(f"warning: {msg}")

    def _begin(self) -> None:
        """Header, start/resume record, progress bar, train mode: what happens once before the first step."""
        cfg, state = self.cfg, self.state
        self.t0 = time.perf_counter()
        self.window = report.ThroughputWindow()
        self.log("\n".join(report.header_lines(self)))
        if self.resumed:
            self.metrics.log({"event": "resume", "iter": state.iteration, "tokens": state.tokens_seen,
                              "time": self.elapsed()})
        else:
            self.metrics.log({"event": "start", "config": cfg.to_dict(), "num_params": self.num_params,
                              "run_name": self.run_name, "model_config": self.model_config.to_dict(),
                              "world_size": self.dist.world_size, "device": str(self.device),
                              "dtype": str(self.dtype).replace("torch.", ""), "tokens_per_iter": self.tokens_per_iter,
                              "bytes_per_token": self.bytes_per_token})
        if cfg.progress and self.dist.is_main:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=cfg.max_iters, initial=state.iteration, desc="train", unit="it",
                            dynamic_ncols=True, file=sys.stderr)
        self.train_model.train()

    def _after_step(self, loss: float, norm: float, took: bool, warning: str | None, metrics: dict) -> None:
        """Warnings, the skipped-step record, the train record every log_interval, the progress bar."""
        cfg, state = self.cfg, self.state
        if warning:
            self.warn(warning)
        if not took:
            self.metrics.log({"event": "nonfinite", "iter": state.iteration, "tokens": state.tokens_seen,
                              "time": self.elapsed(), "loss": loss, "grad_norm": norm,
                              "skipped_total": self.health.total_nonfinite})
        if state.iteration == 1 and not self.resumed:
            self.log(report.initial_loss_line(loss, self.model_config.vocab_size))
        if state.iteration % cfg.log_interval == 0 or state.iteration == cfg.max_iters:
            ms, tok_s = self.window.take(self.tokens_per_iter)
            rec = {"event": "train", "iter": state.iteration, "tokens": state.tokens_seen, "time": self.elapsed(),
                   "loss": loss, "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": norm,
                   "ms_per_iter": ms, "tokens_per_sec": tok_s, **metrics}
            if self.peak and self.flops_per_token:
                rec["mfu"] = self.flops_per_token * tok_s / (self.peak * self.dist.world_size)
            self.metrics.log(rec)
            self.log(format_train_line(rec, cfg.max_iters))
        if self.bar is not None:
            self.bar.update(1)
            if state.iteration % cfg.log_interval == 0:
                self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def _finish(self, stop_reason: str, last_loss: float) -> TrainResult:
        state = self.state
        final = self._final_split_eval() if self.final_eval is not None and stop_reason != "signal" else {}
        result = TrainResult(
            out_dir=str(self.out_dir), iterations=state.iteration, tokens_seen=state.tokens_seen,
            best_val_loss=state.best_val_loss, final_train_loss=state.last_eval.get("train_loss", last_loss),
            final_val_loss=state.last_eval.get("val_loss", math.nan), wall_time_s=self.elapsed(),
            num_params=self.num_params, stopped_early=bool(stop_reason), stop_reason=stop_reason,
            skipped_steps=self.health.total_nonfinite,
            stop_signal=self.stop_signal.signum if stop_reason == "signal" else 0,
            final_split_val_loss=final.get("val_loss", math.nan), final_split_val_bpb=final.get("val_bpb"))
        self.metrics.log({"event": "end", "iter": state.iteration, "tokens": state.tokens_seen,
                          "time": self.elapsed(), **dataclasses.asdict(result)})
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.log(report.footer_line(result))
        return result


__all__ = ["train", "Trainer", "TrainResult", "LoopState", "lr_at", "optimizer_groups", "model_config_from"]
