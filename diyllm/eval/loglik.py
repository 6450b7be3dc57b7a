"""Log-likelihood of continuations given contexts: the engine under every multiple-choice task.

A request is (context ids, continuation ids); its score is the summed log-probability of the continuation
tokens, plus whether each of them is the greedy (argmax) token, as lm-eval's `loglikelihood` returns.
No KV cache: one forward per row.

Two ways to lay requests out in rows, with the same results (tests/test_eval.py checks that they agree):

* plain: one row per request, `(context + continuation)[-(window + 1):][:-1]` exactly as lm-eval's `hf`
  model builds it, so a context longer than the model's window is cut on the left (counted).
* packed (default when it fits): the requests of one item start with the same tokens (the shared
  context; for Winogrande the sentence up to the blank), so those run once and every request's own
  remaining tokens follow in the same row: `shared | rest1[:-1] | rest2[:-1] | ...`. Each request's tokens
  get the positions they would have in their own row, and an attention mask lets them see the shared
  tokens and their own earlier tokens only, never another request's. For MMLU's one-token answers the
  whole item is one forward of the context alone; for HellaSwag it roughly halves the tokens run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Request = tuple[list[int], list[int]]  # (context ids, continuation ids)


def encode_pair(tokenizer: Any, context: str, continuation: str, prefix_id: int | None = None) -> Request:
    """Token ids of (context, continuation) split the way lm-eval does it.

    Trailing spaces of the context move to the continuation, the whole string is encoded at once and the
    continuation is what follows the context's own encoding, so tokens spanning the boundary are not split
    differently from how the model saw text in training. An empty context becomes `[prefix_id]` (the
    end-of-text token), as in lm-eval.
    """
    if not context:
        if prefix_id is None:
            raise ValueError("an empty context needs a prefix token (the tokenizer has no end-of-text token)")
        return [prefix_id], tokenizer.encode(continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx):]


@dataclass
class _Row:
    tokens: list[int]
    positions: list[int]
    segments: list[int]  # 0: the shared context (or a plain row), i: packed choice i
    # (group index, request index, logit positions, target ids) of every request scored in this row
    targets: list[tuple[int, int, list[int], list[int]]] = field(default_factory=list)


def _plain_row(g: int, r: int, ctx: list[int], cont: list[int], window: int) -> tuple[_Row, bool]:
    seq = ctx + cont
    truncated = len(seq) > window + 1
    seq = seq[-(window + 1):]
    tokens = seq[:-1]
    n = min(len(cont), len(tokens))
    row = _Row(tokens, list(range(len(tokens))), [0] * len(tokens))
    row.targets.append((g, r, list(range(len(tokens) - n, len(tokens))), seq[-n:]))
    return row, truncated


def _common_prefix(seqs: Sequence[list[int]]) -> int:
    n = min(len(x) for x in seqs)
    i = 0
    while i < n and all(x[i] == seqs[0][i] for x in seqs):
        i += 1
    return i


def _packed_row(g: int, group: Sequence[Request], shared: int) -> _Row:
    """One row: the `shared` tokens every request starts with, then each request's own remaining input."""
    seqs = [ctx + cont for ctx, cont in group]
    head = seqs[0][:shared]
    row = _Row(list(head), list(range(shared)), [0] * shared)
    for r, ((ctx, _), seq) in enumerate(zip(group, seqs)):
        start, body = len(row.tokens), seq[shared:-1]
        row.tokens += body
        row.positions += range(shared, shared + len(body))
        row.segments += [r + 1] * len(body)
        # token j of seq is predicted at input j - 1: in the shared head, or in this request's body
        inputs = [j - 1 if j - 1 < shared else start + j - 1 - shared for j in range(len(ctx), len(seq))]
        row.targets.append((g, r, inputs, seq[len(ctx):]))
    return row


def _packable(group: Sequence[Request], window: int) -> int:
    """Length of the shared token prefix when the group can go in one packed row, else 0."""
    if len(group) < 2 or any(not ctx or not cont for ctx, cont in group):
        return 0
    seqs = [ctx + cont for ctx, cont in group]
    shared = _common_prefix(seqs)
    packed_len = shared + sum(max(0, len(x) - 1 - shared) for x in seqs)
    return shared if shared and packed_len <= window else 0


