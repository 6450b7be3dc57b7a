"""Where training batches come from: the `BatchSource` protocol and the prepared-`.bin` implementation.

The training loop never looks at files. It asks a source for `(x, y, loss_mask)` batches of one split and
for its state (so a resumed run draws exactly the batches the uninterrupted run would have drawn).
Pretraining on a prepared folder (`MemmapSource`), pretraining on JSONL text and supervised fine-tuning
on conversations are three sources behind the same loop; `make_source(cfg)` picks one from
`cfg.data_format`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch

from diyllm.errors import UserError

if TYPE_CHECKING:
    from diyllm.training.config import TrainConfig

SPLITS = ("train", "val")
TOKEN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32, "int32": np.int32, "int64": np.int64}


@runtime_checkable
class BatchSource(Protocol):
    """What the trainer needs from a dataset.

    get_batch(split, batch_size, device) -> (x, y, loss_mask):
        x, y: (B, T) int64 on `device`; y[t] is the token after x[t], or -100 where there is no target.
        loss_mask: (B, T) (1 = train on this target) or None (= every target counts).
        split is "train" or "val". Each split draws from its own random stream, so evaluating never
        changes which training batches come next.
    state_dict() / load_state_dict(state): everything needed to continue the exact same batch sequence
        (e.g. numpy Generator `bit_generator.state`s, epoch and position counters). Plain Python types
        and tensors only: the state goes into a checkpoint loaded with weights_only=True.
    vocab_size, context_length: of the data (the model is built to match).
    tokenizer: the tokenizer object (saved into checkpoints) or None.
    bytes_per_token: mean UTF-8 bytes per token of the val split, for bits-per-byte; None if unknown.

    Optional: set_rank(rank, world_size) — called under DDP so each rank draws different batches.
    """

    vocab_size: int
    context_length: int
    tokenizer: Any
    bytes_per_token: float | None

    def get_batch(
        self, split: str, batch_size: int, device: torch.device | str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class MemmapSource:
    """Windows from a prepared folder (sharded or single-file; see diyllm.data.dataset / shards).

    The dataset is validated on open (sizes vs manifest, dtype, ids < vocab, non-empty splits; with
    `verify_data`, each shard's SHA-256, hashed once per change) and its shards memory-mapped, so only
    sampled windows are read; `TokenBatcher` draws random or
    document-aligned windows with one numpy Generator per split, whose state is the whole data state.
    """

    def __init__(self, data_dir: str | os.PathLike, context_length: int, seed: int = 1337, rank: int = 0,
                 batch_sampling: str = "random", verify_data: bool = True, progress: bool = True):
        from diyllm.data.dataset import open_dataset
        from diyllm.data.shards import TokenBatcher

        self.data_dir = Path(data_dir)
        self.context_length = int(context_length)
        self.seed = int(seed)
        dataset = open_dataset(self.data_dir, require_val=True, min_tokens=self.context_length + 1,
                               verify_checksums=verify_data, progress=progress and rank == 0)
        self.meta, self.vocab_size = dataset.meta, dataset.vocab_size
        self.splits = {s: dataset.split(s) for s in SPLITS}
        self.batcher = TokenBatcher(dataset.splits, self.context_length, self.seed, rank, batch_sampling)
        tok_path = self.data_dir / str(self.meta.get("tokenizer_file", "tokenizer.json"))
        self.tokenizer_path = tok_path if tok_path.exists() else None
        self.tokenizer = load_tokenizer_file(tok_path) if tok_path.exists() else None
        self.bytes_per_token = estimate_bytes_per_token(self.tokenizer, self.splits["val"], self.meta)
        self.rank = int(rank)

    def set_rank(self, rank: int, world_size: int) -> None:
        """(Re)seed the per-split generators for this rank; world_size is unused (random windows)."""
        self.rank = int(rank)
        self.batcher.set_rank(rank)

    @property
    def generators(self) -> dict[str, np.random.Generator]:
        return self.batcher.generators

    def get_batch(self, split: str, batch_size: int, device: torch.device | str):
        x, y = self.batcher.get_batch(split, batch_size, device)
        return x, y, None

    def state_dict(self) -> dict:
        return {"kind": "memmap", **self.batcher.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.batcher.load_state_dict(state)


def load_tokenizer_file(path: Path) -> Any:
    """The tokenizer saved beside the data, or None (with a warning) if the tokenizer package cannot read it."""
    try:
        from diyllm.tokenizers import load_tokenizer

        return load_tokenizer(path)
    except ImportError as exc:
        warnings.warn(f"cannot load {path} ({exc}); training without a tokenizer", stacklevel=2)
        return None


def estimate_bytes_per_token(
    tokenizer: Any, tokens: np.ndarray, meta: dict, max_tokens: int = 5_000_000
) -> float | None:
    """Mean UTF-8 bytes per token over (a prefix of) `tokens`, weighting each id by its byte length.

    This is what turns a per-token loss into bits per byte, the measure that lets a character model and
    a BPE model be compared on the same text. Falls back to meta.json's "bytes_per_token" if present.
    """
    if meta.get("bytes_per_token"):
        return float(meta["bytes_per_token"])
    if tokenizer is None or not hasattr(tokenizer, "token_bytes"):
        return None
    sample = np.asarray(tokens[:max_tokens]).astype(np.int64)
    if sample.size == 0:
        return None
    counts = np.bincount(sample)
    if hasattr(tokenizer, "token_byte_lengths"):
        lengths = np.asarray(tokenizer.token_byte_lengths(), dtype=np.float64)[: len(counts)]
    else:
        lengths = np.zeros(len(counts))
        for i in np.nonzero(counts)[0]:
            try:
                lengths[i] = len(tokenizer.token_bytes(int(i)))
            except (KeyError, IndexError, ValueError):
                lengths[i] = 0.0
    counts = counts[: len(lengths)]
    total_bytes = float((counts * lengths).sum())
    return total_bytes / sample.size if total_bytes > 0 else None


def make_source(cfg: TrainConfig, rank: int = 0, world_size: int = 1) -> BatchSource:
    """The data source for cfg.data_format: "bin" (prepared folder), "jsonl" (raw text), "sft" (chats).

    "auto" picks "bin" for a folder with meta.json and "jsonl" for a .jsonl file.
    """
    fmt = resolve_data_format(cfg)
    if fmt == "bin":
        return MemmapSource(cfg.data_dir, cfg.context_length, seed=cfg.seed, rank=rank,
                            batch_sampling=getattr(cfg, "batch_sampling", "random"),
                            verify_data=getattr(cfg, "verify_data", True), progress=getattr(cfg, "progress", True))
    # Other sources are owned by the data engineers and imported only when used.
    if fmt == "jsonl":
        from diyllm.data.jsonl import JsonlPretrainSource

        source = JsonlPretrainSource.from_config(cfg)
    elif fmt == "sft":
        from diyllm.data.sft import SFTSource

        source = SFTSource.from_config(cfg)
    else:
        raise UserError(f"unknown data_format {cfg.data_format!r}; use auto, bin, jsonl or sft")
    if world_size > 1 and hasattr(source, "set_rank"):
        source.set_rank(rank, world_size)
    return source


def resolve_data_format(cfg: TrainConfig) -> str:
    if cfg.data_format != "auto":
        return cfg.data_format
    path = Path(cfg.data_dir)
    if path.is_dir() and (path / "meta.json").exists():
        return "bin"
    if path.suffix == ".jsonl" or (path.is_dir() and any(path.glob("*.jsonl"))):
        return "jsonl"
    return "bin"
