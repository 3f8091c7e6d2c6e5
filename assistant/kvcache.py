"""The engine's KV cache: one preallocated buffer per layer, so that a decode step, a
join and a retirement each touch only what changes.

transformers' `DynamicCache` grows by `torch.cat` on every forward pass, which copies
the whole cache of every layer at every decode step (quadratic in the reply's length),
and the engine's joins and retirements re-built every layer with `torch.cat` and
index-selects as well: a request joining with a prompt wider than the running batch
re-padded every running row's cache to its width. `StaticCache` preallocates but has a
fixed batch, with no way to add or drop a row between steps, and transformers'
continuous-batching loop (`PagedAttentionCache`) is a serving loop of its own that
knows nothing of this engine's per-row adapters. So this module keeps, per layer, a
buffer

    keys, values: (row capacity, kv heads, column capacity, head dim)

holding the running rows in `[0, rows)` and their left-padded positions in columns
`[start, end)` (row i's tokens end at column end − 1, as in the engine's left-padded
batch). Then:
- a forward pass writes its new columns at `end` and attends over the views
  `buffer[:rows, :, start:end]` (no copy; the buffer doubles when it is full);
- a join copies only the new rows' prefilled keys into rows `[rows, rows + n)`,
  right-aligned at `end`; a prompt wider than the batch moves `start` left and zeroes
  the running rows' newly exposed columns (masked, but they must not hold stale values)
  instead of copying them;
- a retirement moves only the rows after a retired one down, and drops padding columns
  by moving `start` right.

`SlackCache` is a `DynamicCache` whose layers are `SlackLayer`s, so the model's code
(masks, positions, `get_seq_length`) sees an ordinary dynamic cache.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

RIGHT_SLACK = 128  # free columns allocated past the end: decode steps before the buffer grows


class SlackLayer(DynamicLayer):
    """One layer's keys and values in a preallocated buffer (module docstring)."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.rows, self.start, self.end = 0, 0, 0
        self.k_buf = self.v_buf = None
        self.is_initialized = True

    # -- what the model reads -------------------------------------------------------

    @property
    def keys(self) -> torch.Tensor:
        return self.k_buf[: self.rows, :, self.start : self.end]

    @keys.setter
    def keys(self, value) -> None:  # DynamicLayer.reset assigns None
        if value is None:
            self.k_buf, self.rows, self.start, self.end = None, 0, 0, 0

    @property
    def values(self) -> torch.Tensor:
        return self.v_buf[: self.rows, :, self.start : self.end]

    @values.setter
    def values(self, value) -> None:
        if value is None:
            self.v_buf = None

    def get_seq_length(self) -> int:
        return self.end - self.start if self.is_initialized and self.k_buf is not None else 0

    # -- growth -------------------------------------------------------------------

    def _allocate(self, rows: int, heads: int, columns: int, dim: int, left: int, like: torch.Tensor) -> None:
        """Move the contents into new zeroed buffers of `rows` × `columns`, the live
        columns starting at column `left`."""
        k = like.new_zeros((rows, heads, columns, dim))
        v = like.new_zeros((rows, heads, columns, dim))
        width = self.end - self.start
        if self.k_buf is not None and self.rows:
            k[: self.rows, :, left : left + width] = self.k_buf[: self.rows, :, self.start : self.end]
            v[: self.rows, :, left : left + width] = self.v_buf[: self.rows, :, self.start : self.end]
        self.k_buf, self.v_buf = k, v
        self.start, self.end = left, left + width

    def _ensure(self, rows: int, left_need: int, right_need: int, like: torch.Tensor) -> None:
        """Room for `rows` rows, `left_need` columns before `start` and `right_need` after `end`."""
        if self.k_buf is not None:
            r_cap, heads, cap, dim = self.k_buf.shape
            if rows <= r_cap and self.start >= left_need and cap - self.end >= right_need:
                return
            rows = max(rows, r_cap)
        else:
            heads, dim = like.shape[1], like.shape[3]
        width = self.end - self.start
        left = left_need
        columns = left + width + max(right_need, RIGHT_SLACK, width)  # doubling amortises growth to O(1) per token
        self._allocate(rows, heads, columns, dim, left, like)

    # -- forward passes -------------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the pass's new columns for the running rows; return (keys, values) views."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, _, q, _ = key_states.shape
        if self.k_buf is None:
            self.rows = n
        elif n != self.rows:
            raise ValueError(f"a forward pass over {n} rows on a cache of {self.rows}")
        self._ensure(n, 0, q, key_states)
        self.k_buf[:n, :, self.end : self.end + q] = key_states
        self.v_buf[:n, :, self.end : self.end + q] = value_states
        self.end += q
        return self.keys, self.values

    # -- the engine's joins and retirements -----------------------------------------

    def join(self, other: "SlackLayer", row_capacity: int) -> None:
        """Append `other`'s rows (a fresh prefill), right-aligned at `end`."""
        width, new = self.end - self.start, other.end - other.start
        m = other.rows
        need_left = max(0, new - width)
        self._ensure(max(self.rows + m, row_capacity), need_left, 0, other.k_buf)
        if need_left:  # a wider prompt: expose columns to the left; the running rows' copies there are padding
            self.start -= need_left
            self.k_buf[: self.rows, :, self.start : self.start + need_left] = 0
            self.v_buf[: self.rows, :, self.start : self.start + need_left] = 0
        width = self.end - self.start
        rows = slice(self.rows, self.rows + m)
        pad = width - new
        if pad:  # a narrower prompt: its padding columns must not hold a retired row's values
            self.k_buf[rows, :, self.start : self.start + pad] = 0
            self.v_buf[rows, :, self.start : self.start + pad] = 0
        self.k_buf[rows, :, self.end - new : self.end] = other.k_buf[:m, :, other.start : other.end]
        self.v_buf[rows, :, self.end - new : self.end] = other.v_buf[:m, :, other.start : other.end]
        self.rows += m

    def keep(self, index: list[int], drop_columns: int) -> None:
        """Keep rows `index` (ascending), in that order, and drop the first `drop_columns` live columns."""
        self.start += drop_columns
        for to, frm in enumerate(index):
            if to != frm:
                self.k_buf[to, :, self.start : self.end] = self.k_buf[frm, :, self.start : self.end]
                self.v_buf[to, :, self.start : self.end] = self.v_buf[frm, :, self.start : self.end]
        self.rows = len(index)


class SlackCache(DynamicCache):
    """A DynamicCache whose layers are SlackLayers (module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer_class_to_replicate = SlackLayer

    def join(self, other: "SlackCache", row_capacity: int) -> None:
        for mine, theirs in zip(self.layers, other.layers):
            mine.join(theirs, row_capacity)

    def keep(self, index: list[int], drop_columns: int) -> None:
        for layer in self.layers:
            layer.keep(index, drop_columns)
