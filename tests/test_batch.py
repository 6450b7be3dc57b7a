"""get_batch: random windows, shifted targets, memmap input, reproducibility."""

import numpy as np
import pytest
import torch

from diyllm.data.batch import get_batch


def test_windows_are_contiguous_and_shifted_by_one(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16)
    path = tmp_path / "train.bin"
    tokens.tofile(path)
    data = np.memmap(path, dtype=np.uint16, mode="r")
    x, y = get_batch(data, 16, 32, "cpu", generator=np.random.default_rng(0))
    assert x.shape == y.shape == (16, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(16, 31, dtype=torch.int64))
    assert int(y.max()) <= 999 and int(x.min()) >= 0


def test_seeded_generator_is_reproducible_and_covers_the_data():
    data = np.arange(50)
    a = get_batch(data, 4, 8, generator=np.random.default_rng(7))
    b = get_batch(data, 4, 8, generator=np.random.default_rng(7))
    assert torch.equal(a[0], b[0])
    starts = {int(get_batch(data, 1, 8)[0][0, 0]) for _ in range(400)}
    assert starts == set(range(0, 42))  # every valid start (0..n-T-1) is possible


def test_tensor_input_and_too_short_data():
    x, y = get_batch(torch.arange(20), 3, 4)
    assert torch.equal(y, x + 1)
    with pytest.raises(ValueError, match="context_length \\+ 1 = 11"):
        get_batch(np.arange(10), 2, 10)
