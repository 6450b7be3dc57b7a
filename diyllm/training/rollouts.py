"""The rollout source of RL: prompts -> sampled completions -> rewards -> (sequence, advantage) batches.

Each `get_batch("train", P, device)` takes the next P prompts (seeded order, each once per epoch),
samples `group_size` completions for each with the current policy (the KV-cache generator, batched,
temperature > 0), scores them with the reward function and returns a `RolloutBatch`: the P·G sequences
prompt + completion (right-padded), the loss mask on the completion tokens (including the <|im_end|>
that ended it, so stopping is learned too) and the group-normalised advantages.

Exact resume: the state is the prompt position plus the number of rollouts drawn; the sampler of
rollout k is seeded with (seed, k), so a resumed run samples the same completions as an uninterrupted
one. "val" batches are the held-out prompts, decoded greedily (pass@1 = mean exact-match reward).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from diyllm.data.chat_template import IM_END, encode_chat
from diyllm.data.jsonl import IGNORE_INDEX, EpochRows
from diyllm.errors import UserError
from diyllm.generation.generate import generate
from diyllm.training.rewards import RewardFn, group_advantages, score


class RolloutBatch(NamedTuple):
    x: torch.Tensor  # (N, T) inputs
    y: torch.Tensor  # (N, T) next tokens, -100 on padding
    mask: torch.Tensor  # (N, T) 1 on completion tokens
    advantages: torch.Tensor  # (N,)
    rewards: torch.Tensor  # (N,)
    lengths: torch.Tensor  # (N,) completion tokens


class RolloutSource:
    """BatchSource of RolloutBatch for RL (see the module docstring).

    prompts / val_prompts: dicts {"conversations": [... , last = reference answer], ...} as made by
    diyllm.data.synthetic; the prompt is every message but the last, the answer the last one's content.
    `policy` (the model being trained) is set by the loop through attach_model before the first batch.
    """

    def __init__(self, tokenizer: Any, prompts: Sequence[dict], val_prompts: Sequence[dict], reward: RewardFn,
                 group_size: int = 8, max_new_tokens: int = 16, temperature: float = 1.0, seed: int = 0,
                 context_length: int = 256):
        if group_size < 2:
            raise UserError(f"rl_group_size must be at least 2 (advantages compare completions), got {group_size}")
        if temperature <= 0:
            raise UserError(f"rl_temperature must be > 0 (greedy rollouts of one prompt are all identical), "
                            f"got {temperature}")
        self.tokenizer, self.tokenizer_path = tokenizer, None
        self.vocab_size, self.context_length, self.bytes_per_token = int(tokenizer.vocab_size), context_length, None
        self.reward, self.group_size, self.max_new_tokens = reward, int(group_size), int(max_new_tokens)
        self.temperature, self.seed = float(temperature), int(seed)
        self.end_id = tokenizer.special_token_id(IM_END)
        self.policy: nn.Module | None = None
        self.rank, self.world_size = 0, 1
        self.items = {"train": self._encode(prompts, "train"), "val": self._encode(val_prompts, "val")}
        index = {s: np.arange(len(v), dtype=np.int64) for s, v in self.items.items()}
        self.order = {s: EpochRows(index[s], index[s], index[s], self.seed * 2 + (s == "val")) for s in index}
        self.rollouts = 0
        self.last_stats: dict[str, float] = {}

    def _encode(self, convs: Sequence[dict], split: str) -> list[tuple[list[int], str, str | None]]:
        out = []
        for c in convs:
            messages = c["conversations"]
            prompt, answer = messages[:-1], messages[-1]["content"] if messages[-1]["role"] == "assistant" else None
            if answer is None:
                prompt = messages
            ids = encode_chat(self.tokenizer, prompt, add_generation_prompt=True)[0]
            if len(ids) + self.max_new_tokens > self.context_length:
                continue
            out.append((ids, prompt[-1]["content"], answer))
        if not out:
            raise UserError(f"no {split} prompts fit context_length={self.context_length} with "
                            f"rl_max_new_tokens={self.max_new_tokens}")
        return out

    def set_rank(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = int(rank), int(world_size)

    def attach_model(self, model: nn.Module) -> None:
        """The training loop hands over the policy it trains (the plain module) before the first step."""
        self.policy = model

    def sample(self, model: nn.Module, prompt_ids: list[list[int]], temperature: float, seed: int | None
               ) -> tuple[list[list[int]], list[bool]]:
        """Completions and whether each one ended with <|im_end|> (kept at its end then)."""
        outs = generate(model, prompt_ids, self.max_new_tokens, temperature=temperature, stop_ids=[self.end_id],
                        seed=seed)
        stopped = [len(o) < self.max_new_tokens for o in outs]
        return [o + [self.end_id] if s else o for o, s in zip(outs, stopped)], stopped

    def get_batch(self, split: str, batch_size: int, device) -> RolloutBatch:
        if self.policy is None:
            raise RuntimeError("RolloutSource has no policy: the training loop calls attach_model(model) first")
        take = self.order[split].take(batch_size * self.world_size)[self.rank :: self.world_size]
        items = [self.items[split][int(i)] for i in take]
        G = self.group_size if split == "train" else 1
        prompts = [ids for ids, _, _ in items for _ in range(G)]
        if split == "train":
            seed = int(np.random.SeedSequence([self.seed, self.rollouts, self.rank]).generate_state(1)[0])
            self.rollouts += 1
            completions, _ = self.sample(self.policy, prompts, self.temperature, seed)
        else:
            completions, _ = self.sample(self.policy, prompts, 0.0, None)
        texts = [self.tokenizer.decode([t for t in c if t != self.end_id]) for c in completions]
        rewards = torch.tensor(score(self.reward, [q for _, q, _ in items for _ in range(G)], texts,
                                     [a for _, _, a in items for _ in range(G)]), dtype=torch.float32)
        adv = group_advantages(rewards.view(-1, G)).view(-1) if G > 1 else torch.zeros_like(rewards)
        batch = self._pack(prompts, completions, rewards, adv)
        self.last_stats = {"reward": float(rewards.mean()), "length": float(batch.lengths.float().mean())}
        return RolloutBatch(*(t.to(device) for t in batch))

    def _pack(self, prompts, completions, rewards, adv) -> RolloutBatch:
        seqs = [p + c for p, c in zip(prompts, completions)]
        T = max(1, max(len(s) for s in seqs) - 1)
        N = len(seqs)
        x = torch.zeros(N, T, dtype=torch.long)
        y = torch.full((N, T), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros(N, T)
        for i, (p, s) in enumerate(zip(prompts, seqs)):
            n = len(s) - 1
            x[i, :n] = torch.tensor(s[:-1])
            y[i, :n] = torch.tensor(s[1:])
            mask[i, len(p) - 1 : n] = 1.0  # targets that are completion tokens
        lengths = torch.tensor([len(c) for c in completions])
        return RolloutBatch(x, y, mask, adv, rewards, lengths)

    def state_dict(self) -> dict:
        return {"kind": "rollouts", "rollouts": self.rollouts, **{s: r.state_dict() for s, r in self.order.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.rollouts = int(state.get("rollouts", 0))
        for split, rows in self.order.items():
            if split in state:
                rows.load_state_dict(state[split])


def pass_at_1(model: nn.Module, tokenizer: Any, convs: Sequence[dict], reward: RewardFn,
              max_new_tokens: int = 16) -> float:
    """Mean reward of greedy replies to every conversation's prompt (exact match for the built-in reward)."""
    end = tokenizer.special_token_id(IM_END)
    prompts = [encode_chat(tokenizer, c["conversations"][:-1], add_generation_prompt=True)[0] for c in convs]
    outs = generate(model, prompts, max_new_tokens, temperature=0, stop_ids=[end])
    texts = [tokenizer.decode(o) for o in outs]
    rewards = score(reward, [c["conversations"][-2]["content"] for c in convs], texts,
                    [c["conversations"][-1]["content"] for c in convs])
    return sum(rewards) / max(1, len(rewards))
