"""Exact resume: what goes into a training checkpoint besides the weights, how it comes back, and the
checks that a checkpoint fits the run that wants to continue from it.

A checkpoint holds everything that decides what happens next, so N + N iterations equal 2N bit for bit:
the loop's counters (LoopState), every RNG (Python, NumPy, torch, CUDA) and the data source's position,
per rank under DDP, the GradScaler, the health monitor's window and the objective's state.
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diyllm.errors import UserError
from diyllm.model.config import SHAPE_FIELDS
from diyllm.training.distributed import DistInfo, gather_objects

# ---- RNGs ----------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = np_state["state"]["key"].tolist()  # weights_only loading takes no arrays
    state = {"python": random.getstate(), "numpy": np_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_to_tuple(state["python"]))
    np_state = copy.deepcopy(state["numpy"])
    np_state["state"]["key"] = np.asarray(np_state["state"]["key"], dtype=np.uint32)
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):  # fewer GPUs than when saved: keep fresh ones
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _to_tuple(x: Any) -> Any:
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# ---- saving ---------------------------------------------------------------------------------------------


def rank_entries(source: Any, dist: DistInfo) -> dict[str, Any]:
    """This rank's RNGs and data position, plus every rank's (a collective: every rank must call it)."""
    rank_state = {"rng": rng_state(), "data_state": source.state_dict()}
    all_ranks = gather_objects(rank_state, dist)
    return {"rng": rank_state["rng"], "data_state": rank_state["data_state"],
            "rank_states": all_ranks if dist.enabled else None}


def tokenizer_text(source: Any) -> str | None:
    """The tokenizer's JSON file text, embedded in checkpoints so they are self-contained."""
    path = getattr(source, "tokenizer_path", None)
    if path and os.path.exists(path):
        return Path(path).read_text(encoding="utf-8")
    tok = getattr(source, "tokenizer", None)
    if tok is None or not hasattr(tok, "save"):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "tokenizer.json")
        tok.save(out)
        return Path(out).read_text(encoding="utf-8")


# ---- restoring ------------------------------------------------------------------------------------------


def restore_data_position(ckpt: dict[str, Any], source: Any, dist: DistInfo, warn) -> None:
    """Put the data source where the checkpoint left it (this rank's stream under DDP)."""
    rank_states = ckpt.get("rank_states")
    if dist.enabled and rank_states and len(rank_states) == dist.world_size:
        source.load_state_dict(rank_states[dist.rank]["data_state"])
    elif dist.enabled:
        warn("the checkpoint was written with a different number of processes: data order and RNG "
             "streams start fresh (training continues, but not bit-exactly)")
    elif ckpt.get("data_state") is not None:
        source.load_state_dict(ckpt["data_state"])


def restore_rngs(ckpt: dict[str, Any], dist: DistInfo) -> None:
    """The RNGs as saved; call last, after everything that may draw random numbers (building, moving or
    compiling the model)."""
    rank_states = ckpt.get("rank_states")
    if dist.enabled:
        if rank_states and len(rank_states) == dist.world_size:
            set_rng_state(rank_states[dist.rank]["rng"])
    elif ckpt.get("rng"):
        set_rng_state(ckpt["rng"])


# ---- compatibility ----------------------------------------------------------------------------------------


def check_compatible(ckpt: dict[str, Any], model_config: Any, data_tokenizer: Any, where: str) -> None:
    """Refuse a checkpoint whose model shape or tokenizer differs from this run's, listing every difference."""
    from diyllm.checkpoints import tokenizer_from_text

    diffs = []
    if isinstance(ckpt.get("model_config"), dict) and model_config is not None:
        diffs += shape_differences(ckpt["model_config"], model_config)
    saved_tok = tokenizer_from_text(ckpt.get("tokenizer"), where) if ckpt.get("tokenizer") else None
    diffs += tokenizer_differences(saved_tok, data_tokenizer)
    if diffs:
        raise UserError(f"checkpoint {where} does not fit this run:\n  - " + "\n  - ".join(diffs)
                        + "\n(train a new model with init_from=scratch, or use matching settings/data)")


def shape_differences(saved: dict, current: Any) -> list[str]:
    now = current.to_dict()
    return [f"{k}: checkpoint {saved.get(k)!r} vs now {now[k]!r}" for k in SHAPE_FIELDS if saved.get(k) != now[k]]


def tokenizer_differences(saved: Any, current: Any) -> list[str]:
    """What makes two tokenizers incompatible for the same weights: size, special tokens, kind."""
    if saved is None or current is None:
        return []
    diffs = []
    if saved.vocab_size != current.vocab_size:
        diffs.append(f"tokenizer vocab_size: checkpoint {saved.vocab_size} vs data {current.vocab_size}")
    specials = [list(getattr(t, "special_tokens", None) or []) for t in (saved, current)]
    if specials[0] != specials[1]:
        diffs.append(f"special tokens: checkpoint {specials[0]} vs data {specials[1]}")
    kinds = [getattr(t, "kind", type(t).__name__) for t in (saved, current)]
    if kinds[0] != kinds[1]:
        diffs.append(f"tokenizer kind: checkpoint {kinds[0]} vs data {kinds[1]}")
    if not diffs and hasattr(saved, "token_bytes"):  # same size: do the ids mean the same strings?
        for i in range(saved.vocab_size):
            a, b = saved.token_bytes(i), current.token_bytes(i)
            if a != b:
                diffs.append(f"tokenizer vocabularies differ (first at id {i}: checkpoint {a!r} vs data {b!r})")
                break
    return diffs
