"""Guarding the compiled decode step once per generation instead of at every step (CPU).

Before each call of a compiled function, TorchDynamo checks that what the graph was traced against
still holds: every submodule's type, each attribute the code read (`qk_norm`, `eps`, `pad`, ...), and
every parameter's and buffer's shape, dtype and strides. For the 6-layer benchmark model that is
about 900 checks on the model and the KV cache, 24 us of a 0.45 ms int8 step. None of it can change
between two steps of one generation, so the CPU step drops those checks (`keep_input_guards`) and
`structure_signature` stands in for them, compared once per generation by `decoder_for`:

* models with equal signatures share one graph (the graph reads the tensors of the model it is given,
  so new weights, in place or in a new copy, are used as they are);
* a model changed in place (a flag, a swapped layer, another dtype) gets a different signature, and
  so a new StaticDecoder and its own compiled step.

Each signature's step is its own torch.compile region (`isolate_recompiles`), so no other model's
graph is ever looked up for it. What is not covered: changing a model between two steps of a running
generation (from code that consumes the stream), which the per-step guards would have caught.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

# torch.compile(isolate_recompiles=True) (recent torch) keeps each compiled step's graphs apart; without
# it graphs are shared by code object, and dropping the model's guards would let one model run another's.
CAN_SKIP_MODEL_GUARDS = hasattr(torch, "compile") and "isolate_recompiles" in inspect.signature(
    torch.compile).parameters

_SKIPPED_ROOTS = ("model", "cache")  # the step's arguments whose guards the signature replaces


def structure_signature(model: nn.Module) -> tuple:
    """What a compiled graph of `model` depends on besides the values in its tensors: every submodule's
    name and type, and the state of each attribute (tensors by shape, strides, dtype and device)."""
    return tuple((name, type(m), _attributes(m)) for name, m in model.named_modules(remove_duplicate=False))


def _attributes(module: nn.Module) -> tuple:
    return tuple((key, _state(value)) for key, value in sorted(vars(module).items()))


_PLAIN = frozenset({bool, int, float, str, type(None), torch.dtype, torch.device})


def _state(value: Any) -> Any:
    """A comparable stand-in for one attribute value (checked in order of frequency: a model has
    about a thousand attributes, mostly flags and empty hook dicts)."""
    kind = type(value)
    if kind in _PLAIN:
        return value
    if isinstance(value, dict):  # _parameters, _buffers, _modules, hook dicts
        return (kind, *((key, _state(item)) for key, item in value.items())) if value else kind
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.stride(), value.dtype, value.device, value.requires_grad)
    if isinstance(value, nn.Module):
        return ("module", kind)  # its own entry in structure_signature holds the rest
    if isinstance(value, (list, tuple)):
        return (kind, *map(_state, value))
    if isinstance(value, (set, frozenset)):  # e.g. _non_persistent_buffers_set (names)
        return (kind, *sorted(map(repr, value)))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # configs: by their fields
        return (kind, *(_state(getattr(value, f.name)) for f in dataclasses.fields(value)))
    return (kind, id(value))  # anything else (a hook, a function): that very object


def keep_input_guards(entries: Sequence[Any]) -> list[bool]:
    """torch.compile's guard_filter_fn: keep the guards on the step's own inputs (tokens, positions, the
    visible span), on globals and on global state; drop those on the model and the cache."""
    return [not _rooted_at(entry.name, _SKIPPED_ROOTS) for entry in entries]


def _rooted_at(name: str, roots: tuple[str, ...]) -> bool:
    return any(name == root or name.startswith((f"{root}.", f"{root}[")) for root in roots)


# (batch size, signature, ...) -> the compiled step every model of that structure shares, least recently
# used first. Bounded: a notebook that samples at many batch sizes would otherwise keep a graph for each.
MAX_SHARED_STEPS = 8
_SHARED_STEPS: OrderedDict[tuple, Callable] = OrderedDict()


def shared_step(step: Callable, key: tuple, options: dict | None = None) -> Callable:
    """The compiled `step` for models whose signature is in `key`, compiled on first use; `options` are
    inductor's (e.g. the C++ wrapper). Past MAX_SHARED_STEPS the least recently used one is dropped.

    Each key compiles its own copy of `step`'s code object: TorchDynamo keeps compiled graphs on the code
    object they were traced from, so with one shared code object a dropped step's graphs would stay
    reachable for the life of the process; with a copy they go when the last decoder using it does."""
    if key in _SHARED_STEPS:
        _SHARED_STEPS.move_to_end(key)
        return _SHARED_STEPS[key]
    own = types.FunctionType(step.__code__.replace(), step.__globals__, step.__name__, step.__defaults__,
                             step.__closure__)
    own.__kwdefaults__, own.__qualname__, own.__doc__ = step.__kwdefaults__, step.__qualname__, step.__doc__
    _SHARED_STEPS[key] = torch.compile(own, dynamic=False, fullgraph=True, isolate_recompiles=True,
                                       options={"guard_filter_fn": keep_input_guards, **(options or {})})
    while len(_SHARED_STEPS) > MAX_SHARED_STEPS:
        _SHARED_STEPS.popitem(last=False)
    return _SHARED_STEPS[key]
