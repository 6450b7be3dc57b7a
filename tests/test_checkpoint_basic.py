"""save/load of model + optimizer + iteration: paths, file objects, safety, atomicity."""

import pickle

import pytest
import torch

from diyllm.errors import UserError
from diyllm.model import DIYForCausalLM
from diyllm.training.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from diyllm.training.optim import AdamW


def _trained(tiny_config):
    model = DIYForCausalLM(tiny_config)
    opt = AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 97, (2, 9))
    model(ids[:, :-1], targets=ids[:, 1:]).loss.backward()
    opt.step()
    return model, opt


def test_round_trip_through_a_path_restores_everything(tmp_path, tiny_config):
    model, opt = _trained(tiny_config)
    save_checkpoint(model, opt, 42, tmp_path / "ck.pt", note="hello")
    fresh = DIYForCausalLM(tiny_config)
    fresh_opt = AdamW(fresh.parameters(), lr=1e-3)
    assert load_checkpoint(tmp_path / "ck.pt", fresh, fresh_opt) == 42
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    assert fresh_opt.state_dict()["state"][0]["step"] == 1
    assert read_checkpoint(tmp_path / "ck.pt")["note"] == "hello"
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temp files left behind


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, tiny_config, monkeypatch):
    model, opt = _trained(tiny_config)
    path = tmp_path / "latest.pt"
    save_checkpoint(model, opt, 1, path)

    def crash(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, opt, 2, path)
    monkeypatch.undo()
    assert read_checkpoint(path)["iteration"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pt"]


def test_loading_refuses_pickled_code_and_garbage(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"model": Evil()}))
    with pytest.raises(UserError, match="could not read checkpoint"):
        read_checkpoint(evil)
    with pytest.raises(UserError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.pt")
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a diyllm checkpoint"):
        read_checkpoint(tmp_path / "other.pt")


def test_atomic_files_and_folders_get_the_usual_permissions(tmp_path):
    """Temp files start owner-only (mkstemp/mkdtemp); the finished file/folder must have the mode a plain
    open()/mkdir gives under the umask, so a shared run folder or export stays readable."""
    import os
    import stat

    from diyllm.atomic import atomic_dir, atomic_write

    old = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "a.bin") as f:
            f.write(b"x")
        with atomic_dir(tmp_path / "folder") as d:
            (d / "inside.txt").write_text("y")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.bin").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o755
