"""Reward functions for RL with verifiable rewards, and the group-normalised advantages GRPO uses.

A reward function is any Python callable

    reward(prompt: str, completion: str, answer: str | None) -> float

named on the command line as `module:function` (the module must be importable: on PYTHONPATH or a
file path `path/to/file.py:function`). The built-in `exact_match` scores 1.0 when the completion equals
the reference answer (case, surrounding spaces and a final period ignored), else 0.0.

A reward that raises or returns a non-number stops the run with an error that shows the prompt and the
completion that caused it: a silently wrong reward would train the model towards garbage.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
from collections.abc import Callable, Sequence

import torch

from diyllm.errors import UserError
from diyllm.generation.exact_match import normalise

RewardFn = Callable[[str, str, "str | None"], float]


def exact_match_reward(prompt: str, completion: str, answer: str | None) -> float:
    """1.0 if the completion is the answer (normalised as diyllm.data.synthetic.exact_match does)."""
    return float(answer is not None and normalise(completion) == normalise(answer))


BUILTIN_REWARDS: dict[str, RewardFn] = {"exact_match": exact_match_reward}


def load_reward(spec: str) -> RewardFn:
    """The reward function named by `spec`: a built-in name, "module:function" or "file.py:function"."""
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    module_name, sep, fn_name = spec.rpartition(":")
    if not sep or not module_name or not fn_name:
        raise UserError(f"--reward={spec!r}: use a built-in ({', '.join(BUILTIN_REWARDS)}) or module:function")
    try:
        if module_name.endswith(".py"):
            if not os.path.isfile(module_name):
                raise UserError(f"--reward={spec!r}: file {module_name} does not exist")
            loader_spec = importlib.util.spec_from_file_location("diyllm_user_reward", module_name)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's module
        raise UserError(f"--reward={spec!r}: could not import {module_name} ({type(exc).__name__}: {exc})") from exc
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise UserError(f"--reward={spec!r}: {module_name} has no function {fn_name!r}")
    return fn


def score(reward: RewardFn, prompts: Sequence[str], completions: Sequence[str],
          answers: Sequence[str | None]) -> list[float]:
    """reward(prompt, completion, answer) for every row, as floats; a failure names the prompt."""
    out = []
    for prompt, completion, answer in zip(prompts, completions, answers):
        try:
            value = reward(prompt, completion, answer)
        except Exception as exc:  # noqa: BLE001 - report whatever the user's function raised
            raise UserError(f"reward function {getattr(reward, '__name__', reward)!r} raised "
                            f"{type(exc).__name__}: {exc} for prompt {prompt!r} (completion {completion!r})") from exc
        if not isinstance(value, (int, float)) or not math.isfinite(float(value)):
            raise UserError(f"reward function {getattr(reward, '__name__', reward)!r} returned {value!r} "
                            f"(a finite number is required) for prompt {prompt!r} (completion {completion!r})")
        out.append(float(value))
    return out


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(P, G) rewards of G completions per prompt -> (P, G) advantages (r − mean_group) / (std_group + eps).

    Each completion is judged against its siblings: a group where all completions score the same
    teaches nothing (advantage 0). std is the population std of the group.
    """
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True, unbiased=False)
    return (rewards - mean) / (std + eps)
