"""Post-training end to end on CPU: the lab pipeline (pretrain -> SFT -> DPO with LoRA -> RL) runs once
per module and its checkpoints serve the DPO, LoRA-SFT and distillation tests; the RL test starts from its
own arithmetic SFT checkpoint (fixture `arithmetic_sft`). Each is judged against the starting model's own
score on the same held-out data, seeded."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")

QUICK = ["--device=cpu", "--progress=false", "--dtype=float32", "--checkpoint_interval=0", "--eval_iters=1"]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    from diyllm.lab.post_training import post_training

    out = tmp_path_factory.mktemp("post_training")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = post_training(out, quick=True, log=lambda *a: None)
    finally:
        torch.set_num_threads(threads)
    return out, report


def test_lab_pipeline_reports_every_stage_and_post_training_helps(lab, capsys):
    from diyllm.lab.post_training import print_report

    out, report = lab
    stages = {s["stage"]: s for s in report["stages"]}
    assert list(stages) == ["pretrained", "SFT", "DPO (LoRA)", "RL (GRPO)"]
    assert stages["DPO (LoRA)"]["preference_accuracy"] >= 0.9
    # post-training as a whole beats SFT on held-out exact match; RL after DPO must not undo it (measured on
    # 75 prompts: seed 0 +2 prompts, seeds 1, 2: +6, -1; 2 prompts of slack for other hardware's rounding). RL
    # on its own is judged in test_rl_raises_held_out_arithmetic_exact_match_over_the_sft_checkpoint.
    assert report["held_out_prompts"] == 75
    assert stages["RL (GRPO)"]["exact_match"] > stages["SFT"]["exact_match"]
    assert stages["RL (GRPO)"]["exact_match"] >= stages["DPO (LoRA)"]["exact_match"] - 2 / 75
    assert json.loads((out / "report.json").read_text())["stages"][-1]["stage"] == "RL (GRPO)"
    saved = torch.load(out / "dpo" / "latest.pt", weights_only=True)
    assert "lora" in saved and all(".lora_" in k for k in saved["model"])  # adapters only
    print_report(report, out)
    assert "RL (GRPO)" in capsys.readouterr().out


def test_dpo_with_lora_raises_held_out_preference_accuracy_from_chance(lab, tmp_path):
    from diyllm.cli import main
    from diyllm.data.preference import PreferenceSource
    from diyllm.data.synthetic import write_jsonl
    from diyllm.data.synthetic_preference import make_preference_splits
    from diyllm.training.checkpoint import load_model
    from diyllm.training.config import TrainConfig
    from diyllm.training.dpo import preference_accuracy

    out, _ = lab
    train, val = make_preference_splits(400, 60, seed=1, tasks=("capital", "reverse", "spell"), system=False,
                                        kind="style")
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "val.jsonl", val)

    def held_out_accuracy(ckpt):
        model, tok, _ = load_model(ckpt)
        rows = PreferenceSource(TrainConfig(context_length=model.config.context_length,
                                            data_dir=str(tmp_path / "val.jsonl"),
                                            val_data=str(tmp_path / "val.jsonl")), tok, log=lambda *a: None).rows["val"]
        return preference_accuracy(model, *rows.padded())

    before = held_out_accuracy(out / "sft" / "best.pt")
    assert 0.3 <= before <= 0.7  # an untrained preference: about chance
    rc = main(["dpo", "dpo_synthetic", f"--init_from={out / 'sft' / 'best.pt'}", f"--data={tmp_path / 'train.jsonl'}",
               f"--val_data={tmp_path / 'val.jsonl'}", f"--out_dir={tmp_path / 'dpo'}", "--lora_rank=8",
               "--lora_alpha=16", "--max_iters=100", "--eval_interval=100", "--log_interval=20", "--learning_rate=3e-3",
               "--min_lr=3e-4", "--warmup_iters=5", *QUICK])
    assert rc == 0
    after = held_out_accuracy(tmp_path / "dpo" / "latest.pt")
    assert after >= 0.9, (before, after)
    metrics = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    first = next(m for m in metrics if m.get("event") == "eval")
    assert first["val_loss"] == pytest.approx(0.6931, abs=1e-3)  # policy = reference at step 0: log 2
    assert any("pref_acc" in m for m in metrics if m.get("event") == "train")


@pytest.fixture(scope="module")
def arithmetic_sft(tmp_path_factory):
    """An SFT checkpoint of the synthetic arithmetic task whose held-out exact match is well below 100%:
    pretrained on "a + b = c." sentences, then SFT on conversations half of which hedge ("7, I think."),
    so it often knows the sum but does not answer with it alone. Built once (~10 s on one thread)."""
    from diyllm.data.synthetic import make_splits, plain_text_corpus, write_jsonl
    from diyllm.data.synthetic_preference import verbose_answers
    from diyllm.tokenizers import byte_tokenizer
    from diyllm.training.config import TrainConfig
    from diyllm.training.sft_cli import prepare_sft
    from diyllm.training.trainer import train

    out = tmp_path_factory.mktemp("arithmetic_sft")
    write_jsonl(out / "pretrain.jsonl", [{"text": t} for t in plain_text_corpus(500, 0, ("add",))])
    train_rows, val_rows = make_splits(1000, 50, 0, ("add",), system=False)
    write_jsonl(out / "sft_train.jsonl", verbose_answers(train_rows, 0.5, 0))
    write_jsonl(out / "sft_val.jsonl", verbose_answers(val_rows, 0.5, 1))
    byte_tokenizer().save(out / "tokenizer.json")
    common = dict(context_length=64, d_model=64, num_layers=2, num_heads=4, batch_size=16, device="cpu",
                  dtype="float32", seed=0, progress=False, eval_iters=1, weight_decay=0.0, dropout=0.0,
                  warmup_iters=10, checkpoint_interval=0, log_interval=100)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(TrainConfig(data_dir=str(out / "pretrain.jsonl"), data_format="jsonl",
                          tokenizer_path=str(out / "tokenizer.json"), out_dir=str(out / "pretrain"), max_iters=300,
                          learning_rate=3e-3, min_lr=3e-4, eval_interval=300, **common).validate())
        cfg, source, model = prepare_sft(TrainConfig(
            data_dir=str(out / "sft_train.jsonl"), val_data=str(out / "sft_val.jsonl"), out_dir=str(out / "sft"),
            init_from=str(out / "pretrain" / "best.pt"), max_iters=150, learning_rate=2e-3, min_lr=2e-4,
            eval_interval=150, **common).validate())
        train(cfg, source=source, model=model)
    finally:
        torch.set_num_threads(threads)
    return out / "sft" / "latest.pt"


def test_rl_raises_held_out_arithmetic_exact_match_over_the_sft_checkpoint(arithmetic_sft, tmp_path, capsys):
    """`diyllm rl --task=arithmetic` from an SFT checkpoint: held-out exact match (greedy, the prompts the
    RL run never samples) goes up, judged on the same prompts as the SFT checkpoint's own score, by far
    more than chance allows (a paired sign test on the prompts that changed)."""
    from diyllm.cli import main
    from diyllm.generation.exact_match import exact_match, normalise
    from diyllm.training.checkpoint import load_model
    from diyllm.training.rl import task_prompts

    _, held_out = task_prompts("arithmetic", 2000, 200, seed=0)  # what `--task=arithmetic --seed=0` holds out
    assert len(held_out) >= 75

    def right(ckpt):
        model, tok, _ = load_model(ckpt)
        _, replies = exact_match(model, tok, held_out, return_replies=True)
        return [normalise(r) == normalise(c["conversations"][-1]["content"]) for r, c in zip(replies, held_out)]

    before = right(arithmetic_sft)
    assert sum(before) / len(held_out) < 0.5  # well below 100%: room for RL
    rc = main(["rl", "rl_synthetic", f"--init_from={arithmetic_sft}", "--task=arithmetic", "--prompts=2000",
               f"--out_dir={tmp_path / 'rl'}", "--max_iters=40", "--eval_interval=40", "--log_interval=5",
               "--seed=0", *QUICK])
    assert rc == 0
    after = right(tmp_path / "rl" / "latest.pt")
    gained = sum(a and not b for a, b in zip(after, before))
    lost = sum(b and not a for a, b in zip(after, before))
    em_before, em_after = sum(before) / len(held_out), sum(after) / len(held_out)
    print(f"held-out exact match on {len(held_out)} prompts: SFT {em_before:.1%} -> RL {em_after:.1%} "
          f"(+{gained} / -{lost} prompts)")
    # Without an effect, each changed prompt is a fair coin (gained ~ Binomial(gained + lost, 1/2)): demand
    # a net gain of more than 4 standard deviations of that, and at least 20 points of exact match.
    assert gained - lost > 4 * (gained + lost) ** 0.5, (em_before, em_after, gained, lost)
    assert em_after >= em_before + 0.2, (em_before, em_after)
    records = [json.loads(line) for line in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward"] for r in records if r.get("event") == "train"]
    assert len(rewards) == 8 and all({"reward", "kl", "length"} <= set(r) for r in records if r.get("event") == "train")
    assert sum(rewards[4:]) > sum(rewards[:4])  # the sampled reward (one step per record) rises too


def test_sft_with_lora_saves_adapters_and_sample_merge_read_them(lab, tmp_path, capsys):
    from diyllm.cli import main
    from diyllm.model.lora import LoRALinear
    from diyllm.training.checkpoint import load_model

    out, _ = lab
    data = out / "data"
    args = ["sft", "sft_synthetic", f"--init_from={out / 'sft' / 'best.pt'}", f"--data_dir={data / 'sft_train.jsonl'}",
            f"--val_data={data / 'sft_val.jsonl'}", f"--out_dir={tmp_path / 'lora'}", "--lora_rank=4",
            "--batch_size=8", "--max_iters=4", "--eval_interval=4", "--log_interval=2", "--warmup_iters=0",
            "--learning_rate=1e-3", *QUICK]
    assert main(args) == 0
    assert "trainable" in capsys.readouterr().out
    saved = torch.load(tmp_path / "lora" / "latest.pt", weights_only=True)
    assert saved["lora"]["rank"] == 4 and all(".lora_" in k for k in saved["model"])
    assert main([*args[:-len(QUICK)], "--max_iters=6", "--eval_interval=6", "--init_from=resume", *QUICK]) == 0
    model, _, again = load_model(tmp_path / "lora" / "latest.pt")
    assert again["iteration"] == 6 and any(isinstance(m, LoRALinear) for m in model.modules())
    assert main(["sample", "--ckpt", str(tmp_path / "lora"), "--prompt", "The", "--max_new_tokens=4"]) == 0
    latest = str(tmp_path / "lora" / "latest.pt")
    assert main(["lora", "merge", "--ckpt", latest, "--out", str(tmp_path / "merged.pt")]) == 0
    merged, _, _ = load_model(tmp_path / "merged.pt")
    ids = torch.randint(0, 256, (2, 12))
    # float32: W + s·BA then x·Wᵀ rounds differently from x·Wᵀ + s·(x·Aᵀ)·Bᵀ; a logit near 0.2 differed
    # by 1.3e-5 on CI. The merge arithmetic itself is checked exactly in tests/test_lora.py.
    torch.testing.assert_close(merged(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_distilled_student_beats_the_same_student_without_teacher(lab, tmp_path):
    from diyllm.training.config import TrainConfig
    from diyllm.training.distill import prepare_distill
    from diyllm.training.finetune import train_post
    from diyllm.training.trainer import train

    out, _ = lab
    docs = (out / "data" / "pretrain.jsonl").read_text().splitlines()
    (tmp_path / "small.jsonl").write_text("\n".join(docs[:60]) + "\n")  # a tiny corpus: the student overfits
    (tmp_path / "val.jsonl").write_text("\n".join(docs[-100:]) + "\n")
    cfg = TrainConfig(data_format="jsonl", data_dir=str(tmp_path / "small.jsonl"), val_data=str(tmp_path / "val.jsonl"),
                      tokenizer_path=str(out / "data" / "tokenizer.json"), context_length=80, d_model=64,
                      num_layers=2, num_heads=4, batch_size=16, max_iters=100, learning_rate=3e-3, min_lr=3e-3,
                      warmup_iters=0, weight_decay=0.0, eval_interval=100, eval_iters=6, log_interval=50,
                      checkpoint_interval=0, device="cpu", dtype="float32", progress=False, seed=0,
                      distill_alpha=0.5, distill_temperature=1.0)
    alone = train(TrainConfig(**{**cfg.to_dict(), "out_dir": str(tmp_path / "alone")}))
    prep = prepare_distill(TrainConfig(**{**cfg.to_dict(), "out_dir": str(tmp_path / "distilled")}),
                           str(out / "pretrain" / "best.pt"))
    distilled = train_post(prep)
    assert distilled.best_val_loss < alone.best_val_loss - 0.02, (distilled.best_val_loss, alone.best_val_loss)


def test_distillation_refuses_a_teacher_with_another_tokenizer_before_training(lab, tmp_path, capsys):
    from diyllm.cli import main
    from diyllm.model import DIYConfig, DIYForCausalLM
    from diyllm.tokenizers import CharTokenizer
    from diyllm.training.checkpoint import save_checkpoint

    out, _ = lab
    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz ")
    tok.save(tmp_path / "char.json")
    teacher = DIYForCausalLM(DIYConfig(vocab_size=tok.vocab_size, context_length=32, d_model=32, num_layers=1,
                                       num_heads=2))
    save_checkpoint(teacher, None, 0, tmp_path / "teacher.pt", model_config=teacher.config.to_dict(),
                    tokenizer=(tmp_path / "char.json").read_text())
    rc = main(["distill", "distill_synthetic", f"--teacher={tmp_path / 'teacher.pt'}", "--data_format=jsonl",
               f"--data_dir={out / 'data' / 'pretrain.jsonl'}", f"--tokenizer_path={out / 'data' / 'tokenizer.json'}",
               f"--out_dir={tmp_path / 'd'}", *QUICK])
    assert rc == 2
    assert "different tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "d" / "latest.pt").exists()


def test_rl_resume_draws_the_same_rollouts_as_an_uninterrupted_run(lab, tmp_path):
    from diyllm.cli import main

    out, _ = lab
    common = ["rl", "rl_synthetic", "--task=arithmetic", "--prompts=200", "--batch_size=2", "--rl_group_size=3",
              "--rl_max_new_tokens=4", "--eval_interval=0", "--log_interval=1", "--learning_rate=1e-3",
              "--min_lr=1e-3", "--lora_rank=2", *QUICK]
    start = f"--init_from={out / 'sft' / 'best.pt'}"
    assert main([*common, start, "--max_iters=4", f"--out_dir={tmp_path / 'straight'}"]) == 0
    assert main([*common, start, "--max_iters=2", f"--out_dir={tmp_path / 'split'}"]) == 0
    assert main([*common, "--init_from=resume", "--max_iters=4", f"--out_dir={tmp_path / 'split'}"]) == 0
    a = torch.load(tmp_path / "straight" / "latest.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "latest.pt", weights_only=True)
    # the prompt position and the rollout counter (the sampler's seed) continue; val is evaluated once more
    # by the split run (at its first end), so only the train side must match
    assert a["data_state"]["train"] == b["data_state"]["train"] and a["data_state"]["rollouts"] == 4
    assert b["data_state"]["rollouts"] == 4
    assert a["model"].keys() == b["model"].keys() and all(".lora_" in k for k in a["model"])
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0)
