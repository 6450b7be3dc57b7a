"""The loop's seams: a custom batch source, objective, parallel wrapper and checkpointer run through the
one `train()` unchanged (what DPO, RL, distillation, FSDP and sharded checkpoints will plug into)."""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from diyllm.model import DIYConfig, DIYForCausalLM
from diyllm.training.checkpoint import read_checkpoint
from diyllm.training.checkpointer import SingleFileCheckpointer
from diyllm.training.config import TrainConfig
from diyllm.training.metrics import read_metrics
from diyllm.training.objective import NextTokenLoss, Objective, ObjectiveOutput
from diyllm.training.parallel import ParallelWrapper
from diyllm.training.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB, T = 30, 12


def cfg(out_dir, **kw) -> TrainConfig:
    base = dict(vocab_size=VOCAB, context_length=T, d_model=32, num_layers=1, num_heads=2, d_ff=64, batch_size=4,
                max_iters=6, warmup_iters=1, eval_interval=3, eval_iters=2, checkpoint_interval=3, log_interval=1,
                out_dir=str(out_dir), device="cpu", dtype="float32", progress=False)
    return TrainConfig(**{**base, **kw}).validate()


class PairSource:
    """Batches that are not (x, y, mask): dicts of "good" and "bad" continuations, as a preference (DPO)
    source would hand out. With attach_model it also generates a greedy 'rollout' from the live model,
    as an RL source would."""

    def __init__(self):
        self.vocab_size, self.context_length, self.tokenizer, self.bytes_per_token = VOCAB, T, None, None
        self.generator = torch.Generator().manual_seed(0)
        self.model, self.rollouts = None, 0

    def attach_model(self, model):
        self.model = model

    def get_batch(self, split, batch_size, device):
        start = torch.randint(0, VOCAB, (batch_size, 1), generator=self.generator)
        good = (start + torch.arange(T + 1)) % VOCAB  # counting up: learnable
        bad = (start - torch.arange(T + 1)) % VOCAB
        with torch.no_grad():  # uses the current weights: a rollout of one token
            was = self.model.training
            self.model.eval()
            rollout = self.model(good[:, :T].to(device)).logits[:, -1].argmax(-1)
            self.model.train(was)
        self.rollouts += 1
        return {"good": good.to(device), "bad": bad.to(device), "rollout": rollout}

    def state_dict(self):
        return {"rng": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["rng"])


class MarginObjective(Objective):
    """Next-token loss on "good" minus a small margin term against a frozen reference model's "bad"
    log-likelihood; keeps a step counter as its resumable state."""

    def __init__(self, reference: torch.nn.Module):
        self.reference, self.calls, self.prepared_on = reference, 0, None

    def prepare(self, model, device):
        self.prepared_on = device
        self.reference.to(device).eval().requires_grad_(False)

    def __call__(self, model, batch):
        self.calls += 1
        good, bad = batch["good"], batch["bad"]
        nll_good = model(good[:, :-1], targets=good[:, 1:]).loss
        logits_bad = model(bad[:, :-1]).logits
        with torch.no_grad():
            ref_bad = self.reference(bad[:, :-1]).logits
        margin = F.cross_entropy(logits_bad.flatten(0, 1), bad[:, 1:].flatten()) - F.cross_entropy(
            ref_bad.flatten(0, 1), bad[:, 1:].flatten())
        return ObjectiveOutput(nll_good - 0.01 * margin, {"margin": margin.detach(), "nll_good": nll_good.detach()})

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]


