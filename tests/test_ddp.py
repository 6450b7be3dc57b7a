"""DistributedDataParallel on CPU with gloo: gradients match one process, and `torchrun ... train` works."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from diyllm.training.checkpoint import read_checkpoint
from diyllm.training.config import TrainConfig
from diyllm.training.distributed import finish_worker
from diyllm.training.metrics import read_metrics
from diyllm.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


class ShardedStream:
    """Rows handed out in order; with R ranks, rank r takes the r-th slice of each global batch, so the
    ranks together see exactly what one process with R times the accumulation sees."""

    def __init__(self, vocab_size=40, context_length=16, rows=512):
        g = torch.Generator().manual_seed(0)
        starts = torch.randint(0, vocab_size, (rows, 1), generator=g)
        self.data = (starts * 7 + torch.arange(context_length + 1) * 3) % vocab_size
        self.vocab_size, self.context_length = vocab_size, context_length
        self.tokenizer, self.bytes_per_token = None, None
        self.pos, self.rank, self.world = 0, 0, 1

    def set_rank(self, rank, world_size):
        self.rank, self.world = rank, world_size

    def get_batch(self, split, batch_size, device):
        start = self.pos + self.rank * batch_size
        rows = self.data[start:start + batch_size]
        self.pos += self.world * batch_size
        return rows[:, :-1].to(device), rows[:, 1:].to(device), None

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]


def grad_config(out_dir) -> TrainConfig:
    return TrainConfig(vocab_size=40, context_length=16, d_model=32, num_layers=2, num_heads=2, d_ff=64,
                       batch_size=2, gradient_accumulation_steps=4, max_iters=1, warmup_iters=0, dropout=0.0,
                       out_dir=str(out_dir), device="cpu", dtype="float32", progress=False, eval_interval=0,
                       eval_iters=1, data_format="bin").validate()


def _grad_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        trainer = Trainer(grad_config(Path(out_dir) / "ddp"), ShardedStream()).setup()
        assert trainer.accum == 4 // world  # accumulation is split across ranks
        trainer.forward_backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
        torch.save(grads, Path(out_dir) / f"grads_{rank}.pt")
        trainer.close()
    finally:
        dist.destroy_process_group()
    finish_worker(0)  # skip interpreter teardown, which can abort a gloo worker (see finish_worker)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_gradient_equals_single_process_gradient(tmp_path):
    single = Trainer(grad_config(tmp_path / "single"), ShardedStream()).setup()
    single.forward_backward()
    expected = {n: p.grad.clone() for n, p in single.model.named_parameters()}
    single.close()

    mp.spawn(_grad_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"grads_{rank}.pt", weights_only=True)
        assert got.keys() == expected.keys()
        for name, g in expected.items():
            torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_torchrun_train_end_to_end(tmp_path):
    from test_trainer import make_char_dataset

    data = make_char_dataset(tmp_path / "data")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "diyllm",
           "train", "shakespeare_char_cpu", f"--data_dir={data}", f"--out_dir={out}", "--max_iters=6",
           "--warmup_iters=1", "--gradient_accumulation_steps=2", "--eval_interval=3", "--eval_iters=2",
           "--checkpoint_interval=3", "--d_model=32", "--num_layers=1", "--d_ff=64", "--context_length=16",
           "--progress=false", "--log_interval=1", "--final_val_tokens=1000000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("diyllm train: run") == 1  # only rank 0 prints
    ckpt = read_checkpoint(out / "latest.pt")
    assert ckpt["iteration"] == 6 and ckpt["trainer"]["world_size"] == 2
    states = ckpt["rank_states"]
    assert len(states) == 2 and states[0]["data_state"] != states[1]["data_state"]  # ranks draw different batches
    records = read_metrics(out)
    assert [r["iter"] for r in records if r["event"] == "eval"] == [0, 3, 6]
    assert records[0]["world_size"] == 2 and records[0]["tokens_per_iter"] == 12 * 2 * 16
    assert records[-1]["event"] == "end" and records[-1]["iterations"] == 6
    # final_val_tokens: the two ranks scored every other window of the val split; together, what one process
    # scores with the saved weights (the split has an odd number of windows: one rank runs a repeat, ignored)
    from diyllm.training.checkpoint import load_model
    from diyllm.training.components import FinalSplitEval
    from diyllm.training.distributed import DistInfo
    from diyllm.training.objective import NextTokenLoss

    final = next(r for r in records if r["event"] == "final_eval")
    val = np.fromfile(data / "val.bin", dtype=np.uint16)
    scorer = FinalSplitEval(val, 16, 10**6, 12, NextTokenLoss(), torch.device("cpu"), torch.float32, DistInfo(), None)
    assert len(scorer.starts) % 2 == 1 and final["val_tokens"] == scorer.num_tokens
    model = load_model(out / "latest.pt")[0]
    assert final["val_loss"] == pytest.approx(scorer.evaluate(model)["val_loss"], rel=1e-5)
