"""Run a grid of trainings, one folder each, then compare them in a table and one overlay plot.

    diyllm sweep configs/pystdlib_cpu.toml --grid learning_rate=1e-4,1e-3,1e-2 --max_iters=300
    diyllm sweep configs/experiments/lr.toml          # the experiment file supplies base config + grid

Every combination of the --grid values (a Cartesian product) becomes a run in OUT_ROOT/<name>, where
the name lists the swept values (e.g. learning_rate=0.001). Runs go one after another; a run whose
metrics.jsonl already ends with an "end" event (or has a DONE marker) is skipped, so an interrupted
sweep continues where it stopped (an unfinished run with a latest.pt resumes from it). A run that
fails (e.g. diverges at a huge LR) is recorded with a FAILED marker and the sweep goes on.

Experiment files (configs/experiments/*.toml) are a training config whose [sweep] table says what to
vary:

    [sweep]
    base = "pystdlib_cpu"                       # the config the keys above/below override
    grid = { learning_rate = [1e-4, 1e-3] }     # Cartesian product of the lists
    variants = [{ batch_size = 64, gradient_accumulation_steps = 1 },   # zipped: keys set together
                { batch_size = 16, gradient_accumulation_steps = 4 }]

With both grid and variants, every variant is combined with every grid point. --grid on the command
line replaces the file's grid (and variants). With DIYLLM_TINY=1 every run is shrunk to a few steps.
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys
import time
from pathlib import Path
from typing import Any

from diyllm.atomic import atomic_write
from diyllm.errors import UserError
from diyllm.lab.common import count_params, tiny_mode, with_tiny
from diyllm.lab.metrics import is_finished

ACCEPTS_OVERRIDES = True
TINY_MAX_RUNS = 2  # in tiny mode (DIYLLM_TINY=1) only the first runs of a sweep are trained


def _toml_load(path: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: invalid TOML: {exc}") from exc


def to_word(key: str, value: Any) -> str:
    """A TOML value as a `--key=value` override word (the config loader type-checks it)."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (int, float, str)):
        text = repr(value) if isinstance(value, float) else str(value)
    else:
        raise UserError(f"option {key!r}: {value!r} is not a scalar (lists/tables cannot be config values)")
    return f"--{key}={text}"


def _fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value).lower() if isinstance(value, bool) else str(value)


def parse_grid_args(grid_args: list[str]) -> dict[str, list[str]]:
    """['learning_rate=1e-4,1e-3', 'dropout=0,0.2'] -> {'learning_rate': ['1e-4', '1e-3'], 'dropout': ['0', '0.2']}"""
    grid: dict[str, list[str]] = {}
    for word in grid_args:
        key, sep, values = word.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not vals:
            raise UserError(f"--grid {word!r}: write KEY=V1,V2,... (e.g. --grid learning_rate=1e-4,1e-3)")
        if key in grid:
            raise UserError(f"--grid {key} is given twice")
        grid[key] = vals
    return grid


def expand(grid: dict[str, list[Any]], variants: list[dict[str, Any]] | None = None) -> list[tuple[str, dict]]:
    """All runs as (name, settings): the Cartesian product of the grid, each combined with each zipped
    variant. A variant's optional "name" stands for its own keys in the run name."""
    keys = list(grid)
    points = [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))] if keys else [{}]
    runs = []
    for v in variants or [{}]:
        v = dict(v)
        label = v.pop("name", None)
        for p in points:
            overlap = set(v) & set(p)
            if overlap:
                raise UserError(f"key(s) {sorted(overlap)} are in both the grid and a variant; set each in one place")
            runs.append((run_name(v, label, p), {**v, **p}))
    return runs


def run_name(variant: dict[str, Any], label: str | None = None, point: dict[str, Any] | None = None) -> str:
    """Folder/legend name: the variant's label (or its key=value pairs), then the grid point's pairs."""
    parts = [str(label)] if label is not None else [f"{k}={_fmt_value(v)}" for k, v in variant.items()]
    parts += [f"{k}={_fmt_value(v)}" for k, v in (point or {}).items()]
    name = "_".join(parts) or "base"
    return re.sub(r"[^A-Za-z0-9=._+-]", "-", name)


