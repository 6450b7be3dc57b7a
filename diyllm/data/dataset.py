"""Reading a prepared dataset folder: manifest (meta.json), token shards, tokenizer.json; validated on open.

Shards are raw little-endian token ids with no header; meta.json says the dtype and lists the shards
(`shards: {"train": [{"file", "tokens", "documents", "sha256", "offsets"}], "val": [...]}`). A folder
from before sharding (train.bin / val.bin and a meta.json without "shards") reads as one shard per split.
Keeping the files headerless means `np.memmap` reads them directly and any tool can too.

`open_dataset` makes the checks `inspect-data` shows and the trainer needs, with the same messages: the
manifest is a JSON object with a known dtype, every shard exists with the size the manifest says (a
truncated or odd-sized file is named), a sample of ids is below vocab_size, and the splits are non-empty.
With `verify_checksums` (what training asks for) every shard is also compared with its SHA-256 in the
manifest, each unchanged shard hashed only once (diyllm.data.checksums); `inspect-data --verify` re-hashes
them all.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diyllm.data.shards import ShardedTokens
from diyllm.errors import UserError

SPLITS = ("train", "val")
DTYPES = ("uint16", "uint32", "int32", "int64")
ID_SAMPLE = 1 << 15  # ids checked against vocab_size at the start and end of each shard


def prepare_hint(data_dir: str | os.PathLike) -> str:
    """The prepare command for a missing data_dir: the recipe of that name when there is one (data/pystdlib,
    data/shakespeare_bpe512: `diyllm prepare RECIPE`'s default --out), else the general form."""
    from diyllm.data.recipes import RECIPES

    name = Path(data_dir).name
    if name in RECIPES:
        return f"e.g. `diyllm prepare {name} --out {data_dir}`"
    return f"e.g. `diyllm prepare SOURCE --out {data_dir}` (a shipped config's first lines name its command)"


def read_meta(data_dir: str | os.PathLike) -> dict[str, Any]:
    """The dataset's meta.json, with a clear error when the folder is not a prepared dataset."""
    path = Path(data_dir) / "meta.json"
    if not Path(data_dir).is_dir():
        raise UserError(f"{data_dir} is not a prepared dataset (no such folder); run `diyllm prepare` first, "
                        f"{prepare_hint(data_dir)}")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        unfinished = (Path(data_dir) / ".diyllm-prepare.json").exists()
        hint = " (an unfinished prepare: run the same command again)" if unfinished else ""
        raise UserError(f"{data_dir} is not a prepared dataset (no meta.json){hint}; run `diyllm prepare` first"
                        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is corrupt: {exc}") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path} holds a JSON {type(meta).__name__}, not an object; re-run `diyllm prepare`")
    if "dtype" not in meta:
        raise UserError(f"{path} has no 'dtype' field; re-run `diyllm prepare`")
    if meta["dtype"] not in DTYPES:
        raise UserError(f"{path}: dtype {meta['dtype']!r} is not one of {DTYPES}; re-run `diyllm prepare`")
    return meta


def manifest_shards(meta: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """{split: [shard entries]}; an old single-file dataset is one shard per split."""
    if isinstance(meta.get("shards"), dict):
        return {s: list(meta["shards"].get(s) or []) for s in SPLITS}
    return {s: [{"file": f"{s}.bin", "tokens": meta.get(f"{s}_tokens")}] for s in SPLITS}


def checksummed_shards(data_dir: str | os.PathLike, meta: dict[str, Any]) -> list[tuple[Path, str]]:
    """(file, SHA-256) of every shard whose manifest entry has a checksum (none in an old single-file dataset)."""
    return [(Path(data_dir) / str(s["file"]), str(s["sha256"]))
            for shards in manifest_shards(meta).values() for s in shards if s.get("sha256")]


def verify_sizes(data_dir: str | os.PathLike, meta: dict[str, Any]) -> list[str]:
    """Problems with the shard files (missing, odd byte count, size not what the manifest says)."""
    folder, itemsize = Path(data_dir), np.dtype(meta["dtype"]).itemsize
    problems = []
    for split, shards in manifest_shards(meta).items():
        total = 0
        for s in shards:
            path = folder / str(s.get("file"))
            if not path.is_file():
                problems.append(f"{path} is missing; the dataset folder is incomplete, re-run `diyllm prepare`")
                continue
            size = path.stat().st_size
            if size % itemsize:
                problems.append(f"{path} has {size} bytes, not a multiple of {itemsize} ({meta['dtype']}); "
                                "the file is damaged, re-run `diyllm prepare`")
                continue
            expected = s.get("tokens")
            if expected is not None and int(expected) != size // itemsize:
                problems.append(f"{path} holds {size // itemsize} tokens but meta.json says {expected} "
                                "(truncated or damaged?); re-run `diyllm prepare`")
            total += size // itemsize
        if "shards" in meta and meta.get(f"{split}_tokens") is not None and total != meta[f"{split}_tokens"] \
                and not problems:
            said = meta[f"{split}_tokens"]
            problems.append(f"{folder}: the {split} shards hold {total} tokens but meta.json says {said}")
    return problems


@dataclass
class Dataset:
    """An opened, validated dataset folder."""

    path: Path
    meta: dict[str, Any]
    splits: dict[str, ShardedTokens]
    vocab_size: int

    def split(self, name: str) -> Any:
        """The split as one array: the memmap itself for one shard, else a ShardedTokens."""
        data = self.splits[name]
        if len(data.arrays) == 1:
            return data.arrays[0]
        return data


def _memmap(path: Path, dtype: np.dtype) -> Any:
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def open_dataset(data_dir: str | os.PathLike, *, require_val: bool = False, min_tokens: int = 1,
                 verify_checksums: bool = False, progress: bool = True) -> Dataset:
    """Open and validate a dataset folder (see the module docstring); UserError names what is wrong."""
    folder = Path(data_dir)
    meta = read_meta(folder)
    problems = verify_sizes(folder, meta)
    if problems:
        raise UserError(problems[0])
    if verify_checksums:
        from diyllm.data.checksums import checksum_problem

        problem = checksum_problem(folder, checksummed_shards(folder, meta), progress=progress)
        if problem:
            raise UserError(problem)
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    splits = {}
    for split, shards in manifest_shards(meta).items():
        arrays = [_memmap(folder / s["file"], dtype) for s in shards]
        offsets = [folder / s["offsets"] if s.get("offsets") else None for s in shards]
        splits[split] = ShardedTokens(arrays, offsets, meta.get("eot_id"))
    vocab = meta.get("vocab_size")
    if vocab is not None and (not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 1):
        raise UserError(f"{folder / 'meta.json'}: vocab_size must be a positive integer, not {vocab!r}")
    if vocab is None:  # a hand-made folder: the largest id seen decides
        vocab = int(max((int(np.max(a)) for d in splits.values() for a in d.arrays if len(a)), default=0)) + 1
    for split, shards in manifest_shards(meta).items():
        for s, arr in zip(shards, splits[split].arrays):
            if not len(arr):
                continue
            sample = np.concatenate([np.asarray(arr[:ID_SAMPLE]), np.asarray(arr[-ID_SAMPLE:])])
            if int(sample.max()) >= vocab or (sample.dtype.kind == "i" and int(sample.min()) < 0):
                bad = int(sample.max()) if int(sample.max()) >= vocab else int(sample.min())
                raise UserError(f"{folder / s['file']} holds token id {bad}, outside the vocabulary of {vocab} in "
                                "meta.json: the data and its meta.json/tokenizer do not match; re-run `diyllm prepare`")
    for split in SPLITS if require_val else ("train",):
        if len(splits[split]) < min_tokens:
            what = "empty" if len(splits[split]) == 0 else f"only {len(splits[split])} tokens"
            raise UserError(f"the {split} split of {folder} is {what}, but training needs at least {min_tokens} "
                            f"(context_length + 1); re-prepare with more data"
                            + (" or a larger --val_fraction" if split == "val" else "") + ", or lower context_length")
    return Dataset(folder, meta, splits, int(vocab))


def load_split(data_dir: str | os.PathLike, split: str, verify_checksums: bool = False) -> Any:
    """Memory-map `split` ("train" or "val") as a read-only 1-D array of token ids (validated; with
    verify_checksums, every shard's SHA-256 too, hashed once per change as training does).

    Only the windows that are indexed get read from disk, so corpora larger than RAM are fine. One shard
    comes back as its np.memmap (an empty split as an empty ndarray, since mmap cannot map 0 bytes);
    several as a ShardedTokens, which indexes and slices like one array.
    """
    if split not in SPLITS:
        raise UserError(f"split must be one of {SPLITS}, not {split!r}")
    return open_dataset(data_dir, verify_checksums=verify_checksums).split(split)


def tokenizer_path(data_dir: str | os.PathLike) -> Path:
    """Where the dataset's tokenizer lives (load it with diyllm.tokenizers.load_tokenizer)."""
    meta = read_meta(data_dir)
    return Path(data_dir) / meta.get("tokenizer_file", "tokenizer.json")
