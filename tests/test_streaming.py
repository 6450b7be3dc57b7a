"""The streaming JSONL dataset: exact-once sharding over workers x ranks, shuffling, packing, resume."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from diyllm.data.streaming import StreamingJsonlDataset, endless_batches, shuffle_buffer

pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(tmp_path, sizes=(7, 13, 1, 9)):
    from diyllm.tokenizers import BPETokenizer

    tok = BPETokenizer({i: bytes([i]) for i in range(256)}, [], special_tokens=["<|endoftext|>"])
    tok.save(tmp_path / "tok.json")
    texts = []
    for f, n in enumerate(sizes):
        lines = [f"file{f}-doc{i}" for i in range(n)]
        texts += lines
        (tmp_path / f"part{f}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    return tok, texts


def _rows(ds, num_workers):
    loader = DataLoader(ds, batch_size=None, num_workers=num_workers)  # rows one by one
    return [(x, y, m) for x, y, m in loader]


def test_two_workers_times_two_ranks_cover_every_document_exactly_once(tmp_path):
    tok, texts = _setup(tmp_path)
    seen = []
    for rank in range(2):
        ds = StreamingJsonlDataset(tmp_path, str(tmp_path / "tok.json"), context_length=32, mode="pad",
                                   rank=rank, world_size=2, shuffle_buffer=4, seed=3)
        for x, y, m in _rows(ds, num_workers=2):
            n = int(m.sum())
            seq = [int(x[0])] + y[:n].tolist()
            seen.append(tok.decode([t for t in seq if t != tok.eot_id]))
    assert Counter(seen) == Counter(texts)  # none twice, none skipped


def test_packed_stream_keeps_every_token_once_across_shards(tmp_path):
    tok, texts = _setup(tmp_path)
    targets = Counter()
    for rank in range(2):
        ds = StreamingJsonlDataset(str(tmp_path / "*.jsonl"), tok, context_length=8, mode="pack",
                                   rank=rank, world_size=2, shuffle_buffer=3)
        for _, y, m in _rows(ds, num_workers=2):
            targets.update(y[m > 0].tolist())
    # each shard's stream loses only its very first token as a target (it has no predecessor)
    all_tokens = Counter(t for text in texts for t in tok.encode(text) + [tok.eot_id])
    missing = all_tokens - targets
    assert not (targets - all_tokens)
    assert sum(missing.values()) == 4  # 2 ranks x 2 workers = 4 shard starts


def test_epochs_reshuffle_files_and_train_val_split_partition_the_documents(tmp_path):
    tok, texts = _setup(tmp_path, sizes=(30, 30, 30))
    ds = StreamingJsonlDataset(tmp_path, tok, 16, mode="pad", shuffle_buffer=1)
    orders = []
    for epoch in range(4):
        ds.set_epoch(epoch)
        orders.append(ds.file_order())
    assert len({tuple(o) for o in orders}) > 1
    train = list(StreamingJsonlDataset(tmp_path, tok, 16, split="train").iter_documents())
    val = list(StreamingJsonlDataset(tmp_path, tok, 16, split="val").iter_documents())
    assert sorted(train + val) == sorted(texts) and val and not set(train) & set(val)


def test_shuffle_buffer_is_a_bounded_permutation():
    rng = np.random.default_rng(0)
    out = list(shuffle_buffer(iter(range(100)), 10, rng))
    assert sorted(out) == list(range(100)) and out != list(range(100))
    # with a buffer of 10, item i cannot come out before position i - 10
    assert all(pos >= item - 10 for pos, item in enumerate(out))


def test_endless_batches_skip_resumes_the_same_stream(tmp_path):
    tok, _ = _setup(tmp_path)
    ds = StreamingJsonlDataset(tmp_path, tok, 8, mode="pack", seed=1)
    it = endless_batches(ds, 4)
    batches = [next(it) for _ in range(12)]  # crosses epoch boundaries
    resumed = endless_batches(StreamingJsonlDataset(tmp_path, tok, 8, mode="pack", seed=1), 4, skip=5)
    for want in batches[5:]:
        got = next(resumed)
        assert all(torch.equal(w, g) for w, g in zip(want, got))
