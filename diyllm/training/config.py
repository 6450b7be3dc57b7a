"""TrainConfig: every knob of a training run, loaded from a TOML file plus `--key=value` overrides.

    diyllm train configs/shakespeare_char.toml --max_iters=1000 --learning_rate=5e-3

Values are checked against the dataclass field types (so `--max_iters=1e3` works but `--max_iters=abc`
does not); an unknown key is an error that suggests the nearest valid one; impossible combinations
(warmup longer than the run, min_lr above learning_rate, heads that do not divide d_model, ...) are
refused before any model is built. TOML tables such as `[model]` or `[optim]` are only for readability:
their keys are the same flat names.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import sys
import types
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from diyllm.errors import UserError
from diyllm.model.config import ModelFields, shape_problems
from diyllm.training.optim import ADJUST_LR_FNS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
DATA_FORMATS = ("auto", "bin", "jsonl", "sft")


@dataclass
class TrainConfig(ModelFields):
    # ---- model (the fields of diyllm.model.config.ModelFields, declared there once; a DIYConfig is
    # built from them). Only the vocabulary's default differs: ----
    vocab_size: int = 0  # 0: take it from the data (meta.json / tokenizer)
    # ---- data ----
    data_dir: str = "data/shakespeare_char"
    data_format: str = "auto"  # auto | bin | jsonl | sft
    batch_size: int = 12  # sequences per micro-step per process
    gradient_accumulation_steps: int = 1  # global, divided across DDP ranks
    # jsonl / sft data (diyllm/data/jsonl.py, sft.py)
    tokenizer_path: str = ""  # tokenizer JSON; "": the init_from checkpoint's, else <data_dir's folder>/tokenizer.json
    val_data: str = ""  # validation file/folder/glob; "": hold out ~5% of the documents (by a hash of file:line)
    jsonl_mode: str = "pack"  # pack: documents joined by end-of-text, no padding | pad: one document per row
    streaming: bool = False  # jsonl: stream files line by line through a DataLoader (corpora larger than memory)
    num_workers: int = 0  # streaming: DataLoader worker processes
    shuffle_buffer: int = 10000  # streaming: documents held in the shuffle buffer
    # --- issue 14: sharded datasets ---
    batch_sampling: str = "random"  # bin data: random windows | doc_aligned (each window starts a document)
    verify_data: bool = True  # bin data: check every shard's SHA-256 against meta.json on open (hashed once per change)
    # --- issue 20: dynamic padding ---
    dynamic_padding: bool = False  # jsonl pad / sft / dpo: pad each batch to its longest row, not context_length
    conversations_field: str = "conversations"  # sft: the JSONL key / Parquet column holding the messages
    # ---- optimisation ----
    max_iters: int = 5000
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int = 0  # 0: = max_iters
    decay_lr: bool = True  # False: constant learning_rate after warmup
    weight_decay: float = 0.1  # only on 2-D weights (matrices), never on norms
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0: no clipping
    # ---- evaluation, logging, checkpoints ----
    eval_interval: int = 250  # 0: only at the end
    eval_iters: int = 50
    eval_train: bool = True  # also estimate the train loss at each eval (eval_iters more batches); false: val only
    # at the end: the val loss over the split's first N tokens, each scored once (the whole split when it is
    # shorter); the periodic evals' eval_iters random windows are quick but scatter. 0: off
    final_val_tokens: int = 0
    log_interval: int = 10
    checkpoint_interval: int = 250  # latest.pt every this many iterations (and always at the end); 0: end only
    patience: int = 0  # early stopping after this many evals without val improvement; 0: off
    out_dir: str = "runs/default"
    run_name: str = ""  # "" : the out_dir's folder name
    progress: bool = True  # tqdm progress bar
    tensorboard: bool = False
    wandb_project: str = ""  # "" : off
    # ---- system ----
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    compile: bool = False
    num_threads: int = 0  # CPU intra-op threads; 0: torch's default. 1 is often fastest on a busy shared CPU
    keep_freed_memory: bool = True  # CPU: glibc keeps freed blocks for the next step (4-5% faster; host_malloc.py)
    init_from: str = "scratch"  # scratch | resume | PATH (.pt or run folder) | hf:DIR; weights only, fresh optimizer
    # ---- health ----
    max_nonfinite_steps: int = 10  # stop after this many consecutive NaN/inf steps
    grad_spike_factor: float = 10.0  # warn when grad norm > this x the median of the last 50
    peak_flops: float = 0.0  # per device, for MFU; 0: look the GPU up in a small table
    # --- issue 13: run-folder safety ---
    overwrite: bool = False  # start a new run in an out_dir that holds one (its run files are removed first)
    keep_checkpoints: int = 2  # latest.pt plus this many - 1 older copies (previous.pt, ...) to fall back to
    # --- issue 15: scale-out (FSDP2, sharded checkpoints, memory planning; docs/training.md) ---
    parallelism: str = "ddp"  # ddp | fsdp: how several processes share the work (one process: neither)
    fsdp_reshard_after_forward: bool = True  # free gathered weights after forward (less memory, one more all-gather)
    fsdp_replicas: int = 1  # HSDP: shard within groups of world/replicas ranks, replicate across groups (nodes)
    fsdp_cpu_offload: bool = False  # keep sharded params, grads and optimizer state in CPU RAM (slow, saves GPU memory)
    activation_checkpointing: bool = False  # recompute each block's activations in backward (~1/3 more compute)
    memory_check: bool = True  # refuse to start when the memory estimate exceeds the device's memory
    # --- issue 16: post-training (docs/post_training.md) ---
    lora_rank: int = 0  # 0: full fine-tuning; > 0: LoRA adapters of this rank, base weights frozen
    lora_alpha: float = 0.0  # adapter scale = lora_alpha / lora_rank; 0: = lora_rank (scale 1)
    lora_dropout: float = 0.0  # dropout on the adapters' input
    lora_targets: str = "q,k,v,o,w1,w2,w3"  # also attn, mlp; lm_head / embed train those matrices in full
    dpo_beta: float = 0.1  # how far DPO may move the policy from the reference
    dpo_label_smoothing: float = 0.0  # probability that a preference label is wrong (conservative DPO)
    rl_group_size: int = 8  # completions sampled per prompt (advantages are relative to the group)
    rl_max_new_tokens: int = 16  # completion length limit
    rl_temperature: float = 1.0  # sampling temperature of the rollouts (> 0)
    rl_clip_eps: float = 0.2  # PPO/GRPO ratio clipping
    rl_kl_coef: float = 0.0  # weight of the KL penalty to the reference model
    distill_alpha: float = 0.5  # weight of the KL-to-teacher term; 1 - distill_alpha weighs the hard-label loss
    distill_temperature: float = 2.0  # softmax temperature of teacher and student in the KL term
    # --- issue 12: reproducibility ---
    deterministic: bool = False  # CUDA: torch.use_deterministic_algorithms + cuBLAS workspace (slower); CPU always is
    # --- issue 18: benchmark evals during training (diyllm.eval; see docs/eval.md) ---
    eval_tasks: tuple[str, ...] = ()  # e.g. ["hellaswag", "arc_easy"] (or "hellaswag,arc_easy"); (): off
    eval_tasks_interval: int = 0  # steps between benchmark evals (and at the end); 0: at every eval_interval
    eval_tasks_limit: int = 100  # the first N items of each task, the same ones every time
    eval_tasks_shots: int = 0
    eval_tasks_data_dir: str = ""  # DIR/<task>/<split>.jsonl; "": the download cache
    # --- issue 19: optimizer choice and Muon (training/optim.py) ---
    optimizer: str = "adamw"  # adamw | muon: Muon on the 2-D hidden matrices, AdamW (keys above) on the rest
    muon_lr: float = 0.02  # Muon's peak lr; follows learning_rate's warmup/decay (scaled by muon_lr/learning_rate)
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: int = 5  # Newton-Schulz iterations
    muon_weight_decay: float = 0.0  # decoupled, on the Muon matrices (weight_decay covers the AdamW ones)
    muon_adjust_lr: str = "original"  # original: x√max(1, rows/cols) | match_rms_adamw: x0.2√max(rows, cols) | none
    muon_ns_dtype: str = "auto"  # Newton-Schulz: auto (bfloat16 where the hardware has it) | bfloat16 | float32
    # (the speedrun's model options qk_norm, mlp, zero_init_proj, logit_softcap are ModelFields, model/config.py)

    # ---------------------------------------------------------------------------------------------
    def validate(self) -> TrainConfig:
        """Raise UserError listing every impossible setting; return self."""
        problems = []

        def need(cond: bool, msg: str) -> None:
            if not cond:
                problems.append(msg)

        # the model's options: checked by the model's own rules (vocab_size 0 = from the data)
        problems += shape_problems({**self.model_values(), "vocab_size": max(self.vocab_size, 1)})
        for name in ("batch_size", "gradient_accumulation_steps", "max_iters", "log_interval"):
            need(getattr(self, name) > 0, f"{name} must be positive (got {getattr(self, name)})")
        for name in ("vocab_size", "warmup_iters", "lr_decay_iters", "eval_interval", "checkpoint_interval",
                     "patience", "max_nonfinite_steps", "eval_iters", "final_val_tokens", "num_threads",
                     "eval_tasks_interval", "eval_tasks_shots"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0 (got {getattr(self, name)})")
        for name in ("learning_rate", "min_lr", "weight_decay", "grad_clip", "peak_flops"):
            need(getattr(self, name) >= 0 and math.isfinite(getattr(self, name)), f"{name} must be a finite value >= 0")
        need(self.learning_rate > 0, "learning_rate must be > 0")
        need(self.min_lr <= self.learning_rate,
             f"min_lr={self.min_lr} is above learning_rate={self.learning_rate}; the schedule decays *to* min_lr")
        need(self.warmup_iters <= self.max_iters,
             f"warmup_iters={self.warmup_iters} > max_iters={self.max_iters}: the run would end during warmup; "
             "lower warmup_iters or raise max_iters")
        if self.decay_lr and self.lr_decay_iters:
            need(self.lr_decay_iters >= self.warmup_iters,
                 f"lr_decay_iters={self.lr_decay_iters} < warmup_iters={self.warmup_iters}")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"beta1={self.beta1}, beta2={self.beta2} must be in [0, 1)")
        need(self.eps > 0, "eps must be > 0")
        need(self.eval_interval == 0 or self.eval_iters > 0, "eval_iters must be > 0 when eval_interval > 0")
        need(self.grad_spike_factor > 1, "grad_spike_factor must be > 1")
        need(self.dtype in DTYPES, f"dtype={self.dtype!r} must be one of {DTYPES}")
        need(self.device.split(":")[0] in DEVICES, f"device={self.device!r} must be auto, cpu, cuda, cuda:N or mps")
        need(self.data_format in DATA_FORMATS, f"data_format={self.data_format!r} must be one of {DATA_FORMATS}")
        need(self.jsonl_mode in ("pack", "pad"), f"jsonl_mode={self.jsonl_mode!r} must be pack or pad")
        need(self.batch_sampling in ("random", "doc_aligned"),  # issue 14
             f"batch_sampling={self.batch_sampling!r} must be random or doc_aligned")
        need(self.parallelism in ("ddp", "fsdp"), f"parallelism={self.parallelism!r} must be ddp or fsdp")
        need(self.fsdp_replicas >= 1, f"fsdp_replicas must be >= 1 (got {self.fsdp_replicas})")
        # --- issue 19 ---
        need(self.optimizer in ("adamw", "muon"), f"optimizer={self.optimizer!r} must be adamw or muon")
        need(self.muon_lr > 0 and math.isfinite(self.muon_lr), "muon_lr must be a finite value > 0")
        need(0 <= self.muon_momentum < 1, f"muon_momentum={self.muon_momentum} must be in [0, 1)")
        need(self.muon_ns_steps >= 1, f"muon_ns_steps={self.muon_ns_steps} must be >= 1")
        need(self.muon_weight_decay >= 0, "muon_weight_decay must be >= 0")
        need(self.muon_ns_dtype in ("auto", "bfloat16", "float32"),
             f"muon_ns_dtype={self.muon_ns_dtype!r} must be auto, bfloat16 or float32")
        need(self.muon_adjust_lr in ADJUST_LR_FNS,
             f"muon_adjust_lr={self.muon_adjust_lr!r} must be {', '.join(ADJUST_LR_FNS[:-1])} or {ADJUST_LR_FNS[-1]}")
        if self.init_from.startswith("hf:"):
            need(os.path.isdir(self.init_from[3:]),
                 f"init_from={self.init_from!r}: {self.init_from[3:]!r} is not a folder (hf:DIR names a local "
                 "Hugging Face Llama folder with config.json and model.safetensors)")
        elif self.init_from not in ("scratch", "resume"):
            need(os.path.exists(self.init_from),
                 f"init_from={self.init_from!r} is neither scratch, resume, hf:DIR nor an existing checkpoint "
                 "file or run folder")
        # --- issue 13: values that are accepted by type but make every step NaN or fail later ---
        need(self.seed >= 0, f"seed={self.seed} must be >= 0 (torch seeds are unsigned)")
        need(self.init_std is None or (self.init_std > 0 and math.isfinite(self.init_std)),
             f"init_std={self.init_std} must be a finite value > 0 (or none for the per-layer init)")
        need(self.rope_theta > 0 and math.isfinite(self.rope_theta), f"rope_theta={self.rope_theta} must be > 0")
        need(self.norm_eps > 0 and math.isfinite(self.norm_eps), f"norm_eps={self.norm_eps} must be > 0")
        need(self.keep_checkpoints >= 1, f"keep_checkpoints={self.keep_checkpoints} must be >= 1")
        # --- issue 16: post-training ---
        need(self.lora_rank >= 0 and self.lora_alpha >= 0, "lora_rank and lora_alpha must be >= 0")
        need(0 <= self.lora_dropout < 1, f"lora_dropout={self.lora_dropout} must be in [0, 1)")
        need(self.dpo_beta > 0, f"dpo_beta={self.dpo_beta} must be > 0")
        need(0 <= self.dpo_label_smoothing < 0.5, "dpo_label_smoothing must be in [0, 0.5)")
        need(self.rl_group_size >= 2, f"rl_group_size={self.rl_group_size} must be >= 2 (advantages compare "
             "the completions of one prompt)")
        need(self.rl_max_new_tokens > 0 and self.rl_temperature > 0, "rl_max_new_tokens and rl_temperature must be > 0")
        need(self.rl_clip_eps > 0 and self.rl_kl_coef >= 0, "rl_clip_eps must be > 0 and rl_kl_coef >= 0")
        need(0 <= self.distill_alpha <= 1, f"distill_alpha={self.distill_alpha} must be in [0, 1]")
        need(self.distill_temperature > 0, f"distill_temperature={self.distill_temperature} must be > 0")
        if problems:
            raise UserError("invalid training config:\n  - " + "\n  - ".join(problems))
        return self

    @property
    def effective_lr_decay_iters(self) -> int:
        return self.lr_decay_iters or self.max_iters

    def tokens_per_iter(self) -> int:
        """Tokens per optimizer step, summed over all processes (the global batch: accumulation is global)."""
        return self.batch_size * self.gradient_accumulation_steps * self.context_length

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>", strict: bool = True) -> TrainConfig:
        """Build from a (flat) dict, type-checking every value. strict=False ignores unknown keys
        (a checkpoint written by a newer diyllm)."""
        cfg = cls()
        apply_values(cfg, d, source, from_text=False, strict=strict)
        return cfg

    def pretty(self) -> str:
        """The resolved config, one `key = value` per line, non-default values marked with *."""
        default = TrainConfig()
        lines = []
        for f in fields(self):
            value = getattr(self, f.name)
            mark = "*" if value != getattr(default, f.name) else " "
            lines.append(f" {mark} {f.name:<28} = {value!r}")
        return "\n".join(lines)


# ---- loading ----------------------------------------------------------------------------------------


def field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))


def resolve_config_path(path_or_name: str) -> Path:
    """A file path as given, or a bare name like `shakespeare_char_cpu` -> diyllm/configs/<name>.toml."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    if path.suffix != ".toml" and not path.parent.name:
        candidate = CONFIG_DIR / f"{path_or_name}.toml"
        if candidate.is_file():
            return candidate
    names = available_configs()
    hint = suggest(path.stem, names)
    raise UserError(f"config {path_or_name!r} not found{hint}; shipped configs: {', '.join(names) or '(none)'}")


