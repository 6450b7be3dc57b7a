"""Preference data for DPO: JSONL pairs of a better and a worse reply to the same prompt.

Accepted rows (one JSON object per line):

    {"prompt": "What is 3 + 5?", "chosen": "8", "rejected": "9"}
    {"prompt": [{"role": "system", ...}, {"role": "user", ...}], "chosen": [{"role": "assistant", ...}], ...}
    {"chosen": [...whole conversation...], "rejected": [...same conversation, other last reply...]}

A string prompt is one user turn, a string reply one assistant turn. In the third form the prompt is
the shared part of both conversations before their last assistant turn. Both sides are rendered with
the chat template (diyllm.data.chat_template.encode_chat, the SFT masking code) and the loss mask keeps
only the reply tokens (the last assistant turn and its <|im_end|>), not any earlier assistant turn.

Bad rows (no chosen/rejected, chosen equal to rejected, prompts that differ, a reply that does not fit
in the context) are skipped and counted by reason; the first few are listed as file:line so they can be
fixed. A file with no usable row is an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from diyllm.data.chat_template import add_chat_tokens, encode_chat, validate_conversation
from diyllm.data.jsonl import EpochOrder, is_val_document, iter_jsonl, resolve_jsonl_paths, to_device, trim_padding
from diyllm.data.packed_rows import PackedRows
from diyllm.errors import UserError

SHOWN_PROBLEMS = 5


class PairBatch(NamedTuple):
    """2B rows: the B chosen sequences first, then the B rejected ones (one forward for both)."""

    x: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor

    @property
    def pairs(self) -> int:
        return self.x.shape[0] // 2


@dataclass
class PreferencePair:
    prompt: list[dict]
    chosen: list[dict]  # the reply messages (normally one assistant turn)
    rejected: list[dict]
    where: str = ""


@dataclass
class ReadReport:
    """What reading skipped: counts by reason and the first few places."""

    skipped: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def add(self, reason: str, where: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.examples) < SHOWN_PROBLEMS:
            self.examples.append(f"{where}: {reason}")

    @property
    def total(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        if not self.total:
            return "no rows skipped"
        counts = ", ".join(f"{n} {r}" for r, n in sorted(self.skipped.items()))
        return f"skipped {self.total} rows ({counts}); first: " + "; ".join(self.examples)


def _messages(value: Any, role: str, where: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return validate_conversation(value, where)


def parse_pair(obj: Any, where: str) -> PreferencePair:
    """One row -> PreferencePair; ValueError(reason) for a row to skip, UserError for a malformed one."""
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    if obj.get("chosen") in (None, "", []) or obj.get("rejected") in (None, "", []):
        raise ValueError("missing chosen/rejected")
    if "prompt" in obj:
        prompt = _messages(obj["prompt"], "user", where)
        chosen = _messages(obj["chosen"], "assistant", where)
        rejected = _messages(obj["rejected"], "assistant", where)
    else:  # two whole conversations that differ in their last assistant turn
        a = _messages(obj["chosen"], "assistant", where)
        b = _messages(obj["rejected"], "assistant", where)
        if a[-1]["role"] != "assistant" or b[-1]["role"] != "assistant":
            raise ValueError("conversation does not end with an assistant turn")
        if a[:-1] != b[:-1]:
            raise ValueError("chosen and rejected conversations differ before their last turn")
        prompt, chosen, rejected = a[:-1], a[-1:], b[-1:]
    if chosen == rejected:
        raise ValueError("chosen equals rejected")
    if not prompt:
        raise ValueError("empty prompt")
    return PreferencePair(prompt, chosen, rejected, where)


def read_pairs(spec, split: str | None = None, report: ReadReport | None = None) -> list[PreferencePair]:
    """Pairs of a file/folder/glob; split "train"/"val" applies the hash hold-out (as SFT does)."""
    report = report if report is not None else ReadReport()
    out = []
    for path in resolve_jsonl_paths(spec):
        for lineno, obj in iter_jsonl(path):
            if split is not None and is_val_document(path, lineno) != (split == "val"):
                continue
            where = f"{path}:{lineno}"
            try:
                out.append(parse_pair(obj, where))
            except ValueError as exc:
                report.add(str(exc), where)
    return out


def encode_reply(tokenizer: Any, prompt: list[dict], reply: list[dict]) -> tuple[list[int], list[int]]:
    """(ids, mask) of prompt + reply, mask 1 only on the reply's trained tokens."""
    ids, mask = encode_chat(tokenizer, prompt + reply)
    n_prompt = len(encode_chat(tokenizer, prompt)[0])
    return ids, [0] * n_prompt + mask[n_prompt:]


def fits(ids: list[int], mask: list[int], context_length: int) -> bool:
    """Whether a whole sequence is usable: it fits in context_length + 1 tokens (a cut reply would compare
    log-probabilities of different lengths of text) and trains on at least one target."""
    return len(ids) <= context_length + 1 and sum(mask[1:]) > 0


