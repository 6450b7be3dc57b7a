"""Where `prepare` may write: never over the user's files, never into its own input, never renaming aside.

The rule: the output folder must be absent, empty, or an earlier diyllm dataset (recognised by its
manifest `meta.json`, or by the progress file of an unfinished prepare). Replacing a dataset needs
`--overwrite` unless the run is the resume of the very same command. Only files a dataset consists of are
ever deleted; anything else in the folder makes prepare refuse.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
from pathlib import Path
from typing import Any

from diyllm.errors import UserError

PROGRESS_NAME = ".diyllm-prepare.json"
LOCK_NAME = ".diyllm.lock"
VERIFIED_NAME = ".diyllm-verified.json"  # shards found to match their checksums (diyllm.data.checksums)
DATASET_PATTERNS = (
    "meta.json", "manifest.json", "tokenizer.json", "train.bin", "val.bin", "train_*.bin", "val_*.bin",
    "train_*.idx", "val_*.idx", ".train_*.partial", ".val_*.partial", PROGRESS_NAME, LOCK_NAME, VERIFIED_NAME,
    ".*.tmp",
)


def is_dataset_file(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in DATASET_PATTERNS)


def read_json_dict(path: Path) -> dict[str, Any] | None:
    """A JSON object from `path`, or None if absent/unreadable/not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def looks_like_dataset(folder: Path) -> bool:
    meta = read_json_dict(folder / "meta.json")
    if meta is not None and "dtype" in meta and ("train_tokens" in meta or "shards" in meta):
        return True
    return (folder / PROGRESS_NAME).is_file()


def check_out_dir(out: Path, inputs: list[Path], roots: list[Path]) -> str:
    """Refuse unsafe outputs; return "absent", "empty" or "dataset".

    `inputs` are the resolved input files, `roots` the folders the user named (an output inside either
    would read its own output or bury the corpus in the dataset).
    """
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder (absent, empty, or an earlier dataset)")
    real = Path(os.path.realpath(out))
    for root in roots:
        r = Path(os.path.realpath(root))
        if real == r or r in real.parents:
            raise UserError(f"--out {out} is inside the input folder {root}; the dataset would be read as input "
                            "(and mixed with your files): choose an --out outside it")
    for f in inputs:
        if real in Path(os.path.realpath(f)).parents:
            raise UserError(f"--out {out} contains the input file {f}; choose another --out "
                            "(prepare writes only into an absent or empty folder or an earlier dataset)")
    if not out.exists():
        return "absent"
    names = [p.name for p in out.iterdir()]
    if not names or names == [LOCK_NAME]:
        return "empty"
    if not looks_like_dataset(out):
        shown = ", ".join(sorted(names)[:5]) + (", ..." if len(names) > 5 else "")
        raise UserError(f"--out {out} is not empty and is not a diyllm dataset (it holds {shown}); prepare writes "
                        "only into an absent or empty folder or an earlier dataset: choose another --out")
    return "dataset"


def remove_dataset_files(out: Path) -> None:
    """Delete the files of a dataset (and of an unfinished prepare) in `out`, leaving any other file alone."""
    for entry in out.iterdir():
        if entry.name == LOCK_NAME or not is_dataset_file(entry.name):
            continue
        with contextlib.suppress(FileNotFoundError):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def remove_stale_siblings(out: Path) -> list[Path]:
    """Temp folders `.OUT.XXXX.tmp` that an older prepare (building the folder under a temp name) left
    beside `out` when killed. Call only while holding `out`'s lock."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in out.parent.iterdir():
            if entry.is_dir() and fnmatch.fnmatchcase(entry.name, f".{out.name}.*.tmp") and all(
                is_dataset_file(p.name) or p.name == "_tokenizer_sample.txt" for p in entry.iterdir()
            ):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed
