"""A preallocated key/value cache: decode one token per step without recomputing the prefix.

Each layer's keys and values (after RoPE) are written once into a fixed buffer; a decode step then
costs attention over the cache plus one token's worth of matmuls, instead of the whole sequence.
"""

from __future__ import annotations

import torch


class KVBuffers:
    """The storage both caches share: one (num_layers, B, Hkv, max_len, D) buffer each for keys and values,
    with per-layer views, so a step writes with one op per tensor; `for_model` sizes it from a model."""

    spare_columns = 0  # allocated past max_len, never written or read (StaticKVCache needs one)

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        shape = (num_layers, batch_size, num_kv_heads, max_len + self.spare_columns, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self._k_layers, self._v_layers = self.k.unbind(0), self.v.unbind(0)
        self.max_len, self.batch_size = max_len, batch_size

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None,
                  **kwargs):
        c = model.config
        param = next(model.parameters())
        return cls(c.num_layers, batch_size, c.num_kv_heads, c.head_dim, max_len or c.context_length,
                   device=param.device, dtype=dtype or param.dtype, **kwargs)


class KVCache(KVBuffers):
    """Decode-time cache whose readers see a growing slice: columns 0..length of each layer's buffers."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.length = 0  # tokens stored so far (the same for every layer once a forward completes)

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v (B, Hkv, T, D) after the cached tokens; return all keys/values so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(
                f"KV cache full: {end} tokens > max_len={self.max_len} (the model's context_length); "
                "stop generation earlier or slide the window"
            )
        k_all, v_all = self._k_layers[layer_idx], self._v_layers[layer_idx]
        k_all.narrow(2, start, end - start).copy_(k)
        v_all.narrow(2, start, end - start).copy_(v)
        return k_all.narrow(2, 0, end), v_all.narrow(2, 0, end)

    def advance(self, num_tokens: int) -> None:
        """Called by the model after every layer has stored its k/v for this forward."""
        self.length += num_tokens

    def reset(self) -> None:
        self.length = 0


class StaticKVCache(KVBuffers):
    """A KV cache whose every tensor keeps one shape and one address, for a compiled decode step.

    `KVCache` returns a growing slice of its buffers, so each decode step has new shapes (a compiled
    graph would be rebuilt, or made dynamic). Here `update` returns the whole (max_len) buffer and the
    caller says, in tensors, which columns to write (`index`), which are visible (`visible`, (B,
    max_len) bool) and the RoPE positions; the Python object never changes between steps. Attention
    reads as many leading columns as the caller's mask is wide (all max_len, or the filled span). `length`
    stays 0 and `advance` does nothing: the model's host-side bookkeeping is not used (the caller passes
    positions and the attention mask explicitly, which the model requires with this cache).
    """

    length = 0
    # One spare column past max_len, never written or read. A compiled step whose span (the columns
    # it reads) is a dynamic size would otherwise see, at span == max_len, a view that is the whole
    # buffer: torch's matmul and reshape check for contiguous inputs, and that check would pin the
    # span to a constant (a recompile, or an error). With the spare column no span view is contiguous.
    spare_columns = 1

    def __init__(self, *args, per_row: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        device = self.k.device
        self.index = torch.zeros(1, dtype=torch.long, device=device)  # the column(s) the next forward writes
        self.visible = torch.zeros(self.batch_size, self.max_len, dtype=torch.bool, device=device)
        # per_row: every row writes its one new token at its own column, row_columns[b] (a server's slots,
        # whose rows started at different times); the spare column max_len takes a row that writes nothing.
        self.rows = torch.arange(self.batch_size, device=device) if per_row else None
        self.row_columns = torch.zeros(self.batch_size, dtype=torch.long, device=device) if per_row else None

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor a compiled step reads or writes (for torch._dynamo.mark_static_address)."""
        per_row = [self.rows, self.row_columns] if self.rows is not None else []
        return [self.k, self.v, self.index, self.visible, *per_row]

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v (B, Hkv, T, D) at columns `index` (T of them), or with per_row one token per row at
        `row_columns`; return all max_len columns."""
        k_all, v_all = self._k_layers[layer_idx], self._v_layers[layer_idx]
        if self.rows is not None:  # the first B slots only (B = k's batch: a compiled step's dynamic size)
            B = k.shape[0]
            k_all[self.rows[:B], :, self.row_columns[:B]] = k[:, :, 0]
            v_all[self.rows[:B], :, self.row_columns[:B]] = v[:, :, 0]
            k_all, v_all = k_all.narrow(0, 0, B), v_all.narrow(0, 0, B)
        else:
            k_all.index_copy_(2, self.index, k)
            v_all.index_copy_(2, self.index, v)
        # narrowed after the write: a compiled graph writes out of place, and only a view of the
        # written buffer keeps the spare column's stride
        return k_all.narrow(2, 0, self.max_len), v_all.narrow(2, 0, self.max_len)

    def advance(self, num_tokens: int) -> None:
        """Nothing to count on the host: the caller moves `index` and `visible`."""

    def reset(self) -> None:
        self.visible.zero_()