def test_custom_source_and_objective_run_through_train(tmp_path):
    reference = DIYForCausalLM(DIYConfig(vocab_size=VOCAB, context_length=T, d_model=32, num_layers=1,
                                         num_heads=2, d_ff=64))
    frozen = copy.deepcopy(reference.state_dict())
    source, objective = PairSource(), MarginObjective(reference)
    result = train(cfg(tmp_path), source, objective=objective)
    assert result.iterations == 6 and math.isfinite(result.final_val_loss)
    assert objective.prepared_on == torch.device("cpu") and source.model is not None and source.rollouts > 6
    assert objective.calls == 6 + 3 * 2 * 2  # 6 train micro-steps + 3 evals x 2 splits x 2 batches
    assert all(torch.equal(v, frozen[k]) for k, v in reference.state_dict().items())  # the reference stays frozen
    records = read_metrics(tmp_path)
    trains = [r for r in records if r["event"] == "train"]
    assert len(trains) == 6 and all({"margin", "nll_good"} <= set(r) for r in trains)
    assert trains[-1]["nll_good"] < trains[0]["nll_good"]  # it learned the "good" sequences
    ckpt = read_checkpoint(tmp_path / "latest.pt")
    assert ckpt["objective"] == {"calls": objective.calls}
    # resume restores the objective's state and the source's position
    resumed_objective = MarginObjective(reference)
    train(cfg(tmp_path, max_iters=8, init_from="resume"), PairSource(), objective=resumed_objective)
    assert resumed_objective.calls == objective.calls + 2 + 2 * 2  # 2 more steps, one more eval


def test_default_objective_writes_no_objective_entry(tmp_path):
    train(cfg(tmp_path, max_iters=2, eval_interval=0), PairSourceAsTriples(), objective=NextTokenLoss())
    assert "objective" not in read_checkpoint(tmp_path / "latest.pt")  # checkpoint contents as before


class PairSourceAsTriples(PairSource):
    def attach_model(self, model):  # no rollouts needed
        pass

    def get_batch(self, split, batch_size, device):
        start = torch.randint(0, VOCAB, (batch_size, 1), generator=self.generator)
        rows = (start + torch.arange(T + 1)) % VOCAB
        return rows[:, :-1], rows[:, 1:], None


class CountingParallel(ParallelWrapper):
    """No real parallelism: records what the loop asks of a wrapper."""

    def __init__(self):
        self.wrapped, self.syncs = 0, []

    def wrap(self, model):
        self.wrapped += 1
        return model

    def sync_gradients(self, train_model, sync):
        self.syncs.append(sync)
        return contextlib.nullcontext()


class CountingCheckpointer(SingleFileCheckpointer):
    def __init__(self, out_dir):
        super().__init__(out_dir)
        self.saved = []

    def save(self, name, model, optimizer, iteration, **entries):
        self.saved.append((name, iteration))
        super().save(name, model, optimizer, iteration, **entries)


def test_custom_parallel_wrapper_and_checkpointer(tmp_path):
    parallel, checkpointer = CountingParallel(), CountingCheckpointer(tmp_path / "elsewhere")
    train(cfg(tmp_path / "run", gradient_accumulation_steps=2), PairSourceAsTriples(), parallel=parallel,
          checkpointer=checkpointer)
    assert parallel.wrapped == 1
    assert parallel.syncs == [False, True] * 6  # only the last micro-step of each step syncs
    assert ("latest.pt", 3) in checkpointer.saved and ("latest.pt", 6) in checkpointer.saved
    assert (tmp_path / "elsewhere" / "latest.pt").exists() and not (tmp_path / "run" / "latest.pt").exists()


def test_loop_state_reads_the_checkpoint_layout_of_every_version():
    """LoopState is the one place the loop's counters are saved; it writes the layout checkpoints have always
    had (iteration / best_val_loss on top, the rest under "trainer") and reads files lacking newer entries."""
    from diyllm.training.loop_state import LoopState

    state = LoopState(iteration=7, tokens_seen=700, best_val_loss=1.5, evals_since_best=2, last_eval_iter=6,
                      last_eval={"val_loss": 1.6})
    entries = state.to_entries(elapsed=12.5)
    assert entries == {"best_val_loss": 1.5, "trainer": {"tokens_seen": 700, "evals_since_best": 2,
                                                         "last_eval_iter": 6, "elapsed": 12.5,
                                                         "last_eval": {"val_loss": 1.6}}}
    back = LoopState.from_checkpoint({"iteration": 7, **entries})
    assert back == LoopState(**{**state.__dict__, "elapsed_before": 12.5})
    oldest = LoopState.from_checkpoint({"iteration": 3})  # a file with no trainer entry at all
    assert (oldest.iteration, oldest.tokens_seen, oldest.best_val_loss, oldest.last_eval_iter) == (3, 0, math.inf, -1)
