"""Pretrain a model: a config file (TOML, or the name of a shipped one) plus --key=value overrides.

  diyllm train configs/shakespeare_char_cpu.toml
  diyllm train shakespeare_char_cpu --max_iters=500 --learning_rate=3e-3
  diyllm train shakespeare_char_cpu --init_from=resume          # continue runs/... exactly
  torchrun --nproc_per_node=4 -m diyllm train shakespeare_char   # DistributedDataParallel

Every TrainConfig field can be overridden (`diyllm train NAME --print-config` lists them with their
values). The run folder (out_dir) receives config.json, metrics.jsonl, latest.pt, best.pt and
tokenizer.json; Ctrl-C or SIGTERM saves a checkpoint and exits cleanly. See docs/training.md.
"""

from __future__ import annotations

import argparse

ACCEPTS_OVERRIDES = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", default=None,
                        help="a TOML file, or the name of a shipped config (e.g. shakespeare_char_cpu)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as JSON and exit without training")
    parser.add_argument("--list-configs", action="store_true", help="list the shipped configs and exit")


def run(args: argparse.Namespace) -> int:
    from diyllm.training.config import CONFIG_DIR, available_configs, load_config

    if args.list_configs:
        for name in available_configs():
            first = (CONFIG_DIR / f"{name}.toml").read_text(encoding="utf-8").splitlines()[:1]
            comment = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
            print(f"{name:<24} {comment}")
        return 0
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(cfg.to_json())
        return 0
    from diyllm.training.distributed import finish_worker
    from diyllm.training.trainer import train

    result = train(cfg)
    # a run stopped by SIGTERM/SIGINT (checkpoint saved) exits 128 + signal (143 / 130), not 0
    return finish_worker(128 + result.stop_signal if result.stop_signal else 0)