def _check_keys(path: Path, values: dict[str, Any], where: str) -> None:
    """Name the experiment file (not 'command line') when one of its keys is not a config option."""
    from diyllm.training.config import field_types, suggest

    known = list(field_types())
    for key in values:
        if key not in known:
            raise UserError(f"{path}: {where}unknown option {key!r}{suggest(key, known)}")


class SweepPlan:
    """What to run: the base config (file or name), fixed override words, and the combinations."""

    def __init__(self, config: str, grid_args: list[str], overrides: list[str], out_root: str | None):
        path = Path(config)
        self.description = ""
        file_words: list[str] = []
        self.base: str | None = config
        grid: dict[str, list[Any]] = {}
        variants: list[dict[str, Any]] = []
        root = None
        if path.suffix == ".toml" and path.is_file():
            data = _toml_load(path)
            sweep = data.pop("sweep", None)
            if sweep is not None:
                if not isinstance(sweep, dict):
                    raise UserError(f"{path}: 'sweep' must be a table ([sweep])")
                unknown = set(sweep) - {"base", "grid", "variants", "out_root", "description"}
                if unknown:
                    raise UserError(f"{path}: unknown key(s) {sorted(unknown)} in [sweep]; "
                                    "use base, grid, variants, out_root, description")
                self.base = sweep.get("base")
                grid = dict(sweep.get("grid", {}))
                variants = list(sweep.get("variants", []))
                root = sweep.get("out_root")
                self.description = str(sweep.get("description", "")).strip()
                for k, v in grid.items():
                    if not isinstance(v, list) or not v:
                        raise UserError(f"{path}: [sweep] grid.{k} must be a non-empty list of values")
                flat: dict[str, Any] = {}  # [model] d_model = 64 and d_model = 64 mean the same
                for k, v in data.items():
                    flat.update(v if isinstance(v, dict) else {k: v})
                _check_keys(path, flat, "")
                _check_keys(path, {k: 0 for k in grid}, "[sweep] grid: ")
                for v in variants:
                    _check_keys(path, {k: 0 for k in v if k != "name"}, "[sweep] variants: ")
                file_words = [to_word(k, v) for k, v in flat.items()]
        if grid_args:
            grid, variants = parse_grid_args(grid_args), []
        runs = expand(grid, variants)
        self.combos = [settings for _, settings in runs]
        names = [name for name, _ in runs]
        if len(set(names)) != len(names):
            raise UserError("two runs of the sweep would get the same name; give each variant a distinct 'name'")
        if tiny_mode() and len(names) > TINY_MAX_RUNS:
            print(f"tiny mode: running only the first {TINY_MAX_RUNS} of {len(names)} runs")
            self.combos, names = self.combos[:TINY_MAX_RUNS], names[:TINY_MAX_RUNS]
        self.names = names
        self.fixed_words = file_words + list(overrides)
        self.out_root = Path(out_root or root or f"runs/sweep_{path.stem}")

    def words_for(self, combo: dict[str, Any], out_dir: Path, name: str) -> list[str]:
        swept = [to_word(k, v) for k, v in combo.items()]
        # In tiny mode the tiny settings come last and win: every run is the same tiny model, only the
        # plumbing is exercised (a swept warmup of 30 steps could not fit into 6 steps anyway).
        return [*with_tiny([*self.fixed_words, *swept]), f"--out_dir={out_dir}", f"--run_name={name}"]

    def config_for(self, combo: dict[str, Any], name: str):
        from diyllm.training.config import load_config

        return load_config(self.base, self.words_for(combo, self.out_root / name, name))