class PairRows:
    """The usable pairs of one split, held compactly: the chosen and the rejected sequences in two PackedRows
    (row i of each is pair i), ~3 bytes per real token instead of 40 per position of two padded rows."""

    def __init__(self, context_length: int, vocab_size: int):
        self.chosen, self.rejected = PackedRows(context_length, vocab_size), PackedRows(context_length, vocab_size)

    def add(self, chosen: tuple[list[int], list[int]], rejected: tuple[list[int], list[int]]) -> bool:
        """Keep the pair when both sequences fit (see `fits`); returns whether it was kept."""
        T = self.chosen.context_length
        if not (fits(*chosen, T) and fits(*rejected, T)):
            return False
        self.chosen.add(*chosen)
        self.rejected.add(*rejected)
        return True

    def finish(self) -> PairRows:
        self.chosen.finish()
        self.rejected.finish()
        return self

    def __len__(self) -> int:
        return len(self.chosen)

    def padded(self, idx: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(x, y, mask) of the pairs `idx` (all when None), each (N, 2, context_length): [:, 0] chosen, [:, 1]
        rejected, right-padded as in SFT (pad id 0, target IGNORE_INDEX, mask 0)."""
        idx = np.arange(len(self)) if idx is None else idx
        c, r = self.chosen.padded(idx), self.rejected.padded(idx)
        return tuple(np.stack([a, b], axis=1) for a, b in zip(c, r))


def encode_pairs(tokenizer: Any, pairs: list[PreferencePair], context_length: int,
                 report: ReadReport | None = None) -> PairRows:
    """The pairs encoded with the chat template; a pair with a side that does not fit is skipped (and
    counted in `report`)."""
    rows = PairRows(context_length, tokenizer.vocab_size)
    for p in pairs:
        kept = rows.add(encode_reply(tokenizer, p.prompt, p.chosen), encode_reply(tokenizer, p.prompt, p.rejected))
        if not kept and report is not None:
            report.add(f"longer than context_length={context_length}", p.where)
    return rows.finish()


class PreferenceSource:
    """BatchSource of PairBatch for DPO: data_dir (or `data`) = preference JSONL, val_data or the hold-out.

    get_batch returns a PairBatch of 2·batch_size rows (batch_size pairs); rows are served in a seeded
    order, each once per epoch, and the position is part of the state (exact resume). With
    `dynamic_padding` a batch is as long as its longest row instead of context_length.
    """

    def __init__(self, cfg: Any, tokenizer: Any, data: str | None = None, log=print):
        self.context_length = int(cfg.context_length)
        add_chat_tokens(tokenizer)
        self.tokenizer, self.tokenizer_path = tokenizer, None
        self.vocab_size = int(tokenizer.vocab_size)
        self.bytes_per_token = None
        self.rank, self.world_size = 0, 1
        spec = data or cfg.data_dir
        val_spec = getattr(cfg, "val_data", "") or ""
        self.dynamic_padding = bool(getattr(cfg, "dynamic_padding", False))
        self.rows: dict[str, PairRows] = {}
        self.order: dict[str, EpochOrder] = {}
        self.reports: dict[str, ReadReport] = {}
        seed = int(getattr(cfg, "seed", 1337))
        for split in ("train", "val"):
            report = ReadReport()
            src = val_spec if (split == "val" and val_spec) else spec
            pairs = read_pairs(src, None if val_spec else split, report)
            rows = encode_pairs(tokenizer, pairs, self.context_length, report)
            self.reports[split] = report
            if report.total:
                log(f"preference data ({split}): {report.summary()}")
            if len(rows) == 0:
                raise UserError(f"no usable {split} preference pairs in {src} ({report.summary()}); rows need "
                                '"chosen" and "rejected" replies that differ and fit in context_length')
            self.rows[split], self.order[split] = rows, EpochOrder(len(rows), seed * 2 + (split == "val"))
        self.pairs = {s: len(r) for s, r in self.rows.items()}

    def set_rank(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = int(rank), int(world_size)

    def get_batch(self, split: str, batch_size: int, device) -> PairBatch:
        idx = self.order[split].take(batch_size * self.world_size)[self.rank :: self.world_size]
        rows = self.rows[split]
        # chosen rows, then rejected rows: (2B, T)
        x, y, m = (np.concatenate([c, r]) for c, r in zip(rows.chosen.padded(idx), rows.rejected.padded(idx)))
        if self.dynamic_padding:
            x, y, m = trim_padding(x, y, m)
        return PairBatch(*to_device(x, y, m, device))

    def state_dict(self) -> dict:
        return {"kind": "preference", **{s: o.state_dict() for s, o in self.order.items()}}

    def load_state_dict(self, state: dict) -> None:
        for split, order in self.order.items():
            if split in state:
                order.load_state_dict(state[split])
