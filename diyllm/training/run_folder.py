"""The run folder (out_dir) of a training run: one writer, no silent overwrite, no leftovers, a fallback.

What a run folder promises (see docs/reliability.md):

* one writer: the trainer holds `diyllm.locks` on it for its whole life, so a second training started on
  the same folder is refused with the first one's PID and command;
* nothing is replaced without being asked: a fresh run (init_from other than resume) refuses a folder
  that holds files, and says how to continue it (`--init_from=resume`), go elsewhere (a new
  `--out_dir`) or replace it (`--overwrite`, which removes only the files a run writes);
* no leftovers: temp files of checkpoint writes killed half-way are removed at start, once the lock
  shows that no live writer owns them; a folder this run created is removed again when setup fails;
* a fallback: `latest.pt` is written with history (`previous.pt`, then `previous.2.pt`, ... up to
  `keep_checkpoints` files in all), and a resume whose latest.pt is missing, unreadable or fails its
  checksum falls back to the newest good older one, with a warning.

History is kept by renaming, never by hard links: a link shares the disk blocks, so damage to one name
would be damage to both.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from diyllm.atomic import _umask
from diyllm.errors import UserError
from diyllm.locks import LOCK_NAME, hold_folder_lock

LATEST = "latest.pt"
# Everything a training run writes into its folder (what --overwrite may remove).
RUN_FILES = ("latest.pt", "best.pt", "metrics.jsonl", "config.json", "tokenizer.json", "DONE", "FAILED")
RUN_FOLDERS = ("tensorboard",)
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG)


def history_names(keep: int) -> list[str]:
    """The older copies of latest.pt kept beside it: keep=2 -> [previous.pt], 3 -> [previous.pt, previous.2.pt]."""
    return [("previous.pt" if i == 1 else f"previous.{i}.pt") for i in range(1, max(keep, 1))]


def checkpoint_candidates(out_dir: str | os.PathLike) -> list[Path]:
    """latest.pt then every previous*.pt present, newest first (what a resume may start from)."""
    out_dir = Path(out_dir)
    older = sorted(out_dir.glob("previous*.pt"), key=lambda p: _history_index(p.name))
    return [out_dir / LATEST, *older]


def _history_index(name: str) -> int:
    if name == "previous.pt":
        return 1
    middle = name[len("previous."):-len(".pt")]
    return int(middle) if middle.isdigit() else 10**6


def _temp_names(out_dir: Path) -> list[str]:
    return [*RUN_FILES, *(p.name for p in checkpoint_candidates(out_dir)), "previous.pt"]


class RunFolder:
    """The lock and the start-up rules of one run folder; `open()` then `close()` (or use as a context)."""

    def __init__(self, out_dir: str | os.PathLike, log: Callable[[str], None] = print):
        self.path = Path(out_dir)
        self.log = log
        self.created = False
        self._stack = contextlib.ExitStack()

    def open(self, *, resume: bool, overwrite: bool = False) -> RunFolder:
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"out_dir {self.path} is a file; pass a folder (new or a run folder) as --out_dir")
        self.created = not self.path.exists()
        lock = self._stack.enter_context(hold_folder_lock(self.path, purpose="training run",
                                                          clean_temps=_temp_names(self.path)))
        if lock.previous:
            self.log(f"note: the previous writer of {self.path} (PID {lock.previous.get('pid')}) ended without "
                     "releasing its lock (killed?); taking over")
        if lock.removed_temps:
            self.log(f"note: removed {len(lock.removed_temps)} temp file(s) of interrupted writes in {self.path}: "
                     + ", ".join(p.name for p in lock.removed_temps))
        if not resume:
            self._check_fresh(overwrite)
        return self

    def close(self, failed: bool = False) -> None:
        """Release the lock; after a failed setup, remove the folder again if this run created it."""
        try:
            if failed and self.created:
                with contextlib.suppress(OSError):
                    shutil.rmtree(self.path)
        finally:
            self._stack.close()

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(failed=exc_type is not None)

    def _check_fresh(self, overwrite: bool) -> None:
        entries = sorted(e.name for e in self.path.iterdir() if e.name != LOCK_NAME)
        if not entries:
            return
        ours = set(RUN_FILES) | set(RUN_FOLDERS) | {p.name for p in self.path.glob("previous*.pt")}
        if not overwrite:
            run_files = [e for e in entries if e in ours]
            others = [e for e in entries if e not in ours]
            what = (f"a previous run ({', '.join(run_files)})" if run_files else
                    f"files diyllm did not write ({', '.join(others[:5])}{', ...' if len(others) > 5 else ''})")
            raise UserError(
                f"out_dir {self.path} already holds {what}; to continue that run pass --init_from=resume, "
                "to start a new one pass a new --out_dir, or pass --overwrite to replace the run's files"
            )
        removed = []
        for name in entries:
            if name in ours:
                target = self.path / name
                if target.is_dir():
                    shutil.rmtree(target)
                else:
                    target.unlink()
                removed.append(name)
        if removed:
            self.log(f"--overwrite: removed the previous run's {', '.join(removed)} from {self.path}")


def read_resume_checkpoint(out_dir: str | os.PathLike, read: Callable[[Path], dict[str, Any]],
                           warn: Callable[[str], None]) -> tuple[dict[str, Any], Path]:
    """The newest good checkpoint of a run folder: latest.pt, else (with a warning) previous.pt, ...

    `read` loads and verifies one file, raising UserError for a damaged one.
    """
    problems = []
    for path in checkpoint_candidates(out_dir):
        if not path.exists():
            if path.name == LATEST:
                problems.append(f"{path} is missing")
            continue
        try:
            state = read(path)
        except UserError as exc:
            problems.append(str(exc))
            continue
        if problems:
            warn(f"{'; '.join(problems)}; resuming from {path} (iteration {state.get('iteration')}) instead: the "
                 "iterations after it are trained again")
        return state, path
    if len(problems) == 1 and problems[0].endswith("is missing"):
        raise UserError(f"init_from=resume but {Path(out_dir) / LATEST} does not exist; nothing to resume "
                        "(use init_from=scratch to start a new run)")
    raise UserError("init_from=resume found no usable checkpoint in " f"{out_dir}:\n  - " + "\n  - ".join(problems))


@contextlib.contextmanager
def write_with_history(path: str | os.PathLike, keep: int = 2) -> Iterator[IO[bytes]]:
    """Like diyllm.atomic.atomic_write, but before the new file takes `path`'s name the old one becomes
    previous.pt (and previous.pt becomes previous.2.pt, ... keeping `keep` files in all).

    A crash at any moment leaves every name either absent or a complete file; the newest complete
    checkpoint is always latest.pt or, in the instant between two renames, previous.pt.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes owner-only files; give the mode open() would
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        names = history_names(keep)
        if names and path.exists():
            for older, newer in zip(reversed(names), list(reversed(names))[1:]):
                if (path.parent / newer).exists():
                    os.replace(path.parent / newer, path.parent / older)
            os.replace(path, path.parent / names[0])
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def describe_write_error(exc: OSError, path: str | os.PathLike, intact: str | os.PathLike | None = None) -> str:
    """One line for a failed write: what failed, why, what is still intact, what to do."""
    path = Path(path)
    keep = f"; the previous {Path(intact).name} is intact" if intact and Path(intact).exists() else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return f"disk full while writing {path}{keep}; free some space (or lower keep_checkpoints) and resume"
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write {path}: {exc.strerror} (read-only folder?){keep}; choose a writable --out_dir"
    return f"could not write {path}: {exc}{keep}"


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
