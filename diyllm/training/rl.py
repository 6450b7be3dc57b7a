"""RL with verifiable rewards (GRPO-style): the shared training loop with a rollout source.

  diyllm rl rl_synthetic --init_from=runs/sft_synthetic/best.pt --task=arithmetic
  diyllm rl rl_synthetic --init_from=SFT --data=prompts.jsonl --reward=my_rewards:score
  diyllm rl rl_synthetic --init_from=resume          # continue the RL run in out_dir

Each step samples rl_group_size completions for each of batch_size prompts with the current policy,
scores them (exact match against the reference answer, or `--reward=module:function`), and takes one
clipped policy-gradient step on the group-normalised advantages (+ rl_kl_coef · KL to the start model).
--task: arithmetic (single-digit additions) or any synthetic task (capital, add, reverse, spell, count,
comma-separated, or "all"); --data: conversations JSONL whose last assistant message is the reference
answer (~5% held out, or val_data). Logged: reward, kl, length; at each eval val_pass@1 (greedy reward
on held-out prompts) and val_loss = 1 − val_pass@1. See docs/post_training.md.
"""

from __future__ import annotations

import argparse
from typing import Any

ACCEPTS_OVERRIDES = True
TASK_ALIASES = {"arithmetic": ("add",)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", default=None, help="a TOML file or the name of a shipped config")
    parser.add_argument("--task", default=None, help="arithmetic, a synthetic task list (capital,add,...) or all")
    parser.add_argument("--data", default=None, help="prompt conversations JSONL (instead of --task)")
    parser.add_argument("--reward", default="exact_match", help="exact_match or module:function / file.py:function")
    parser.add_argument("--prompts", type=int, default=2000, help="--task: synthetic prompts to generate")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def task_prompts(task: str, n_train: int, n_val: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Synthetic prompt conversations for `task`: held-out prompts are questions (any phrasing) that the
    RL prompts never contain, so val_pass@1 measures prompts RL did not train on."""
    import random

    from diyllm.data.synthetic import TASKS, generate_conversations
    from diyllm.errors import UserError

    tasks = TASK_ALIASES.get(task) or (TASKS if task == "all" else tuple(t.strip() for t in task.split(",")))
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise UserError(f"--task={task}: unknown task {unknown[0]!r}; use arithmetic, all or some of {TASKS}")
    pool = generate_conversations(n_train + 20 * n_val, seed, tasks, system=False)
    questions = sorted({c["conversations"][-2]["content"] for c in pool})
    random.Random(seed).shuffle(questions)
    held_out = set(questions[: min(n_val, len(questions) // 4)])
    train = [c for c in pool if c["conversations"][-2]["content"] not in held_out][:n_train]
    val, seen = [], set()
    for c in pool:
        q = c["conversations"][-2]["content"]
        if q in held_out and q not in seen:
            seen.add(q)
            val.append(c)
    return train, val


def file_prompts(cfg: Any, data: str) -> tuple[list[dict], list[dict]]:
    from diyllm.data.sft import read_conversations

    def wrap(convs):
        return [{"conversations": c} for c in convs]

    val, field = getattr(cfg, "val_data", ""), getattr(cfg, "conversations_field", "conversations")
    return (wrap(read_conversations(data, None if val else "train", field)),
            wrap(read_conversations(val or data, None if val else "val", field)))


def prepare_rl(cfg: Any, task: str | None = None, data: str | None = None, reward: str = "exact_match",
               n_prompts: int = 2000, n_val: int = 0) -> dict[str, Any]:
    """Everything `train` needs for an RL run: cfg, rollout source, model, objective."""
    from diyllm.errors import UserError
    from diyllm.training.finetune import prepare_policy, start_spec, trainer_cfg
    from diyllm.training.post_objectives import GRPOObjective
    from diyllm.training.rewards import load_reward
    from diyllm.training.rollouts import RolloutSource

    if (task is None) == (data is None):
        raise UserError("rl needs prompts: pass --task=arithmetic (or another synthetic task) or --data=FILE.jsonl")
    reward_fn = load_reward(reward)
    spec = start_spec(cfg)
    model, tok, setup, reference = prepare_policy(cfg, spec, need_reference=True)
    cfg = trainer_cfg(cfg, model)
    if task:
        train, val = task_prompts(task, n_prompts, n_val or max(20, n_prompts // 10), cfg.seed)
    else:
        train, val = file_prompts(cfg, data)
    source = RolloutSource(tok, train, val, reward_fn, cfg.rl_group_size, cfg.rl_max_new_tokens, cfg.rl_temperature,
                           cfg.seed, model.config.context_length)
    print(f"RL from {spec}: {len(source.items['train'])} train / {len(source.items['val'])} held-out prompts, "
          f"{cfg.rl_group_size} completions each, reward {reward}; {setup.describe()}")
    objective = GRPOObjective(reference, cfg.rl_clip_eps, cfg.rl_kl_coef)
    return {"cfg": cfg, "source": source, "model": model, "objective": objective, "setup": setup, "start": spec}


def run(args: argparse.Namespace) -> int:
    from diyllm.training.finetune import run_post_command

    return run_post_command(args, lambda cfg: prepare_rl(cfg, args.task, args.data, args.reward, args.prompts))
