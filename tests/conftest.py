"""Shared test fixtures. Everything runs on CPU; the shared corpora are optional."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DIYLLM_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are bound by per-op overhead; on a shared CPU extra threads only add contention.
    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def shared_data() -> Path:
    """../shared/data (tinyshakespeare.txt, corpus.en) when present; the test is skipped otherwise."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} not present")
    return SHARED_DATA


@pytest.fixture
def tiny_config():
    from diyllm.model import DIYConfig

    return DIYConfig(vocab_size=97, context_length=32, d_model=64, num_layers=2, num_heads=4, d_ff=128)


@pytest.fixture
def tiny_char_checkpoint(tmp_path):
    """(model, tokenizer, path): a 1-layer model on the characters "abcdefgh \\n", saved with its tokenizer
    as the single-file checkpoint `diyllm sample` reads."""
    from diyllm.model import DIYConfig, DIYForCausalLM
    from diyllm.tokenizers import CharTokenizer
    from diyllm.training.checkpoint import save_checkpoint

    tok = CharTokenizer("abcdefgh \n")
    tok.save(tmp_path / "tokenizer.json")
    torch.manual_seed(0)
    m = DIYForCausalLM(DIYConfig(vocab_size=tok.vocab_size, context_length=32, d_model=32, num_layers=1,
                                 num_heads=2, d_ff=64))
    path = tmp_path / "best.pt"
    save_checkpoint(m, None, 0, path, model_config=m.config.to_dict(),
                    tokenizer=(tmp_path / "tokenizer.json").read_text())
    return m, tok, path