def load_config(path_or_name: str | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults, then the TOML file (if any), then `--key=value` overrides; validated."""
    cfg = TrainConfig()
    if path_or_name:
        path = resolve_config_path(path_or_name)
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            raise UserError(f"{path}: invalid TOML: {exc}") from exc
        apply_values(cfg, flatten_tables(data, str(path)), str(path), from_text=False)
    if overrides:
        apply_values(cfg, parse_overrides(overrides), "command line", from_text=True)
    return cfg.validate()


def flatten_tables(data: dict[str, Any], source: str) -> dict[str, Any]:
    """`[model] d_model = 384` and `d_model = 384` mean the same; a key set twice is an error."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        items = value.items() if isinstance(value, dict) else [(key, value)]
        for k, v in items:
            if isinstance(v, dict):
                raise UserError(f"{source}: table [{key}.{k}] is nested too deep; use one level of [section]")
            if k in flat:
                raise UserError(f"{source}: option {k!r} is set twice")
            flat[k] = v
    return flat


def parse_overrides(words: list[str]) -> dict[str, str]:
    """`--key=value`, `--key value`, `key=value`, and a bare `--flag` (= true) for booleans."""
    types_ = field_types()
    out: dict[str, str] = {}
    i = 0
    while i < len(words):
        word = words[i]
        body = word[2:] if word.startswith("--") else word
        if "=" in body:
            key, value = body.split("=", 1)
        elif word.startswith("--"):
            key = body
            nxt = words[i + 1] if i + 1 < len(words) else None
            if nxt is not None and not nxt.startswith("--"):
                value, i = nxt, i + 1
            elif _base_type(types_.get(key.replace("-", "_"))) is bool:
                value = "true"
            else:
                raise UserError(f"command line: option --{key} needs a value (--{key}=VALUE)")
        else:
            raise UserError(f"command line: unexpected argument {word!r}; overrides look like --key=value")
        out[key.replace("-", "_")] = value
        i += 1
    return out


def apply_values(cfg: TrainConfig, values: dict[str, Any], source: str, from_text: bool, strict: bool = True) -> None:
    types_ = field_types()
    for key, raw in values.items():
        if key not in types_:
            if not strict:
                continue
            raise UserError(f"{source}: unknown option {key!r}{suggest(key, list(types_))}")
        setattr(cfg, key, coerce(raw, types_[key], key, source, from_text))


def suggest(key: str, names: list[str]) -> str:
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _base_type(tp: Any) -> Any:
    """int for `int | None`; the type itself otherwise."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _optional(tp: Any) -> bool:
    is_union = isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union
    return is_union and type(None) in typing.get_args(tp)


TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def coerce(raw: Any, tp: Any, key: str, source: str, from_text: bool) -> Any:
    """Convert `raw` (a TOML value, or a string from the command line) to the field's type."""
    base = _base_type(tp)

    def bad(expected: str) -> UserError:
        return UserError(f"{source}: option {key!r} expects {expected}, got {raw!r}")

    if typing.get_origin(base) is tuple:  # issue 18: a list of names, from TOML or as "a,b" on the command line
        items = raw.split(",") if isinstance(raw, str) else raw
        if not isinstance(items, (list, tuple)) or not all(isinstance(x, str) for x in items):
            raise bad('a list of names such as ["a", "b"] (or "a,b")')
        return tuple(x.strip() for x in items if x.strip())
    if from_text and isinstance(raw, str) and raw.strip().lower() in ("none", "null") and _optional(tp):
        return None
    if raw is None:
        if _optional(tp):
            return None
        raise bad(base.__name__)
    if base is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, int) and raw in (0, 1):
            return bool(raw)
        if isinstance(raw, str) and raw.strip().lower() in TRUE_WORDS + FALSE_WORDS:
            return raw.strip().lower() in TRUE_WORDS
        raise bad("true/false (or 1/0" + (", or none)" if _optional(tp) else ")"))
    if base is int:
        if isinstance(raw, bool):
            raise bad("an integer")
        if isinstance(raw, int):
            return raw
        if isinstance(raw, float) and raw.is_integer():
            return int(raw)
        if isinstance(raw, str):
            try:
                return int(raw.replace("_", ""))
            except ValueError:
                try:
                    value = float(raw)
                except ValueError:
                    raise bad("an integer") from None
                if value.is_integer():
                    return int(value)
        raise bad("an integer")
    if base is float:
        if isinstance(raw, bool):
            raise bad("a number")
        if isinstance(raw, (int, float)):
            return float(raw)
        if isinstance(raw, str):
            try:
                return float(raw)
            except ValueError:
                raise bad("a number") from None
        raise bad("a number")
    if base is str:
        if isinstance(raw, str):
            return raw
        if from_text:
            return str(raw)
        raise bad("a string (in quotes)")
    raise TypeError(f"unsupported config field type {tp!r} for {key}")


def replace(cfg: TrainConfig, **changes: Any) -> TrainConfig:
    """dataclasses.replace, re-validated."""
    return dataclasses.replace(cfg, **changes).validate()