def build_rows(groups: Sequence[Sequence[Request]], window: int, pack: bool = True) -> tuple[list[_Row], int]:
    """Rows for all requests (packed where the choices share a context and fit) and how many were cut."""
    rows, truncated = [], 0
    for g, group in enumerate(groups):
        shared = _packable(group, window) if pack else 0
        if shared:
            rows.append(_packed_row(g, group, shared))
            continue
        for r, (ctx, cont) in enumerate(group):
            if not cont:
                raise ValueError("an empty continuation has no log-likelihood to score")
            row, cut = _plain_row(g, r, ctx, cont, window)
            rows.append(row)
            truncated += cut
    return rows, truncated


def _batch_inputs(rows: Sequence[_Row], device: torch.device) -> dict[str, torch.Tensor | None]:
    """input_ids (right-padded) and, when a row is packed, per-token positions and the attention mask."""
    T = max(len(r.tokens) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r.tokens)] = torch.tensor(r.tokens)
    inputs: dict[str, torch.Tensor | None] = {"input_ids": ids.to(device)}
    if not any(s for r in rows for s in r.segments):
        return inputs  # plain rows: right padding is invisible to a causal model, no mask needed
    pos = torch.zeros(len(rows), T, dtype=torch.long)
    seg = torch.full((len(rows), T), -1, dtype=torch.long)  # -1: padding
    for b, r in enumerate(rows):
        pos[b, : len(r.tokens)] = torch.tensor(r.positions)
        seg[b, : len(r.tokens)] = torch.tensor(r.segments)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    key_seg, query_seg = seg[:, None, :], seg[:, :, None]
    mask = causal & (key_seg >= 0) & ((key_seg == 0) | (key_seg == query_seg))
    mask |= torch.eye(T, dtype=torch.bool)  # a padding query attends to itself (no all-masked row)
    inputs["positions"] = pos.to(device)
    inputs["attn_mask"] = mask[:, None].to(device)
    return inputs


def _model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _score_targets(logits: torch.Tensor, batch: Sequence[_Row]) -> list[tuple[float, bool]]:
    """(summed log-probability, all greedy) of every request in the batch, with one gather for all of them
    and one transfer to the host (a loop of .item() calls would sync the GPU once per request)."""
    rows, positions, targets, owner = [], [], [], []
    requests = [(b, pos, tgt) for b, row in enumerate(batch) for _, _, pos, tgt in row.targets]
    for k, (b, pos, tgt) in enumerate(requests):
        rows += [b] * len(pos)
        positions += pos
        targets += tgt
        owner += [k] * len(pos)
    dev = logits.device
    picked = logits[torch.tensor(rows, device=dev), torch.tensor(positions, device=dev)].float()  # (tokens, vocab)
    tgt = torch.tensor(targets, device=dev)
    token_logp = F.log_softmax(picked, dim=-1).gather(-1, tgt[:, None])[:, 0]
    missed = (picked.argmax(-1) != tgt).float()
    n = len(requests)
    idx = torch.tensor(owner, device=dev)
    sums = torch.zeros(n, device=dev, dtype=torch.float32).index_add_(0, idx, token_logp)
    misses = torch.zeros(n, device=dev, dtype=torch.float32).index_add_(0, idx, missed)
    return [(ll, m == 0) for ll, m in zip(sums.tolist(), misses.tolist())]


@torch.no_grad()
def loglikelihoods(
    model: nn.Module,
    groups: Sequence[Sequence[Request]],
    window: int,
    batch_size: int = 16,
    pack: bool = True,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[list[tuple[float, bool]]], int]:
    """Per group (item), per request (choice): (summed log-probability, every token greedy); and the number
    of requests whose context was left-truncated to fit `window` tokens.

    Rows are scored longest first in batches of `batch_size` (little padding, the largest batch first so
    memory trouble shows at once); `progress(n)` is called with the number of groups finished per batch.
    """
    rows, truncated = build_rows(groups, window, pack)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].tokens))
    results: list[list[tuple[float, bool] | None]] = [[None] * len(g) for g in groups]
    device = _model_device(model)
    for start in range(0, len(order), batch_size):
        batch = [rows[i] for i in order[start : start + batch_size]]
        out = model(**_batch_inputs(batch, device))
        logits = out.logits if hasattr(out, "logits") else out
        owners = [(g, r) for row in batch for g, r, _, _ in row.targets]
        for (g, r), score in zip(owners, _score_targets(logits, batch)):
            results[g][r] = score
        done = {g for g, _ in owners if all(x is not None for x in results[g])}
        if progress is not None:
            progress(len(done))
    return [list(r) for r in results], truncated  # type: ignore[arg-type]
