"""Scores from log-likelihoods and generations, with lm-eval's definitions.

* acc: the choice with the highest summed log-likelihood is the gold one (first one on ties, as np.argmax).
* acc_norm: the same after dividing each log-likelihood by the choice's length in *characters* (the
  choice text as doc_to_choice gives it, without the " " target delimiter), lm-eval's acc_norm.
* stderr of a mean of per-item scores: sample standard deviation (n - 1) / sqrt(n), lm-eval's mean_stderr.
* centred accuracy (CORE-style, as in DCLM / nanochat): (acc - chance) / (1 - chance), 0 for guessing and
  1 for perfect, so tasks with 2 and 4 choices can be averaged into one number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value, the first one on ties (what np.argmax returns)."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def choose(lls: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """(prediction by log-likelihood, prediction by log-likelihood per character)."""
    return argmax(lls), argmax([ll / max(1, len(c)) for ll, c in zip(lls, choices)])


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def mean_stderr(values: Sequence[float]) -> float | None:
    """Standard error of the mean, sample std (ddof=1) / sqrt(n); None for fewer than two values."""
    n = len(values)
    if n < 2:
        return None
    mu = mean(values)
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def centred_accuracy(acc: float, chance: float) -> float:
    """(acc - chance) / (1 - chance): 0 at chance level, 1 when every answer is right."""
    if not 0 <= chance < 1:
        raise ValueError(f"chance must be in [0, 1), got {chance}")
    return (acc - chance) / (1 - chance)


def core_score(centred: Sequence[float]) -> float:
    """The CORE-style summary: the mean of the tasks' centred accuracies."""
    return mean(list(centred))


def perplexity(lls: Sequence[float]) -> float:
    """exp(-mean log-likelihood), lm-eval's "perplexity" aggregation for lambada."""
    return math.exp(-mean(lls))
