"""RL pieces: reward loading and errors, the rollout source's masks, advantages and exact resume."""

from __future__ import annotations

import pytest
import torch

from diyllm.errors import UserError
from diyllm.training.rewards import exact_match_reward, load_reward, score

pytestmark = pytest.mark.usefixtures("one_thread")


def test_reward_functions_load_by_name_and_failures_name_the_prompt(tmp_path):
    assert load_reward("exact_match") is exact_match_reward
    assert exact_match_reward("q", " 8. ", "8") == 1.0 and exact_match_reward("q", "9", "8") == 0.0
    (tmp_path / "myreward.py").write_text(
        "def length(prompt, completion, answer):\n    return len(completion)\n"
        "def broken(prompt, completion, answer):\n    raise KeyError('oops')\n"
        "def text(prompt, completion, answer):\n    return 'good'\n")
    fn = load_reward(f"{tmp_path / 'myreward.py'}:length")
    assert score(fn, ["p1", "p2"], ["ab", "abcd"], [None, None]) == [2.0, 4.0]
    with pytest.raises(UserError, match=r"raised KeyError.*prompt 'What is 2 \+ 2\?'"):
        score(load_reward(f"{tmp_path / 'myreward.py'}:broken"), ["What is 2 + 2?"], ["4"], ["4"])
    with pytest.raises(UserError, match="returned 'good'.*prompt 'p'"):
        score(load_reward(f"{tmp_path / 'myreward.py'}:text"), ["p"], ["4"], ["4"])
    with pytest.raises(UserError, match="no function 'nope'"):
        load_reward(f"{tmp_path / 'myreward.py'}:nope")
    with pytest.raises(UserError, match="could not import"):
        load_reward("no_such_module_xyz:f")


def _source(seed=0, group=4):
    from diyllm.data.chat_template import add_chat_tokens
    from diyllm.data.synthetic import make_splits
    from diyllm.model import DIYConfig, DIYForCausalLM
    from diyllm.tokenizers import BPETokenizer
    from diyllm.training.rollouts import RolloutSource

    tok = BPETokenizer({i: bytes([i]) for i in range(256)}, [], special_tokens=["<|endoftext|>"])
    add_chat_tokens(tok)
    train, val = make_splits(40, 8, seed=0, tasks=("add",), system=False)
    src = RolloutSource(tok, train, val, exact_match_reward, group_size=group, max_new_tokens=6, temperature=1.0,
                        seed=seed, context_length=64)
    torch.manual_seed(0)
    src.attach_model(DIYForCausalLM(DIYConfig(vocab_size=tok.vocab_size, context_length=64, d_model=32,
                                              num_layers=1,
                                              num_heads=2)))
    return src, tok


def test_rollout_batches_mask_the_completion_and_resume_exactly():
    src, tok = _source()
    state = src.state_dict()
    b = src.get_batch("train", 3, "cpu")
    assert b.x.shape[0] == 12 and b.advantages.shape == (12,)
    end = tok.special_token_id("<|im_end|>")
    for i in range(12):
        completion = b.y[i][b.mask[i] > 0].tolist()
        assert len(completion) == b.lengths[i]
        assert end not in completion[:-1]  # at most one end token, the last
        prompt_part = tok.decode(b.x[i][: int((b.mask[i] > 0).nonzero()[0]) + 1].tolist())
        assert prompt_part.endswith("<|im_start|>assistant\n")
    groups = b.advantages.view(3, 4)
    assert groups.sum(1).abs().max() < 1e-4  # normalised within each group
    again = src.get_batch("train", 3, "cpu")
    src.load_state_dict(state)
    torch.testing.assert_close(src.get_batch("train", 3, "cpu").x, b.x)
    torch.testing.assert_close(src.get_batch("train", 3, "cpu").x, again.x)
    with pytest.raises(UserError, match="at least 2"):
        _source(group=1)
