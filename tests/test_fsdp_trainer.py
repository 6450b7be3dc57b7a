"""parallelism = "fsdp" in the training loop, on 2 CPU processes with gloo.

One 2-rank launch runs a whole FSDP training (with activation checkpointing and accumulation) and the
same training split in two halves with a resume; everything else is compared here, in one process:
against single-process training of the same global batch, bit for bit between the two FSDP runs, a
2 -> 1 resharding resume, and consolidate -> `diyllm sample`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_ddp import ShardedStream, free_port

from diyllm.errors import UserError
from diyllm.sharded_checkpoints import consolidated_checkpoint, read_trainer_state
from diyllm.training.checkpoint import read_checkpoint
from diyllm.training.config import TrainConfig
from diyllm.training.distributed import finish_worker
from diyllm.training.metrics import read_metrics
from diyllm.training.trainer import Trainer, train

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


class CharStream(ShardedStream):
    """ShardedStream with a tokenizer, so checkpoints are self-contained and `diyllm sample` can read them."""

    def __init__(self):
        from diyllm.tokenizers import CharTokenizer

        super().__init__()
        self.tokenizer = CharTokenizer.train("abcdefghijklmnopqrstuvwxyz .,;:!?\nABCDEF")
        assert self.tokenizer.vocab_size == self.vocab_size
        self.splits = {"val": self.data[-64:].flatten().numpy()}  # what final_val_tokens scores: 67 windows of 16

    def get_batch(self, split, batch_size, device):
        if split == "train":
            return super().get_batch(split, batch_size, device)
        rows = self.data[-batch_size:]  # a fixed val batch: evaluating never moves the training stream
        return rows[:, :-1].to(device), rows[:, 1:].to(device), None


def fsdp_config(out_dir, **kw) -> TrainConfig:
    base = dict(vocab_size=40, context_length=16, d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, d_ff=64,
                tie_embeddings=True, batch_size=2, gradient_accumulation_steps=4, max_iters=4, lr_decay_iters=4,
                warmup_iters=1, learning_rate=3e-3, grad_clip=0.2, dropout=0.0, out_dir=str(out_dir),
                device="cpu", dtype="float32", progress=False, eval_interval=0, eval_iters=1, checkpoint_interval=2,
                log_interval=1, parallelism="fsdp", activation_checkpointing=True)
    return TrainConfig(**{**base, **kw}).validate()


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = Path(out)
        trainer = Trainer(fsdp_config(out / "full", final_val_tokens=10**6), CharStream())
        trainer.run()
        assert trainer.parallel.name == "fsdp" and type(trainer.model).__name__.startswith("FSDP")
        train(fsdp_config(out / "split", max_iters=2), CharStream())
        train(fsdp_config(out / "split", init_from="resume"), CharStream())
    finally:
        dist.destroy_process_group()
    finish_worker(0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_train")
    mp.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return out


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["iter"]: r["loss"] for r in read_metrics(run_dir) if r["event"] == "train"}


def test_fsdp_training_equals_single_process_of_the_same_global_batch(runs, tmp_path):
    single = train(fsdp_config(tmp_path / "single", parallelism="ddp", activation_checkpointing=False), CharStream())
    expected = read_checkpoint(tmp_path / "single" / "latest.pt")["model"]
    got = consolidated_checkpoint(runs / "full" / "latest")
    assert got["iteration"] == single.iterations == 4
    for name, value in expected.items():
        torch.testing.assert_close(got["model"][name], value, rtol=1e-4, atol=1e-6, msg=name)
    assert (runs / "full" / "latest" / ".metadata").is_file() and not (runs / "full" / "latest.pt").exists()


def test_final_split_eval_under_fsdp_equals_one_process(runs):
    """final_val_tokens on sharded weights: both ranks ran the same forwards (each a collective) over every other
    window, and the sum is what one process scores with the consolidated weights."""
    from diyllm.loading import load_model
    from diyllm.training.components import FinalSplitEval
    from diyllm.training.distributed import DistInfo
    from diyllm.training.objective import NextTokenLoss

    final = [r for r in read_metrics(runs / "full") if r["event"] == "final_eval"]
    assert len(final) == 1 and final[0]["val_tokens"] == 67 * 16
    model = load_model(runs / "full" / "latest")[0]
    scorer = FinalSplitEval(CharStream().splits["val"], 16, 10**6, 2, NextTokenLoss(), torch.device("cpu"),
                            torch.float32, DistInfo(), None)
    assert final[0]["val_loss"] == pytest.approx(scorer.evaluate(model)["val_loss"], rel=1e-5)


def test_fsdp_resume_is_bit_identical(runs):
    full, split = consolidated_checkpoint(runs / "full" / "latest"), consolidated_checkpoint(runs / "split" / "latest")
    for name, value in full["model"].items():
        assert torch.equal(split["model"][name], value), name
    lf, ls = train_losses(runs / "full"), train_losses(runs / "split")
    assert sorted(ls) == [1, 2, 3, 4] and [lf[i] for i in range(1, 5)] == [ls[i] for i in range(1, 5)]
    states = read_trainer_state(runs / "split" / "latest")["rank_states"]  # per-rank RNG and data position
    assert len(states) == 2 and states[0]["data_state"] == states[1]["data_state"] == {"pos": 4 * 4 * 2}


def test_two_rank_run_resumes_on_one_process_with_the_saved_weights(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs / "full", run)
    saved = consolidated_checkpoint(run / "latest")["model"]
    trainer = Trainer(fsdp_config(run, init_from="resume", max_iters=6, lr_decay_iters=6), CharStream()).setup()
    try:
        assert trainer.state.iteration == 4 and trainer.parallel.name == "none"
        state = trainer.model.state_dict()
        for name, value in saved.items():
            assert torch.equal(state[name], value), name
    finally:
        trainer.close()
    result = train(fsdp_config(run, init_from="resume", max_iters=6, lr_decay_iters=6), CharStream())
    assert result.iterations == 6 and consolidated_checkpoint(run / "latest")["iteration"] == 6


def test_consolidated_checkpoint_is_read_by_sample(runs, tmp_path, capsys):
    from diyllm.cli import main
    from diyllm.training.checkpoint import load_model

    out = tmp_path / "model.pt"
    assert main(["checkpoint", "consolidate", str(runs / "full" / "latest"), "--out", str(out)]) == 0
    saved = consolidated_checkpoint(runs / "full" / "latest")["model"]
    assert all(torch.equal(read_checkpoint(out)["model"][k], v) for k, v in saved.items())
    for where in (out, runs / "full" / "latest", runs / "full"):  # the file, the DCP folder, the run folder
        model, tokenizer, _ = load_model(where)
        assert tokenizer is not None and torch.equal(model.lm_head.weight, saved["lm_head.weight"])
    capsys.readouterr()
    for ckpt in (out, runs / "full" / "latest"):
        assert main(["sample", "--ckpt", str(ckpt), "--prompt", "ab", "--max_new_tokens", "5",
                     "--temperature", "0"]) == 0
    first, second = capsys.readouterr().out.strip().split("\n")[-2:]
    assert first.startswith("ab") and first == second  # the same weights, greedy: the same text


def test_fsdp_resume_without_a_sharded_checkpoint_is_refused(tmp_path):
    train(fsdp_config(tmp_path, parallelism="ddp", max_iters=1, activation_checkpointing=False), CharStream())
    with pytest.raises(UserError, match=r"latest does not exist; nothing to resume \(it holds latest\.pt from a "
                                        r"DDP run: resume it with parallelism=ddp"):
        Trainer(fsdp_config(tmp_path, init_from="resume"), CharStream()).setup()
