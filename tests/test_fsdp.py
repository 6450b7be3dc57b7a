"""FSDP2 and sharded (DCP) checkpoints on CPU with gloo, against single-process references.

Multi-process work is expensive on a small CPU, so one 2-rank run does several checks (meta-device init,
training steps, a checkpoint) and one 3-rank run reads that checkpoint back; the comparisons happen here.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from diyllm.errors import UserError
from diyllm.model import DIYConfig, DIYForCausalLM
from diyllm.training.optim import AdamW, clip_grad_norm_

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

CONFIG = dict(vocab_size=67, context_length=32, d_model=48, num_layers=3, num_heads=4, num_kv_heads=2, d_ff=96,
              tie_embeddings=True, init_std=0.02)  # odd vocab: rows do not split evenly over 2 or 3 ranks
STEPS, ACCUM, BATCH, SEED = 3, 4, 2, 1234


def batches(step: int, accum: int, world: int, rank: int):
    """The micro-batches this rank uses at `step`: rank r takes the r-th share of the global batch."""
    g = torch.Generator().manual_seed(100 + step)
    data = torch.randint(0, CONFIG["vocab_size"], (accum * world, BATCH, CONFIG["context_length"] + 1), generator=g)
    return [(b[:, :-1], b[:, 1:]) for b in data[rank * accum:(rank + 1) * accum]]


def train_steps(model, optimizer, world: int, rank: int, clip, sync=None) -> list[float]:
    """STEPS optimizer steps of a global batch of ACCUM micro-batches; returns the global mean losses."""
    accum = ACCUM // world
    losses = []
    for step in range(STEPS):
        total = torch.zeros(())
        for i, (x, y) in enumerate(batches(step, accum, world, rank)):
            if sync is not None:
                sync(model, i == accum - 1)
            loss = model(x, targets=y).loss
            (loss / accum).backward()
            total += loss.detach()
        clip(list(model.parameters()), 0.05)  # small: clipping is active in every step
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total /= accum
        if world > 1:
            dist.all_reduce(total)
            total /= world
        losses.append(total.item())
    return losses


def full_weights(model) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _worker(rank: int, world: int, port: int, out: str, mode: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from diyllm.sharded_checkpoints import load_dcp_checkpoint, save_dcp_checkpoint
        from diyllm.training.fsdp import (
            build_sharded_model,
            clip_grad_norm_sharded_,
            device_mesh,
            set_gradient_sync,
            shard_model,
        )

        config = DIYConfig(**CONFIG)
        mesh = device_mesh("cpu", world)
        torch.manual_seed(SEED if mode == "train" else SEED + 1)
        model = build_sharded_model(config, torch.device("cpu"), lambda m: shard_model(m, mesh))
        optimizer = AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        if mode == "train":
            initial = full_weights(model)
            losses = train_steps(model, optimizer, world, rank, clip_grad_norm_sharded_, set_gradient_sync)
            save_dcp_checkpoint(Path(out) / "ckpt", model, optimizer,
                                {"iteration": STEPS, "model_config": config.to_dict(), "tokenizer": None})
            final = full_weights(model)
            # HSDP: a 2-D mesh (2 replicas x 1 shard); one micro-batch per rank, gradients averaged over both
            torch.manual_seed(SEED)
            hsdp_mesh = device_mesh("cpu", world, replicas=2)
            hsdp = build_sharded_model(config, torch.device("cpu"), lambda m: shard_model(m, hsdp_mesh))
            x, y = batches(0, 1, world, rank)[0]
            hsdp(x, targets=y).loss.backward()
            hsdp_norm = clip_grad_norm_sharded_(list(hsdp.parameters()), 0.0).item()
            if rank == 0:
                torch.save({"initial": initial, "final": final, "losses": losses, "hsdp_norm": hsdp_norm,
                            "hsdp_mesh": hsdp.lm_head.weight.device_mesh.mesh.tolist()}, Path(out) / "train.pt")
        else:  # load the 2-rank checkpoint on `world` ranks
            state = load_dcp_checkpoint(Path(out) / "ckpt", model, optimizer)
            loaded = full_weights(model)
            if rank == 0:
                torch.save({"weights": loaded, "iteration": state["iteration"]}, Path(out) / f"load{world}.pt")
    finally:
        dist.destroy_process_group()
    os._exit(0)  # skip interpreter teardown, which can abort a gloo worker (see distributed.finish_worker)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """A 2-rank FSDP run (meta init, STEPS steps, a DCP checkpoint) and a 3-rank reload of it."""
    out = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_worker, args=(2, free_port(), str(out), "train"), nprocs=2, join=True)
    mp.spawn(_worker, args=(3, free_port(), str(out), "load"), nprocs=3, join=True)
    return out


def plain_model() -> DIYForCausalLM:
    torch.manual_seed(SEED)
    return DIYForCausalLM(DIYConfig(**CONFIG))


def test_meta_init_on_two_ranks_equals_plain_init(fsdp_run):
    initial = torch.load(fsdp_run / "train.pt", weights_only=True)["initial"]
    expected = plain_model().state_dict()
    assert initial.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(initial[name], value), name


def test_fsdp_loss_curve_and_weights_equal_single_process(fsdp_run):
    got = torch.load(fsdp_run / "train.pt", weights_only=True)
    model = plain_model()
    optimizer = AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses = train_steps(model, optimizer, 1, 0, clip_grad_norm_)
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(losses), rtol=1e-5, atol=0)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(got["final"][name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_hsdp_two_dimensional_mesh_gives_the_global_gradient(fsdp_run):
    got = torch.load(fsdp_run / "train.pt", weights_only=True)
    assert got["hsdp_mesh"] == [[0], [1]]  # replicate over the 2 ranks, shard within groups of 1
    model = plain_model()
    (x0, y0), (x1, y1) = batches(0, 1, 2, 0)[0], batches(0, 1, 2, 1)[0]
    ((model(x0, targets=y0).loss + model(x1, targets=y1).loss) / 2).backward()
    expected = clip_grad_norm_(list(model.parameters()), 1e9).item()
    assert got["hsdp_norm"] == pytest.approx(expected, rel=1e-5)


def test_two_rank_checkpoint_loads_exactly_on_three_ranks_and_on_one(fsdp_run):
    from diyllm.sharded_checkpoints import load_dcp_checkpoint

    saved = torch.load(fsdp_run / "train.pt", weights_only=True)["final"]
    on_three = torch.load(fsdp_run / "load3.pt", weights_only=True)
    assert on_three["iteration"] == STEPS
    model = DIYForCausalLM(DIYConfig(**CONFIG))  # one process, no process group: a plain model
    optimizer = AdamW(model.parameters(), lr=1e-2)
    state = load_dcp_checkpoint(fsdp_run / "ckpt", model, optimizer)
    assert state["iteration"] == STEPS
    assert model.token_embeddings.weight is model.lm_head.weight
    for name, value in saved.items():
        assert torch.equal(on_three["weights"][name], value), name
        assert torch.equal(model.state_dict()[name], value), name
    moments = [optimizer.state[p] for p in model.parameters()]
    assert all(s["step"] == STEPS and s["exp_avg"].abs().sum() > 0 for s in moments)


def test_consolidate_gives_the_saved_weights(fsdp_run, tmp_path, capsys):
    from diyllm.cli import main

    saved = torch.load(fsdp_run / "train.pt", weights_only=True)["final"]
    out = tmp_path / "model.pt"
    assert main(["checkpoint", "consolidate", str(fsdp_run / "ckpt"), "--out", str(out)]) == 0
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["iteration"] == STEPS and ckpt["model_config"]["d_model"] == CONFIG["d_model"]
    for name, value in saved.items():
        assert torch.equal(ckpt["model"][name], value), name
    assert main(["checkpoint", "consolidate", str(fsdp_run / "ckpt"), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["checkpoint", "consolidate", str(tmp_path), "--out", str(tmp_path / "x.pt")]) == 2
    assert "is not a sharded (DCP) checkpoint folder" in capsys.readouterr().err


def test_dcp_checkpoint_of_another_shape_is_refused_naming_fields(fsdp_run):
    from diyllm.sharded_checkpoints import load_dcp_checkpoint

    other = DIYForCausalLM(DIYConfig(**{**CONFIG, "d_ff": 128}))
    with pytest.raises(UserError, match=r"(?s)different model shape.*d_ff: checkpoint 96 vs model 128.*"
                                        r"layers\.0\.ffn\.w1\.weight: checkpoint \(96, 48\) vs model \(128, 48\)"):
        load_dcp_checkpoint(fsdp_run / "ckpt", other)


def test_incomplete_dcp_folder_is_reported_incomplete(fsdp_run, tmp_path):
    import shutil

    from diyllm.sharded_checkpoints import load_dcp_checkpoint

    broken = tmp_path / "broken"
    shutil.copytree(fsdp_run / "ckpt", broken)
    (broken / ".metadata").unlink()
    before = {k: v.clone() for k, v in plain_model().state_dict().items()}
    model = plain_model()
    with pytest.raises(UserError, match=r"incomplete sharded \(DCP\) checkpoint: \.metadata missing"):
        load_dcp_checkpoint(broken, model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # nothing half-loaded


KILL_SCRIPT = textwrap.dedent("""
    import os, sys, time, torch
    from diyllm.model import DIYConfig, DIYForCausalLM
    from diyllm import sharded_checkpoints as dcp_checkpoint
    torch.manual_seed(0)
    model = DIYForCausalLM(DIYConfig(vocab_size=50, context_length=16, d_model=32, num_layers=2, num_heads=2))
    dcp_checkpoint.save_dcp_checkpoint(sys.argv[1], model, None, {"iteration": 1})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    def stall(*args, **kwargs):  # the shards are written; trainer_state.pt never is
        print("saving", flush=True)
        time.sleep(600)
    dcp_checkpoint.torch.save = stall
    dcp_checkpoint.save_dcp_checkpoint(sys.argv[1], model, None, {"iteration": 2})
