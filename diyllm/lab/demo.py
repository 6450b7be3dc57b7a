"""The whole pipeline in one offline command: prepare data, train a small model, plot, sample, summarise.

    diyllm demo                 # ~5 minutes on 2 CPU cores: Python stdlib source, BPE, a ~1M-parameter model
    diyllm demo --quick         # under a minute: less data, fewer steps (a smoke test)
    diyllm demo --corpus shakespeare_char --input ../shared/data/tinyshakespeare.txt

Nothing is downloaded: the default corpus is this machine's own Python standard library (the
`pystdlib` recipe). The data goes to data/<corpus> (reused when it is already prepared), the run to
runs/demo: metrics.jsonl, checkpoints, and loss.png, the loss curve. Extra `--key=value` words
override the training config (e.g. --max_iters=300). DIYLLM_TINY=1 shrinks everything to seconds.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from diyllm.errors import UserError
from diyllm.lab.common import TINY_MAX_BYTES, tiny_mode, with_tiny

ACCEPTS_OVERRIDES = True

# corpus -> (training config, sample prompts)
CORPORA = {
    "pystdlib": ("pystdlib_cpu", ["def ", "import ", "class "]),
    "shakespeare_char": ("shakespeare_char_cpu", ["ROMEO:\n", "First Citizen:\n", "KING"]),
}
# The demo trains pystdlib_cpu for fewer steps than `diyllm train pystdlib_cpu` (2000) so that it ends
# within ~5 minutes on 2 cores, and logs often enough for a detailed curve.
DEMO_OVERRIDES = ["--max_iters=1000", "--warmup_iters=50", "--eval_interval=100", "--eval_iters=20",
                  "--log_interval=10", "--checkpoint_interval=0"]
QUICK_MAX_BYTES = 1_000_000  # --quick prepares at most this much text (into data/<corpus>_quick)
QUICK_OVERRIDES = ["--max_iters=150", "--warmup_iters=15", "--eval_interval=50", "--eval_iters=5",
                   "--log_interval=10", "--checkpoint_interval=0"]


def ensure_data(corpus: str, data_dir: Path, input_path: str | None, max_bytes: int | None) -> dict:
    """Prepare the corpus into data_dir unless a prepared dataset is already there; return its meta."""
    from diyllm.data.dataset import read_meta

    if (data_dir / "meta.json").is_file():
        print(f"data: reusing {data_dir} (delete it to re-prepare)")
        return read_meta(data_dir)
    from diyllm.data.prepare import prepare_dataset
    from diyllm.data.recipes import RECIPES, resolve_recipe

    inputs, kwargs = resolve_recipe(RECIPES[corpus], argparse.Namespace(input=input_path))
    cap = f" (first {max_bytes / 1e6:.2f} MB)" if max_bytes else ""
    print(f"data: preparing {corpus}{cap} into {data_dir}")
    return prepare_dataset(inputs, data_dir, max_bytes=max_bytes, **kwargs)


def sample_texts(run_dir: Path, prompts: list[str], max_new_tokens: int, seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, continuation) pairs from the run's best checkpoint, temperature 0.8, top-k 50."""
    from diyllm.generation.generate import generate
    from diyllm.loading import load_model

    model, tok, _ = load_model(run_dir)
    if tok is None:
        raise UserError(f"{run_dir}: the checkpoint holds no tokenizer, cannot print samples")
    ids = [tok.encode(p) for p in prompts]
    stop = [tok.eot_id] if getattr(tok, "eot_id", None) is not None else []
    with torch.no_grad():
        outs = generate(model, ids, max_new_tokens, temperature=0.8, top_k=50, stop_ids=stop, seed=seed,
                        vocab_limit=tok.vocab_size)
    return [(p, tok.decode(o)) for p, o in zip(prompts, outs)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", default="pystdlib", choices=list(CORPORA), help="default: pystdlib (offline)")
    parser.add_argument("--input", default=None, help="shakespeare_char: path to a local tinyshakespeare.txt")
    parser.add_argument("--quick", action="store_true", help="under a minute: 1 MB of data, 150 steps")
    parser.add_argument("--data_dir", default=None, help="default: data/<corpus> (data/<corpus>_quick with --quick)")
    parser.add_argument("--out_dir", default="runs/demo", help="run folder (default: runs/demo)")
    parser.add_argument("--max_new_tokens", type=int, default=None, help="tokens per sample (default 80; 200 chars)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")


def run(args: argparse.Namespace) -> int:
    from diyllm.lab.metrics import read_run
    from diyllm.lab.plot import plot_runs
    from diyllm.training.config import load_config
    from diyllm.training.trainer import train

    t_start = time.perf_counter()
    config_name, prompts = CORPORA[args.corpus]
    tiny = tiny_mode()
    suffix = "_tiny" if tiny else "_quick" if args.quick else ""
    data_dir = Path(args.data_dir or f"data/{args.corpus}{suffix}")
    max_bytes = TINY_MAX_BYTES if tiny else QUICK_MAX_BYTES if args.quick else None
    out_dir = Path(args.out_dir)
    if (out_dir / "metrics.jsonl").exists():
        raise UserError(f"{out_dir} already holds a run; pass --out_dir NEW_DIR or delete it "
                        "(the demo always trains from scratch)")
    overrides = [f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--run_name=demo", "--init_from=scratch"]
    overrides += DEMO_OVERRIDES + (QUICK_OVERRIDES if args.quick else [])
    cfg = load_config(config_name, with_tiny([*overrides, *args.overrides]))  # check the config before any work

    meta = ensure_data(args.corpus, data_dir, args.input, max_bytes)
    vocab = int(meta["vocab_size"])
    print(f"training {config_name} for {cfg.max_iters} iterations -> {out_dir}")
    result = train(cfg)

    plot_path = out_dir / "loss.png"
    plot_runs([read_run(out_dir)], plot_path, panels=("loss", "lr"),
              title=f"diyllm demo: {args.corpus}, {result.num_params / 1e6:.2f}M params")

    n_new = args.max_new_tokens or (200 if args.corpus.endswith("_char") else 80)
    print("\n---- samples (temperature 0.8, top-k 50) ----")
    for prompt, text in sample_texts(out_dir, prompts, n_new, seed=args.seed):
        print(f"[prompt {prompt!r}]\n{prompt}{text}\n")

    ln_v = math.log(vocab)
    if result.stopped_early:
        print(f"(training stopped early: {getattr(result, 'stop_reason', '') or 'interrupted'}; "
              "the numbers below are from the last evaluation)")
    total = time.perf_counter() - t_start
    print("---- summary ----")
    print(f"model          {result.num_params:,} parameters, vocab {vocab}, context {cfg.context_length}")
    print(f"trained        {result.iterations} iterations, {result.tokens_seen:,} tokens in {result.wall_time_s:.0f}s "
          f"({result.tokens_seen / max(result.wall_time_s, 1e-9):,.0f} tokens/s)")
    print(f"loss           train {result.final_train_loss:.3f}, val {result.final_val_loss:.3f} "
          f"(best {result.best_val_loss:.3f}); a uniform guess scores ln(V) = {ln_v:.3f}")
    ppl = math.exp(min(result.final_val_loss, 50))
    print(f"               val perplexity {ppl:.1f}, vs {vocab} for a uniform guess")
    print(f"files          {data_dir}/ (data), {out_dir}/ (metrics.jsonl, best.pt, latest.pt), {plot_path}")
    print(f"total time     {total:.0f}s")
    print("next           diyllm sample --ckpt " + f"{out_dir / 'best.pt'} --prompt 'def '")
    print(f"               diyllm diagnose --ckpt {out_dir / 'best.pt'}")
    print(f"               diyllm train {config_name} --data_dir={data_dir} --max_iters=3000   (longer)")
    print("               docs/curriculum.md walks through every step")
    return 0
