"""diyllm.locks: one writer per folder, with the holder named and stale locks taken over."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap

import pytest

from diyllm import locks
from diyllm.errors import UserError
from diyllm.locks import LOCK_NAME, hold_folder_lock, remove_stale_temps

pytestmark = pytest.mark.skipif(locks.fcntl is None, reason="no fcntl on this platform")

HOLDER = textwrap.dedent("""
    import sys, time
    from diyllm.locks import hold_folder_lock
    with hold_folder_lock(sys.argv[1], purpose="test holder"):
        print("held", flush=True)
        sys.stdin.readline()
""")


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_lock_is_taken_recorded_and_removed_on_release(tmp_path):
    run = tmp_path / "run"
    with hold_folder_lock(run, purpose="training run") as lock:
        assert run.is_dir() and lock.previous is None
        record = json.loads((run / LOCK_NAME).read_text())
        assert record["pid"] == os.getpid() and record["purpose"] == "training run"
    assert not (run / LOCK_NAME).exists()  # a finished writer leaves nothing behind
    with hold_folder_lock(run) as lock:  # free again
        assert lock.previous is None


def test_second_process_is_refused_with_holder_named(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(UserError) as info, hold_folder_lock(tmp_path, purpose="training run"):
            pass
        message = str(info.value)
        assert f"PID {proc.pid}" in message and "test holder" in message and str(tmp_path) in message
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    with hold_folder_lock(tmp_path):  # released when the holder ended
        pass


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.stdout.readline().strip() == "held"
    proc.kill()
    proc.wait(timeout=30)
    assert (tmp_path / LOCK_NAME).exists()  # SIGKILL left the file (the kernel dropped the lock)
    with hold_folder_lock(tmp_path) as lock:
        assert lock.previous is not None and lock.previous["pid"] == proc.pid


def test_kernel_lock_kept_by_an_orphan_with_dead_recorded_holder_is_taken_over(tmp_path):
    """A forked worker that outlived its parent still holds the flock; the recorded PID is dead."""
    dead = _dead_pid()
    orphan = textwrap.dedent(f"""
        import fcntl, json, os, sys
        fd = os.open({str(tmp_path / LOCK_NAME)!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, json.dumps({{"pid": {dead}, "host": None, "purpose": "x"}}).encode())
        print("held", flush=True)
        sys.stdin.readline()
    """)
    proc = subprocess.Popen([sys.executable, "-c", orphan], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with hold_folder_lock(tmp_path) as lock:
            assert lock.previous["pid"] == dead
            assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def test_live_holder_recorded_with_kernel_lock_is_not_taken_over(tmp_path):
    live = textwrap.dedent(f"""
        import fcntl, json, os, sys
        fd = os.open({str(tmp_path / LOCK_NAME)!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, json.dumps({{"pid": os.getpid(), "command": "diyllm train x"}}).encode())
        print("held", flush=True)
        sys.stdin.readline()
    """)
    proc = subprocess.Popen([sys.executable, "-c", live], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=r"diyllm train x"), hold_folder_lock(tmp_path):
            pass
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def test_reentrant_in_one_process(tmp_path):
    with hold_folder_lock(tmp_path), hold_folder_lock(tmp_path):
        assert (tmp_path / LOCK_NAME).exists()
    assert not (tmp_path / LOCK_NAME).exists()


def test_unwritable_folder_is_a_user_error(tmp_path, monkeypatch):
    real_open = os.open

    def read_only(path, flags, *a):
        if str(path).endswith(LOCK_NAME):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *a)

    monkeypatch.setattr(locks.os, "open", read_only)
    with pytest.raises(UserError, match=r"cannot write in .*read-only"), hold_folder_lock(tmp_path):
        pass


def test_stale_temps_removed_only_for_given_names(tmp_path):
    (tmp_path / ".latest.pt.ab12cd.tmp").write_bytes(b"x")
    (tmp_path / ".ds.x1y2.tmp").mkdir()
    (tmp_path / "notes.tmp").write_text("user file")
    (tmp_path / "latest.pt").write_bytes(b"keep")
    assert remove_stale_temps(tmp_path, ["latest.pt"]) == [tmp_path / ".latest.pt.ab12cd.tmp"]
    assert (tmp_path / ".ds.x1y2.tmp").exists()
    with hold_folder_lock(tmp_path, clean_temps=True) as lock:
        assert lock.removed_temps == [tmp_path / ".ds.x1y2.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt", "notes.tmp"]


def test_pid_alive():
    assert locks.pid_alive(os.getpid(), locks._process_start_time(os.getpid()))
    assert not locks.pid_alive(_dead_pid())
    assert not locks.pid_alive(os.getpid(), proc_start=-5) or locks._process_start_time(os.getpid()) is None