""")


def test_sigkill_during_dcp_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    import signal

    from diyllm.sharded_checkpoints import load_dcp_checkpoint

    target = tmp_path / "latest"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "saving"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".latest.")]  # the unfinished temp folder
    torch.manual_seed(7)
    model = DIYForCausalLM(DIYConfig(vocab_size=50, context_length=16, d_model=32, num_layers=2, num_heads=2))
    assert load_dcp_checkpoint(target, model)["iteration"] == 1
    torch.manual_seed(0)
    first = DIYForCausalLM(DIYConfig(vocab_size=50, context_length=16, d_model=32, num_layers=2, num_heads=2))
    for name, value in first.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def test_activation_checkpointing_gives_the_same_gradients():
    from diyllm.training.fsdp import enable_activation_checkpointing

    config = DIYConfig(**{**CONFIG, "dropout": 0.1})
    x, y = batches(0, 1, 1, 0)[0]
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(SEED)
        model = DIYForCausalLM(config)
        if checkpointed:
            enable_activation_checkpointing(model)
        torch.manual_seed(5)  # the same dropout masks
        model(x, targets=y).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        assert list(model.state_dict()) == list(plain_model().state_dict())  # names unchanged
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-6, atol=1e-8, msg=name)


def test_fsdp_refuses_float16_and_bad_replica_counts():
    from diyllm.training.fsdp import device_mesh, shard_model

    with pytest.raises(UserError, match="use dtype=bfloat16"):
        shard_model(DIYForCausalLM(DIYConfig(**CONFIG)), mesh=None, compute_dtype=torch.float16)
    with pytest.raises(UserError, match="fsdp_replicas=3 must divide the 2 processes"):
        device_mesh("cpu", 2, replicas=3)
