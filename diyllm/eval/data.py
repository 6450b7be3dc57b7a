"""Where a task's rows come from: a local `DIR/<task>/<split>.jsonl`, the download cache, or the Hub.

Local files hold one row per line in the public dataset's own format (what the Hub's dataset viewer or
`datasets.Dataset.to_json` exports), so they need no conversion. Without `--data_dir`, a task's split is
read from the cache (`$DIYLLM_CACHE/eval/<task>/<split>.jsonl`, default ~/.cache/diyllm), and on first use
downloaded there from the Hugging Face Hub: the Hub's Parquet conversion of the dataset
(revision "refs/convert/parquet"), read with pyarrow. Offline, that fails with an error that says how to
use --data_dir instead. The synthetic task needs no data: its rows are generated.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from diyllm.errors import UserError
from diyllm.eval.tasks import Doc, Task

PARQUET_REVISION = "refs/convert/parquet"


def cache_dir() -> Path:
    root = os.environ.get("DIYLLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "diyllm")
    return Path(root) / "eval"


def read_rows(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """(line number, row) of every non-blank line of a JSONL file; errors name file:line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg}); "
                                "each line must be one JSON object") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append((lineno, row))
    return rows


def parse_rows(task: Task, rows: list[tuple[int, dict]], source: str) -> list[Doc]:
    """Rows -> Docs; a row that is not in the task's format names the file, line and expected fields."""
    docs = []
    for lineno, row in rows:
        try:
            docs.append(task.parse(row))
        except (KeyError, ValueError, IndexError, TypeError, AttributeError) as exc:
            what = f"missing key {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
            raise UserError(f"{source}:{lineno}: not a {task.name} row ({what}); expected the public dataset's "
                            f"fields {', '.join(task.fields)}") from None
    return docs


def local_split_path(task: Task, split: str, data_dir: str | os.PathLike) -> Path:
    return Path(data_dir) / task.name / f"{split}.jsonl"


def has_split(task: Task, split: str, data_dir: str | os.PathLike | None) -> bool:
    """Whether `split` can be had without a download (a local or cached file, or generated rows)."""
    if task.hub is None:
        return True
    base = Path(data_dir) if data_dir is not None else cache_dir()
    return local_split_path(task, split, base).exists()


def load_docs(task: Task, split: str, data_dir: str | os.PathLike | None = None, download: bool = True) -> list[Doc]:
    """The task's docs of `split`, from data_dir, else the cache, else downloaded into the cache."""
    if task.hub is None:
        if data_dir is not None and local_split_path(task, split, data_dir).exists():
            path = local_split_path(task, split, data_dir)
            return parse_rows(task, read_rows(path), str(path))
        return _synthetic_docs(task, split)
    if data_dir is not None:
        path = local_split_path(task, split, data_dir)
        if not path.exists():
            raise UserError(f"{path} does not exist: --data_dir must hold {task.name}/{split}.jsonl, one row per line "
                            f"in the public dataset's format (fields {', '.join(task.fields)})")
        return parse_rows(task, read_rows(path), str(path))
    path = local_split_path(task, split, cache_dir())
    if not path.exists():
        if not download:
            raise UserError(f"{task.name}/{split} is not in the cache {cache_dir()}")
        download_split(task, split, path)
    return parse_rows(task, read_rows(path), str(path))


def _synthetic_docs(task: Task, split: str) -> list[Doc]:
    from diyllm.data.synthetic import make_splits

    train, val = make_splits(400, 200, seed=0)
    return [task.parse(r) for r in (train if split == "train" else val)]


def _offline_error(task: Task, split: str, why: str) -> UserError:
    return UserError(
        f"cannot download {task.name}/{split} from the Hugging Face Hub ({why}). Offline, pass --data_dir DIR with "
        f"DIR/{task.name}/{split}.jsonl holding the dataset {task.hub[0]} rows as JSON lines "
        f"(fields {', '.join(task.fields)}), e.g. exported with datasets' Dataset.to_json")


def download_split(task: Task, split: str, dest: Path) -> None:
    """Fetch the Hub's Parquet files of one split and store them as JSONL at `dest` (atomically)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise _offline_error(task, split, "HF_HUB_OFFLINE is set")
    try:
        from huggingface_hub import HfApi, hf_hub_download
    except ImportError:
        raise _offline_error(task, split, "huggingface_hub is not installed: pip install huggingface_hub") from None
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise _offline_error(task, split, "pyarrow is not installed: pip install pyarrow") from None
    repo, config = task.hub
    try:
        files = HfApi().list_repo_files(repo, repo_type="dataset", revision=PARQUET_REVISION)
    except Exception as exc:  # network, auth, missing repo: all end in the same advice
        raise _offline_error(task, split, f"{type(exc).__name__}: {exc}") from None
    wanted = [f for f in files if f.endswith(".parquet") and _in_split(f, config, split, task.hub_subject_configs)]
    if not wanted:
        raise _offline_error(task, split, f"{repo} has no Parquet files for config {config} split {split}")
    rows = []
    from tqdm import tqdm

    for name in tqdm(sorted(wanted), desc=f"download {task.name}/{split}", unit="file"):
        try:
            local = hf_hub_download(repo, name, repo_type="dataset", revision=PARQUET_REVISION)
        except Exception as exc:
            raise _offline_error(task, split, f"{type(exc).__name__}: {exc}") from None
        subject = name.split("/")[0] if task.hub_subject_configs else None
        for row in pq.read_table(local).to_pylist():
            if subject is not None:
                row.setdefault("subject", subject)
            rows.append(row)
    from diyllm.atomic import atomic_write

    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(dest, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")


def _in_split(name: str, config: str | None, split: str, any_config: bool) -> bool:
    """Parquet-branch paths are <config>/<split>/NNNN.parquet (older: <config>/<repo>-<split>.parquet)."""
    parts = name.split("/")
    if len(parts) < 2 or (not any_config and parts[0] != (config or "default")):
        return False
    return (len(parts) >= 3 and parts[1] == split) or parts[-1].endswith(f"-{split}.parquet")
