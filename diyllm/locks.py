"""One writer per folder: an exclusive lock held for the life of the process that writes there.

Two trainings started on the same run folder (or two `prepare` runs on the same dataset) would each
overwrite the other's files and both "finish". So a writer takes an exclusive `fcntl.flock` on a lock
file first and keeps it until it exits:

    with hold_folder_lock(out_dir, purpose="training run") as lock:
        ...  # lock.previous: what a crashed earlier holder recorded (or None)

Why flock: the kernel drops the lock when the process dies, however it dies (SIGKILL, OOM), so a crash
never leaves a folder locked for ever. The lock file also records the holder (PID, command, start time,
host) so a refused second writer can say who is in the way. Two stale cases are handled:

* the file names a holder that is gone but the kernel lock is free (the usual crash): simply taken over,
  and `lock.previous` tells the caller that a writer died there (so its temp files are garbage);
* the kernel lock is still held although the recorded process is dead: a forked child (e.g. a data loader
  worker) inherited the descriptor and outlived its parent. The lock file is replaced by a fresh one
  (under a small guard lock, so two newcomers cannot both take over).

Re-entrant within one process: a command that locks a folder may call library code that locks it again.
On platforms without fcntl (Windows) the lock is a no-op with the same API.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diyllm.errors import UserError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".diyllm.lock"

# lock file path (resolved) -> (fd, depth) for the locks this process holds (re-entrancy)
_HELD: dict[str, list[int]] = {}


@dataclass
class FolderLock:
    """A held lock. `previous` is the record left by an earlier holder that died without releasing."""

    path: Path
    purpose: str
    previous: dict[str, Any] | None = None
    removed_temps: list[Path] = field(default_factory=list)


def holder_record(purpose: str) -> dict[str, Any]:
    """What the lock file says about this process (shown to whoever is refused)."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": " ".join(["diyllm" if sys.argv[0].endswith(("__main__.py", "diyllm")) else sys.argv[0]]
                            + sys.argv[1:])[:500],
        "purpose": purpose,
        "started_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "proc_start": _process_start_time(os.getpid()),
    }


def pid_alive(pid: int, proc_start: Any = None) -> bool:
    """Whether process `pid` exists (and, when its start time was recorded, is still the same process)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    except OSError:
        return False
    if proc_start is not None:
        now = _process_start_time(pid)
        if now is not None and now != proc_start:  # the PID was reused by another process
            return False
    return True


def record_is_stale(record: dict[str, Any] | None) -> bool:
    """True when `record` names a process on this host that no longer runs."""
    if not record or "pid" not in record:
        return True
    if record.get("host") not in (None, socket.gethostname()):
        return False  # cannot tell for another machine (shared filesystem): assume alive
    return not pid_alive(record.get("pid"), record.get("proc_start"))


def describe_holder(record: dict[str, Any] | None) -> str:
    if not record:
        return "another process (it recorded no details)"
    text = f"PID {record.get('pid')}"
    if record.get("host") and record.get("host") != socket.gethostname():
        text += f" on host {record['host']}"
    if record.get("command"):
        text += f" (`{record['command']}`)"
    if record.get("started_at"):
        text += f", started {record['started_at']}"
    return text


@contextlib.contextmanager
def hold_folder_lock(folder: str | os.PathLike, purpose: str = "writer", *, create: bool = True,
                     clean_temps: bool | list[str] = False) -> Iterator[FolderLock]:
    """Hold an exclusive lock on `folder` (its file `.diyllm.lock`) for the duration of the block.

    Raises UserError naming the holder when another live process has it, or when the folder cannot be
    written. `create` makes the folder first. `clean_temps` removes temp files that a killed writer left
    in the folder once the lock is ours (True: every `.NAME.*.tmp`; a list: only those of these names).
    The lock file is removed again on release, so a finished run leaves nothing behind.
    """
    folder = Path(folder)
    if create:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(_write_error(folder, exc)) from exc
    with hold_lock_file(folder / LOCK_NAME, purpose, subject=str(folder)) as lock:
        if clean_temps:
            names = None if clean_temps is True else list(clean_temps)
            lock.removed_temps = remove_stale_temps(folder, names)
        yield lock


@contextlib.contextmanager
def hold_lock_file(lock_path: str | os.PathLike, purpose: str = "writer", *,
                   subject: str | None = None) -> Iterator[FolderLock]:
    """Hold an exclusive lock on the file `lock_path` (created if absent).

    For a target that is replaced as a whole (a dataset folder built under a temp name and renamed),
    lock a sibling file such as `PARENT/.NAME.lock` with this instead of a file inside the target.
    `subject` is what the error messages call the locked thing.
    """
    lock_path = Path(lock_path)
    subject = subject or str(lock_path)
    key = os.path.realpath(lock_path)
    if key in _HELD:  # re-entrant: this process holds it already
        _HELD[key][1] += 1
        try:
            yield FolderLock(lock_path, purpose)
        finally:
            _HELD[key][1] -= 1
        return
    if fcntl is None:  # pragma: no cover - Windows: no advisory locks, keep the API
        yield FolderLock(lock_path, purpose)
        return
    fd, previous = _acquire(lock_path, purpose, subject)
    _HELD[key] = [fd, 1]
    try:
        yield FolderLock(lock_path, purpose, previous=previous)
    finally:
        del _HELD[key]
        _release(lock_path, fd)


def remove_stale_temps(folder: str | os.PathLike, names: list[str] | None = None) -> list[Path]:
    """Delete the temp files/folders that diyllm.atomic writers left in `folder` (`.NAME.XXXX.tmp`).

    Call it only while holding the folder's lock: then no live writer can own one of them. `names`
    limits it to temps of those target names (e.g. ["latest.pt", "best.pt"]). Returns what was removed.
    """
    folder = Path(folder)
    patterns = [f".{n}.*.tmp" for n in names] if names is not None else [".*.tmp"]
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        if not any(fnmatch.fnmatchcase(entry.name, p) for p in patterns):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
    return removed


# ---- internals -----------------------------------------------------------------------------------------


def _acquire(lock_path: Path, purpose: str, subject: str) -> tuple[int, dict | None]:
    orphaned = None
    for _ in range(20):  # retried only when the file was replaced between open and lock
        fd = _open(lock_path, subject)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(f"cannot lock {lock_path}: {exc}") from exc
            record = _read_record(lock_path)
            if record is not None and record_is_stale(record) and _take_over(lock_path, subject, record):
                orphaned = record
                continue  # the orphaned file was replaced; lock the new one
            raise UserError(
                f"{subject} is in use by {describe_holder(record)}"
                f"{' for a ' + record['purpose'] if record and record.get('purpose') else ''}; "
                "wait for it to finish or stop it, or choose another folder"
            ) from None
        if not _same_file(fd, lock_path):  # unlinked/replaced by a releasing holder: try again
            os.close(fd)
            continue
        previous = _read_fd(fd)
        try:
            _write_fd(fd, holder_record(purpose))
        except OSError as exc:
            os.close(fd)
            raise UserError(_write_error(lock_path.parent, exc)) from exc
        return fd, previous or orphaned
    raise UserError(f"could not lock {lock_path}: it keeps being replaced by another process")


def _release(lock_path: Path, fd: int) -> None:
    with contextlib.suppress(OSError):
        if _same_file(fd, lock_path):
            os.unlink(lock_path)  # newcomers re-check the inode after locking, so this is race-free
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _take_over(lock_path: Path, subject: str, record: dict) -> bool:
    """Replace a lock file whose kernel lock outlived its recorded holder; False if someone else did."""
    guard_path = lock_path.with_name(lock_path.name + ".takeover")
    guard = _open(guard_path, subject)
    try:
        fcntl.flock(guard, fcntl.LOCK_EX)  # short critical section: wait for it
        if _read_record(lock_path) != record:  # another newcomer replaced it already
            return True
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path)
        return True
    finally:
        with contextlib.suppress(OSError):
            os.unlink(guard_path)
        os.close(guard)


def _open(path: Path, subject: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as exc:
        raise UserError(_write_error(path.parent, exc, subject)) from exc


def _write_error(folder: Path, exc: OSError, subject: str | None = None) -> str:
    what = subject or str(folder)
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write in {what}: {exc.strerror} (read-only or not yours?); choose a writable folder"
    if exc.errno == errno.ENOSPC:
        return f"cannot write in {what}: the disk is full; free some space and run again"
    return f"cannot write in {what}: {exc}"


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read_fd(fd: int) -> dict | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = b""
        while chunk := os.read(fd, 65536):
            data += chunk
        record = json.loads(data.decode("utf-8")) if data.strip() else None
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _read_record(path: Path) -> dict | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return _read_fd(fd)
    finally:
        os.close(fd)


def _write_fd(fd: int, record: dict) -> None:
    data = json.dumps(record).encode("utf-8")
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, data)
    os.fsync(fd)


def _process_start_time(pid: int) -> int | None:
    """The process start time in clock ticks since boot (Linux /proc); None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None
