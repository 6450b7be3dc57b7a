"""`diyllm lab post-training`: pretrain -> SFT -> DPO (with LoRA) -> RL on the synthetic tasks, one table.

What each post-training stage adds, measured on held-out data after every stage:
 1. Pretrain a tiny byte-level model on plain sentences stating the synthetic facts (quick: the
    single-digit additions, "3 + 5 = 8.", so the tiny model knows enough sums for RL to sharpen).
 2. SFT on chat conversations whose answers are inconsistent: half say "X, I think." and the rest just
    "X" (demonstration data is often like that). The model learns the chat format and the facts, but
    often hedges, so exact match (which wants the bare answer) stays low.
 3. DPO with LoRA adapters (base frozen) on "format" preference pairs (the bare answer chosen over the
    hedged one): held-out preference accuracy goes to ~100% with a few thousand trained values, and
    since chosen and rejected share the answer, only the stopping changes: exact match rises.
 4. RL (GRPO) with the exact-match reward on arithmetic prompts the held-out set never contains (75
    held-out questions): the policy is rewarded whenever a sampled answer is bare and right. After DPO
    has fixed the format, what is left is the sums the model gets only sometimes right; gentle settings
    (rollouts at temperature 0.7, lr 1e-4, KL 0.1 to the DPO model) sharpen those without drifting
    on the ones it already gets right, so held-out exact match rises a little or holds (a larger learning rate
    without the KL term only reshuffled which near-miss sums were right, and lowered it).

Every stage is the one training loop with another batch source and objective. Prints one table and a
few answers side by side; writes report.json into the output folder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


def settings(quick: bool) -> dict[str, Any]:
    base = dict(d_model=64, num_layers=2, num_heads=4, context_length=96, batch_size=16, pretrain_docs=500,
                pretrain_iters=300, pretrain_lr=3e-3, sft_train=1000, sft_iters=150, sft_lr=2e-3, verbose=0.5,
                tasks=("add",), pref_train=600, pref_val=60, dpo_iters=30, dpo_lr=3e-4, dpo_beta=2.0, lora_rank=8,
                rl_tasks="arithmetic", rl_prompts=2000, rl_val=75, rl_iters=100, rl_lr=1e-4, rl_group=8, rl_batch=8,
                rl_temperature=0.7, rl_kl=0.1, rl_max_new_tokens=8)
    if quick:
        return base
    return {**base, "d_model": 96, "num_layers": 3, "pretrain_docs": 3000, "pretrain_iters": 600, "sft_train": 2000,
            "sft_iters": 300, "dpo_iters": 100, "rl_iters": 150, "rl_val": 80}


def write_data(out: Path, s: dict, seed: int) -> dict[str, Path]:
    from diyllm.data.synthetic import make_splits, plain_text_corpus, write_jsonl
    from diyllm.data.synthetic_preference import make_preference_splits, verbose_answers

    train, val = make_splits(s["sft_train"], max(20, s["sft_train"] // 10), seed, s["tasks"], system=False)
    prefs_train, prefs_val = make_preference_splits(s["pref_train"], s["pref_val"], seed, s["tasks"], system=False,
                                                    kind="format")
    paths = {k: out / f"{k}.jsonl" for k in ("pretrain", "sft_train", "sft_val", "prefs_train", "prefs_val")}
    write_jsonl(paths["pretrain"], [{"text": t} for t in plain_text_corpus(s["pretrain_docs"], seed, s["tasks"])])
    write_jsonl(paths["sft_train"], verbose_answers(train, s["verbose"], seed))
    write_jsonl(paths["sft_val"], verbose_answers(val, s["verbose"], seed + 1))
    write_jsonl(paths["prefs_train"], prefs_train)
    write_jsonl(paths["prefs_val"], prefs_val)
    return paths


def measure(model: Any, tok: Any, rl_val: list[dict], pref_rows: Any, show: int) -> dict[str, Any]:
    """Held-out exact match (greedy) on the RL prompts and held-out preference accuracy."""
    from diyllm.generation.exact_match import exact_match
    from diyllm.training.dpo import preference_accuracy

    em, replies = exact_match(model, tok, rl_val, return_replies=True)
    acc = preference_accuracy(model, *pref_rows.padded())
    return {"exact_match": em, "preference_accuracy": acc, "replies": replies[:show]}


def post_training(out: Path, quick: bool = False, device: str = "cpu", seed: int = 0, show: int = 5,
                  log=print, **overrides: Any) -> dict[str, Any]:
    """Run the experiment; return the report (also out/report.json). `overrides` replace settings."""
    import torch

    s = {**settings(quick), **overrides}
    threads = torch.get_num_threads()
    if quick:  # tiny models are bound by per-op overhead: more threads only add contention
        torch.set_num_threads(1)
    try:
        return _run(Path(out), s, device, seed, show, log)
    finally:
        torch.set_num_threads(threads)
        torch.set_grad_enabled(True)


def _run(out: Path, s: dict, device: str, seed: int, show: int, log) -> dict[str, Any]:
    from diyllm.data.chat_template import add_chat_tokens
    from diyllm.tokenizers import byte_tokenizer
    from diyllm.training.checkpoint import load_model
    from diyllm.training.config import TrainConfig
    from diyllm.training.dpo import prepare_dpo
    from diyllm.training.finetune import train_post
    from diyllm.training.rl import prepare_rl, task_prompts
    from diyllm.training.sft_cli import prepare_sft, resize_vocabulary
    from diyllm.training.trainer import train

    t0 = time.perf_counter()
    paths = write_data(out / "data", s, seed)
    tok = byte_tokenizer()
    tok.save(out / "data" / "tokenizer.json")
    common = dict(context_length=s["context_length"], d_model=s["d_model"], num_layers=s["num_layers"],
                  num_heads=s["num_heads"], batch_size=s["batch_size"], device=device, dtype="float32", seed=seed,
                  progress=False, eval_iters=2, weight_decay=0.0, dropout=0.0, warmup_iters=10, checkpoint_interval=0)
    stages: list[dict[str, Any]] = []
    _, rl_val = task_prompts(s["rl_tasks"], s["rl_prompts"], s["rl_val"], seed)

    def record(stage: str, ckpt: Path, extra: str = "") -> None:
        from diyllm.data.preference import PreferenceSource

        model, mtok, _ = load_model(ckpt, device=device)
        if mtok.vocab_size < 258 or model.config.vocab_size < 258:
            add_chat_tokens(mtok)
            resize_vocabulary(model, mtok.vocab_size)
        prefs = PreferenceSource(TrainConfig(context_length=s["context_length"], data_dir=str(paths["prefs_val"]),
                                             val_data=str(paths["prefs_val"]), seed=seed), mtok, log=lambda *a: None)
        m = measure(model, mtok, rl_val, prefs.rows["val"], show)
        stages.append({"stage": stage, "note": extra, **m})
        log(f"    {stage}: held-out exact match {m['exact_match']:.1%}, preference accuracy "
            f"{m['preference_accuracy']:.1%}")

    log(f"[1/4] pretraining a {s['num_layers']}-layer d={s['d_model']} model ({s['pretrain_iters']} iterations)")
    pre = TrainConfig(data_dir=str(paths["pretrain"]), data_format="jsonl", tokenizer_path=str(out / "data" /
                      "tokenizer.json"), out_dir=str(out / "pretrain"), max_iters=s["pretrain_iters"],
                      learning_rate=s["pretrain_lr"], min_lr=s["pretrain_lr"] / 10, eval_interval=s["pretrain_iters"],
                      log_interval=max(1, s["pretrain_iters"] // 3), **common).validate()
    train(pre)
    record("pretrained", out / "pretrain" / "best.pt")

    log(f"[2/4] SFT on {s['sft_train']} conversations, {s['verbose']:.0%} of them hedging their answer")
    sft = TrainConfig(data_dir=str(paths["sft_train"]), val_data=str(paths["sft_val"]), out_dir=str(out / "sft"),
                      init_from=str(out / "pretrain" / "best.pt"), max_iters=s["sft_iters"], learning_rate=s["sft_lr"],
                      min_lr=s["sft_lr"] / 10, eval_interval=s["sft_iters"], log_interval=max(1, s["sft_iters"] // 3),
                      **common).validate()
    cfg, source, model = prepare_sft(sft)
    train(cfg, source=source, model=model)
    record("SFT", out / "sft" / "best.pt")

    log(f"[3/4] DPO with LoRA rank {s['lora_rank']} on {s['pref_train']} format pairs ({s['dpo_iters']} iterations)")
    dpo = TrainConfig(data_dir=str(paths["prefs_train"]), val_data=str(paths["prefs_val"]), out_dir=str(out / "dpo"),
                      init_from=str(out / "sft" / "best.pt"), max_iters=s["dpo_iters"], learning_rate=s["dpo_lr"],
                      min_lr=s["dpo_lr"], eval_interval=s["dpo_iters"], log_interval=max(1, s["dpo_iters"] // 3),
                      lora_rank=s["lora_rank"], lora_alpha=2.0 * s["lora_rank"], dpo_beta=s["dpo_beta"],
                      **{**common, "warmup_iters": 5}).validate()
    prep = prepare_dpo(dpo)
    train_post(prep)
    record("DPO (LoRA)", out / "dpo" / "latest.pt", prep["setup"].describe())

    log(f"[4/4] RL (GRPO, exact-match reward) on {s['rl_tasks']} prompts ({s['rl_iters']} iterations)")
    rl = TrainConfig(out_dir=str(out / "rl"), init_from=str(out / "dpo" / "latest.pt"), max_iters=s["rl_iters"],
                     learning_rate=s["rl_lr"], min_lr=s["rl_lr"], eval_interval=s["rl_iters"],
                     log_interval=max(1, s["rl_iters"] // 5), rl_group_size=s["rl_group"],
                     rl_max_new_tokens=s["rl_max_new_tokens"], rl_temperature=s["rl_temperature"],
                     rl_kl_coef=s["rl_kl"],
                     **{**common, "batch_size": s["rl_batch"], "warmup_iters": 0}).validate()
    train_post(prepare_rl(rl, task=s["rl_tasks"], n_prompts=s["rl_prompts"], n_val=s["rl_val"]))
    record("RL (GRPO)", out / "rl" / "latest.pt")

    report = {
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in s.items()},
        "held_out_prompts": len(rl_val),
        "stages": stages,
        "examples": [{"question": c["conversations"][-2]["content"], "answer": c["conversations"][-1]["content"],
                      **{st["stage"]: st["replies"][i] for st in stages}} for i, c in enumerate(rl_val[:show])],
        "seconds": time.perf_counter() - t0,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def print_report(r: dict[str, Any], out: Path) -> None:
    print(f"\nafter each stage ({r['held_out_prompts']} held-out RL prompts; held-out format preference pairs):")
    print(f"{'stage':<14}{'exact match':>12}{'pref. acc':>11}  note")
    for st in r["stages"]:
        print(f"{st['stage']:<14}{st['exact_match']:>12.1%}{st['preference_accuracy']:>11.1%}  {st['note']}")
    print("\nside by side:")
    for e in r["examples"]:
        print(f"  Q: {e['question']}   (expected: {e['answer']})")
        for st in r["stages"]:
            print(f"     {st['stage']:<12} {e[st['stage']][:60]!r}")
    print(f"\n{r['seconds']:.0f}s in all; runs, data and report.json in {out}")

