"""A slot-based KV cache for continuous batching, and the layout of one forward pass over it.

Each running sequence owns a row of a preallocated cache, per layer

    keys, values: (rows + 1, H_kv, capacity, head_dim)

and its own length. A forward pass takes any subset of rows, each with its own number of new tokens
(one when decoding, a chunk of the prompt when prefilling): the new tokens are left-padded into
input_ids (n, T); `position_ids` (n, T) continue each row where it stopped; the keys/values of the new
tokens are written at those positions of the row, and attention reads columns [0, kv_len) of the rows
under an explicit 4D mask (n, 1, T, kv_len) that lets a token see only its own row's earlier positions.
Padding tokens write into a scratch row (the last one) that no sequence reads, so they never touch real
entries. Sequences join and leave between forward passes; the engine keeps the running rows packed at the
front (`move_row` when one leaves), so a pass over rows [a, b) reads its keys and values as views of the
cache, without copying them.

The capacity starts small and doubles (up to the longest sequence allowed) as sequences grow, so memory
follows the workload. `SlotKVCache` is a transformers `Cache`: attention layers call `update()` as they
do with the usual caches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

INITIAL_CAPACITY = 128


@dataclass
class RowWork:
    """One row of a forward pass: the cache row, how many tokens it already holds, its new tokens."""

    row: int
    past: int
    tokens: list[int]


@dataclass
class StepLayout:
    """The tensors of one forward pass (see the module docstring)."""

    input_ids: torch.Tensor  # (n, T), left-padded
    position_ids: torch.Tensor  # (n, T)
    attention_mask: torch.Tensor  # (n, 1, T, kv_len), additive: 0 = attend, dtype-min = masked
    write_rows: torch.Tensor  # (n, T) cache row of each new token (the scratch row for padding)
    write_positions: torch.Tensor  # (n, T)
    read_rows: torch.Tensor  # (n,)
    read_range: tuple[int, int] | None  # (first, end) when the rows are consecutive: read a view, not a copy
    kv_len: int


def build_layout(work: list[RowWork], pad_id: int, scratch_row: int, dtype: torch.dtype,
                 device: torch.device) -> StepLayout:
    width = max(len(w.tokens) for w in work)
    n = len(work)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    positions = torch.zeros((n, width), dtype=torch.long)
    write_rows = torch.full((n, width), scratch_row, dtype=torch.long)
    for i, w in enumerate(work):
        start = width - len(w.tokens)
        input_ids[i, start:] = torch.tensor(w.tokens, dtype=torch.long)
        positions[i, start:] = torch.arange(w.past, w.past + len(w.tokens))
        write_rows[i, start:] = w.row
    kv_len = max(w.past + len(w.tokens) for w in work)
    # a padding query sits at position 0 and so sees key 0 only: finite garbage, never NaN, never read back
    visible = torch.arange(kv_len)[None, None, :] <= positions[:, :, None]  # (n, T, kv_len)
    mask = torch.zeros((n, 1, width, kv_len), dtype=dtype)
    mask.masked_fill_(~visible[:, None], torch.finfo(dtype).min)
    rows = [w.row for w in work]
    consecutive = rows == list(range(rows[0], rows[0] + n))
    return StepLayout(input_ids.to(device), positions.to(device), mask.to(device), write_rows.to(device),
                      positions.to(device), torch.tensor(rows, device=device),
                      (rows[0], rows[0] + n) if consecutive else None, kv_len)


class SlotKVCache(Cache):
    """Keys and values of up to `rows` sequences, per layer; the storage is allocated at the first update."""

    def __init__(self, rows: int, max_len: int, initial_capacity: int = INITIAL_CAPACITY) -> None:
        super().__init__(layers=[])
        self.rows = rows
        self.scratch_row = rows  # padding tokens write here
        self.max_len = max_len
        self.capacity = min(initial_capacity, max_len)
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.layout: StepLayout | None = None

    def ensure_capacity(self, length: int) -> None:
        """Make room for `length` positions per row (doubling; existing entries are kept)."""
        if length > self.max_len:
            raise ValueError(f"a sequence of {length} tokens does not fit the cache (max {self.max_len})")
        if length <= self.capacity:
            return
        capacity = self.capacity
        while capacity < length:
            capacity = min(capacity * 2, self.max_len)
        for store in (self.keys, self.values):
            for layer, old in store.items():
                new = old.new_zeros(*old.shape[:2], capacity, old.shape[-1])
                new[:, :, :self.capacity] = old
                store[layer] = new
        self.capacity = capacity

    def move_row(self, source: int, target: int, length: int) -> None:
        """Copy the first `length` positions of row `source` into row `target` (compaction, see the engine)."""
        for store in (self.keys, self.values):
            for cache in store.values():
                cache[target, :, :length] = cache[source, :, :length]

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for store in (self.keys, self.values) for t in store.values())

    # ---- what attention layers call ----------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict | None = None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values (n, H, T, D) of this pass; return the rows' keys/values (n, H, kv_len, D).
        The attention's extra arguments (`cache_kwargs` up to transformers 5.23, `kwargs=` from 5.24: rotary
        tables, positions) are not needed: the pass's layout says where each token goes."""
        layout = self.layout
        out = []
        for store, states in ((self.keys, key_states), (self.values, value_states)):
            if layer_idx not in store:
                store[layer_idx] = states.new_zeros(self.rows + 1, states.shape[1], self.capacity, states.shape[-1])
            cache = store[layer_idx]
            # advanced indices around a slice: the indexed view is (n, T, H, D)
            cache[layout.write_rows, :, layout.write_positions] = states.transpose(1, 2).to(cache.dtype)
            if layout.read_range is not None:
                rows = cache[layout.read_range[0]:layout.read_range[1]]
            else:
                rows = cache.index_select(0, layout.read_rows)
            out.append(rows[:, :, :layout.kv_len])
        return out[0], out[1]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.layout is None else self.layout.kv_len

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.max_len

    @property
    def is_compileable(self) -> bool:
        return False

