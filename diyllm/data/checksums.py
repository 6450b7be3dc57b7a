"""Dataset shard checksums, verified when training opens a dataset; an unchanged shard is hashed only once.

prepare records the SHA-256 of every shard in meta.json. A run of flipped bytes keeps a shard's size, so
the size checks of `open_dataset` cannot see it, and training would go on from damaged data. So training
compares every shard with its checksum on open and refuses a mismatch with an error naming the file.

Hashing a 10B-token dataset (20 GB) at every start would cost minutes, so a good result is remembered:
`.diyllm-verified.json` beside meta.json records, per shard, the checksum it was found to have and the
file's (size, mtime_ns, ctime_ns) at that moment. An open trusts a shard whose stat and manifest checksum
still equal its record and hashes the others. Every write to a file moves its mtime and ctime, and ctime
cannot be set back from user space (restoring mtime with `touch -d` / os.utime moves ctime), so an
edited shard is always hashed again; a copy elsewhere (a new ctime) is hashed once in its new place.
What a record cannot see is damage beneath the file system (bit rot on the medium):
`diyllm inspect-data --verify` re-hashes every shard whatever the record says.

prepare writes the record itself (it hashed the bytes as it wrote them), so the first training does not
read the whole dataset again. Where the record cannot be written (a read-only or shared folder) the shards
are hashed at every open, with a note when that is long; `verify_data=false` skips the check. A dataset
without checksums (train.bin / val.bin from before shards) has nothing to verify.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

from diyllm.atomic import atomic_write
from diyllm.data.outdir import VERIFIED_NAME, read_json_dict
from diyllm.data.shard_writer import file_sha256

STAMP_NAME = VERIFIED_NAME
STAMP_VERSION = 1
PROGRESS_BYTES = 256 << 20  # a progress bar (and the read-only note) when at least this much is hashed
STALE_TEMP_SECONDS = 60.0

Shards = list[tuple[Path, str]]  # (shard file, its SHA-256 in meta.json)


def _record(path: Path, sha256: str) -> dict[str, int | str]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "sha256": sha256}


def read_stamp(folder: Path) -> dict[str, dict]:
    """{shard file name: record} from the folder's record file; {} when absent, unreadable or of another version."""
    data = read_json_dict(folder / STAMP_NAME)
    if data is None or data.get("version") != STAMP_VERSION or not isinstance(data.get("shards"), dict):
        return {}
    return data["shards"]


def write_stamp(folder: Path, records: dict[str, dict]) -> OSError | None:
    """Replace the record file atomically; the OSError if it cannot be written (e.g. a read-only folder)."""
    now = time.time()
    for stale in folder.glob(f".{STAMP_NAME}.*.tmp"):  # left by a process killed mid-write (a write takes ms)
        with contextlib.suppress(OSError):
            if now - stale.stat().st_mtime > STALE_TEMP_SECONDS:
                stale.unlink()
    try:
        with atomic_write(folder / STAMP_NAME, "w", encoding="utf-8") as f:
            json.dump({"version": STAMP_VERSION, "algorithm": "sha256", "shards": records}, f, indent=1)
    except OSError as exc:
        return exc
    return None


def record_verified(folder: Path, shards: Shards) -> None:
    """Record `shards` as matching their checksums as they are now (prepare, which hashed what it wrote)."""
    write_stamp(folder, {path.name: _record(path, sha) for path, sha in shards})


def checksum_problem(folder: Path, shards: Shards, *, trust_stamp: bool = True, progress: bool = True) -> str | None:
    """The error message for the first shard whose contents do not match its checksum, or None if all match.

    Shards recorded as verified with their current stat are skipped unless `trust_stamp` is False; the
    record is rewritten only when a shard was newly found good (a refused dataset is left as it was).
    """
    if not shards:
        return None
    stamp = read_stamp(folder) if trust_stamp else {}
    records: dict[str, dict] = {}
    todo = []
    for path, sha in shards:
        rec = _record(path, sha)  # the stat before the read: a write during hashing shows at the next open
        if stamp.get(path.name) == rec:
            records[path.name] = rec
        else:
            todo.append((path, rec))
    if not todo:
        return None
    from tqdm import tqdm

    total = sum(int(rec["size"]) for _, rec in todo)
    long = total >= PROGRESS_BYTES
    problem, newly_good = None, 0
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"verifying {len(todo)} shard checksum(s)",
              disable=not (progress and long), file=sys.stderr, mininterval=0.5) as bar:
        for path, rec in todo:
            try:
                actual = file_sha256(path, progress=bar.update)
            except OSError as exc:
                problem = f"{path} cannot be read ({exc.strerror or exc}); check the disk, or re-run `diyllm prepare`"
                break
            if actual != rec["sha256"]:
                problem = (f"{path} does not match its SHA-256 in meta.json (sha256 {actual[:12]}… instead of "
                           f"{str(rec['sha256'])[:12]}…): the shard was damaged or changed after `diyllm prepare` "
                           "wrote it; re-run the same `diyllm prepare` command to rebuild the dataset (or pass it "
                           "--overwrite)")
                break
            records[path.name] = rec
            newly_good += stamp.get(path.name) != rec
    if not newly_good:
        return problem
    failed = write_stamp(folder, records)
    if failed is not None and long and progress:
        print(f"note: cannot record the verified checksums in {folder / STAMP_NAME} ({failed.strerror or failed}); "
              "the shards will be hashed again at the next start (verify_data=false skips the check)",
              file=sys.stderr)
    return problem
