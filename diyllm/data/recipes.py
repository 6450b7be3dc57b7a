"""Built-in corpora for `diyllm prepare NAME`: known sources with sensible tokenizer defaults.

  pystdlib          the Python standard library's .py files on this machine (offline, ~13 MB; tests,
                    site-packages and caches excluded; one document per file, files sorted), BPE 4096
  shakespeare       tinyshakespeare (1.1 MB), BPE 2048
  shakespeare_bpe512  tinyshakespeare, BPE 512 (the shakespeare_speedrun config's)
  shakespeare_char  tinyshakespeare, one token per character (vocab 65)
  tinystories       roneneldan/TinyStories from the Hugging Face Hub (Parquet, ~1 GB), BPE 8192
  fineweb_edu       HuggingFaceFW/fineweb-edu sample-10BT (14 Parquet files, ~28 GB; --max_shards N), GPT-2's
                    tokenizer when its files are in the Hugging Face cache, else BPE 32768
  minimind          jingyaogong/minimind_dataset pretrain_hq.jsonl (~1.6 GB), BPE 6400; its SFT conversations
                    (sft_mini_512.jsonl) are read by `diyllm sft sft_minimind` straight from the Hub cache

The Hub recipes download through huggingface_hub into its cache (see diyllm.data.hub); offline, pass
--input PATH (a file, folder or glob of local copies) or set HF_HUB_OFFLINE=1 with a filled cache.

tinyshakespeare is downloaded once from its public URL into ~/.cache/diyllm (or $DIYLLM_CACHE) with a
short timeout; offline, pass --input PATH to a local copy.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sysconfig
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diyllm.errors import UserError

TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
DOWNLOAD_TIMEOUT_S = 10.0
_EXCLUDED_STDLIB_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    inputs: Callable[[argparse.Namespace | None], list[str]]
    defaults: dict[str, Any] = field(default_factory=dict)


def pystdlib_files(root: str | os.PathLike | None = None) -> list[str]:
    """Sorted .py files of the standard library (without test suites or installed packages)."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    files = []
    for f in base.rglob("*.py"):
        rel = f.relative_to(base).parts
        if not any(p in _EXCLUDED_STDLIB_DIRS or p.startswith(".") for p in rel[:-1]) and f.is_file():
            files.append(str(f))
    if not files:
        raise UserError(f"no .py files found under the standard library folder {base}")
    return sorted(files)


def cache_dir() -> Path:
    return Path(os.environ.get("DIYLLM_CACHE", Path.home() / ".cache" / "diyllm"))


def download(url: str, dest: Path, timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Fetch `url` to `dest` (atomically) unless it is already there; a clear error when offline."""
    if dest.is_file() and dest.stat().st_size > 0:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    shutil.copyfileobj(resp, f)
                os.replace(tmp, dest)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise UserError(
            f"could not download {url} ({exc}); are you offline? Pass --input PATH to a local copy instead"
        ) from None
    return dest


def _shakespeare_inputs(args: argparse.Namespace | None) -> list[str]:
    local = getattr(args, "input", None) if args is not None else None
    if local:
        if not Path(local).is_file():
            raise UserError(f"--input {local} not found")
        return [local]
    return [str(download(TINYSHAKESPEARE_URL, cache_dir() / "tinyshakespeare.txt"))]


def _hub_inputs(source: str) -> Callable[[argparse.Namespace | None], list[str]]:
    """Inputs of a Hub recipe: --input (local copies) when given, else the hf: source (resolved by prepare)."""

    def inputs(args: argparse.Namespace | None) -> list[str]:
        local = getattr(args, "input", None) if args is not None else None
        if local:
            return [local]
        return [source]

    return inputs


RECIPES: dict[str, Recipe] = {
    "pystdlib": Recipe(
        "pystdlib",
        "Python standard library source, one document per .py file",
        lambda args: pystdlib_files(),
        {"tokenizer_kind": "bpe", "vocab_size": 4096},
    ),
    "shakespeare": Recipe(
        "shakespeare", "tinyshakespeare with a BPE tokenizer", _shakespeare_inputs,
        {"tokenizer_kind": "bpe", "vocab_size": 2048},
    ),
    "shakespeare_bpe512": Recipe(
        "shakespeare_bpe512", "tinyshakespeare with a 512-token BPE tokenizer (the speedrun's)", _shakespeare_inputs,
        {"tokenizer_kind": "bpe", "vocab_size": 512},
    ),
    "shakespeare_char": Recipe(
        "shakespeare_char", "tinyshakespeare, one token per character", _shakespeare_inputs, {"tokenizer_kind": "char"}
    ),
    "tinystories": Recipe(
        "tinystories", "TinyStories (short stories in simple English), Parquet from the Hub",
        _hub_inputs("hf:roneneldan/TinyStories/data/train-*.parquet"),
        {"tokenizer_kind": "bpe", "vocab_size": 8192, "text_field": "text"},
    ),
    "fineweb_edu": Recipe(
        "fineweb_edu", "FineWeb-Edu sample-10BT (educational web pages), Parquet from the Hub",
        _hub_inputs("hf:HuggingFaceFW/fineweb-edu/sample/10BT/*.parquet"),
        {"tokenizer_kind": "bpe", "vocab_size": 32768, "text_field": "text", "tokenizer": "gpt2-if-cached"},
    ),
    "minimind": Recipe(
        "minimind", "MiniMind pretraining text (Chinese and English), JSONL from the Hub",
        _hub_inputs("hf:jingyaogong/minimind_dataset/pretrain_hq.jsonl"),
        {"tokenizer_kind": "bpe", "vocab_size": 6400, "text_field": "text"},
    ),
}


def resolve_recipe(recipe: Recipe, args: argparse.Namespace | None = None) -> tuple[list[str], dict[str, Any]]:
    """(input files, prepare_dataset keyword defaults) for a recipe."""
    if args is not None and getattr(args, "input", None) and recipe.name == "pystdlib":
        raise UserError("--input is not used by the pystdlib recipe (it reads this machine's standard library)")
    return recipe.inputs(args), dict(recipe.defaults)