def run_sweep(plan: SweepPlan, panels: tuple[str, ...] = ("loss",), x: str = "step") -> str:
    """Run every unfinished combination, then write compare.md and compare.png under the out_root."""
    from diyllm.lab.compare import compare_runs
    from diyllm.lab.metrics import read_run
    from diyllm.lab.plot import plot_runs
    from diyllm.training.trainer import train

    configs = [plan.config_for(c, n) for c, n in zip(plan.combos, plan.names)]  # validate all before training
    print(f"sweep: {len(configs)} runs into {plan.out_root}" + (f" — {plan.description}" if plan.description else ""))
    for name, cfg in zip(plan.names, configs):
        print(f"  {name:<50} {count_params(cfg):>12,} params")
    failed = []
    for i, (name, cfg) in enumerate(zip(plan.names, configs), 1):
        out_dir = plan.out_root / name
        if is_finished(out_dir):
            print(f"[{i}/{len(configs)}] {name}: finished earlier, skipped")
            continue
        if (out_dir / "FAILED").exists():
            print(f"[{i}/{len(configs)}] {name}: failed earlier (delete {out_dir / 'FAILED'} to retry), skipped")
            failed.append(name)
            continue
        if (out_dir / "latest.pt").exists():
            from diyllm.training.config import replace

            cfg = replace(cfg, init_from="resume")
            print(f"[{i}/{len(configs)}] {name}: resuming from {out_dir / 'latest.pt'}")
        else:
            if out_dir.is_dir() and any(out_dir.iterdir()):  # a run that died before its first checkpoint
                from diyllm.training.config import replace

                cfg = replace(cfg, overwrite=True)
            print(f"[{i}/{len(configs)}] {name}: training")
        t0 = time.perf_counter()
        try:
            train(cfg)
        except (UserError, RuntimeError, FloatingPointError) as exc:
            print(f"[{i}/{len(configs)}] {name}: FAILED: {exc}", file=sys.stderr)
            with atomic_write(out_dir / "FAILED", "w", encoding="utf-8") as f:
                f.write(f"{type(exc).__name__}: {exc}\n")
            failed.append(name)
            continue
        with atomic_write(out_dir / "DONE", "w", encoding="utf-8") as f:
            f.write(f"{time.perf_counter() - t0:.1f} s\n")
    dirs = [plan.out_root / n for n in plan.names if (plan.out_root / n / "metrics.jsonl").is_file()]
    if not dirs:
        raise UserError(f"no run of the sweep produced metrics under {plan.out_root}")
    table = compare_runs(dirs, plan.out_root / "compare.md", analysis=True, samples=True)
    plot_runs([read_run(d) for d in dirs], plan.out_root / "compare.png", x=x, panels=panels,
              title=plan.description.split("\n")[0][:90] or f"sweep {plan.out_root.name}")
    print(table, end="")
    if failed:
        print(f"failed runs: {', '.join(failed)}")
    print(f"wrote {plan.out_root / 'compare.md'} and {plan.out_root / 'compare.png'}")
    return table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a training config, or an experiment file with a [sweep] table")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="values to sweep (repeatable: the product of all grids is run)")
    parser.add_argument("--out_root", default=None, help="parent folder of the runs (default: runs/sweep_<name>)")
    parser.add_argument("--panels", default="loss", help="panels of the overlay plot (e.g. loss,lr,grad_norm)")
    parser.add_argument("--x", default="step", choices=("step", "tokens", "time"))
    parser.add_argument("--dry_run", action="store_true", help="print the runs and their sizes, train nothing")


def run(args: argparse.Namespace) -> int:
    plan = SweepPlan(args.config, args.grid, list(args.overrides), args.out_root)
    if args.dry_run:
        print(f"sweep plan: {len(plan.combos)} runs into {plan.out_root}")
        for combo, name in zip(plan.combos, plan.names):
            cfg = plan.config_for(combo, name)
            state = "finished" if is_finished(plan.out_root / name) else "to run"
            print(f"  {name:<50} {count_params(cfg):>12,} params  ({state})")
        return 0
    run_sweep(plan, panels=tuple(p.strip() for p in args.panels.split(",") if p.strip()), x=args.x)
    return 0
