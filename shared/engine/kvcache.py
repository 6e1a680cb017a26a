"""The KV cache of one model runner (one stage): a preallocated *slab* with dense rows.

Design: slab, not paged. One tensor is allocated once per runner,
``[layers, 2 (k|v), rows, kv_heads, row_len, head_dim]``; each running request owns one row
(``row_len`` token slots). Why a slab:

- Batched decode attention reads ``slab[layer, k, lo:hi, :, :max_len]`` — a *view*, so
  ``F.scaled_dot_product_attention`` runs over all requests of a step with a padding mask and
  no gather. A paged cache needs either a paged-attention kernel (torch has none on CPU) or a
  gather of every request's blocks into a contiguous tensor at every layer of every step,
  which on CPU costs about as much memory traffic as the attention itself.
- Rows are kept *dense* (``0..n-1`` in use): when a request leaves, the last row's contents
  move into the hole (one copy of one request's KV, once per finish), so the decode batch is
  almost always a contiguous range of rows.
- Nothing is allocated per step; writes are in place.

The price is memory granularity: a request reserves ``row_len`` tokens whatever its length.
``row_len`` (the longest sequence the engine accepts) is configurable so that operators can
trade context length for concurrency; the budget buys ``budget_bytes // row_bytes`` rows. When
the budget cannot hold one full-context row, rows shrink to what fits (one row), and a request
longer than a row can never fit (:class:`~shared.errors.KVCacheFull`).

This module does no scheduling: the scheduler counts rows (``capacity``) and the runner opens
a row on a request's first chunk and closes it when the engine finishes or cancels it.
"""

from __future__ import annotations

import torch

from shared.errors import ConfigError, EngineError, KVCacheFull


def kv_bytes_per_token(
    num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    """Bytes one token's K and V take over ``num_layers`` layers."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * num_kv_heads * head_dim * element


def plan_slab(
    budget_bytes: int, bytes_per_token: int, max_seq_len: int, max_rows: int | None = None
) -> tuple[int, int]:
    """``(rows, row_len)`` for a budget: full-length rows when at least one fits."""
    if bytes_per_token <= 0:
        raise ConfigError("kv_budget_bytes", "a stage with no layers has no KV cache to size")
    row_bytes = bytes_per_token * max_seq_len
    rows = budget_bytes // row_bytes
    if max_rows is not None:
        rows = min(rows, max_rows)
    if rows >= 1:
        return int(rows), max_seq_len
    row_len = budget_bytes // bytes_per_token
    if row_len < 1:
        raise ConfigError(
            "kv_budget_bytes",
            f"{budget_bytes} bytes cannot hold the KV of a single token ({bytes_per_token} bytes)",
        )
    return 1, int(row_len)


class KVCache:
    """A slab of ``rows`` rows of ``row_len`` tokens for ``num_layers`` layers."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        rows: int,
        row_len: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if rows < 1 or row_len < 1:
            raise ConfigError("kv_cache", f"rows ({rows}) and row_len ({row_len}) must be >= 1")
        self.num_layers = num_layers
        self.rows = rows
        self.row_len = row_len
        self.slab = torch.zeros(
            (max(num_layers, 1), 2, rows, num_kv_heads, row_len, head_dim),
            dtype=dtype,
            device=device,
        )
        self.row_of: dict[str, int] = {}
        self._owner: list[str | None] = [None] * rows
        # tokens stored per row (host side: the scheduler of this step already knows them)
        self.lengths: list[int] = [0] * rows

    @property
    def used_rows(self) -> int:
        return len(self.row_of)

    @property
    def free_rows(self) -> int:
        return self.rows - len(self.row_of)

    @property
    def used_tokens(self) -> int:
        return sum(self.lengths[: self.used_rows])

    @property
    def total_tokens(self) -> int:
        return self.rows * self.row_len

    @property
    def nbytes(self) -> int:
        return self.slab.numel() * self.slab.element_size()

    def keys(self, layer: int) -> torch.Tensor:
        return self.slab[layer, 0]

    def values(self, layer: int) -> torch.Tensor:
        return self.slab[layer, 1]

    def open(self, request_id: str) -> int:
        """The request's row, opening one if it has none; :class:`KVCacheFull` if none is free."""
        row = self.row_of.get(request_id)
        if row is not None:
            return row
        if not self.free_rows:
            raise KVCacheFull(
                f"KV cache full: all {self.rows} rows in use", request_id=request_id, rows=self.rows
            )
        row = len(self.row_of)
        self.row_of[request_id] = row
        self._owner[row] = request_id
        self.lengths[row] = 0
        return row

    def close(self, request_id: str) -> bool:
        """Free the request's row (False if it had none); keeps the used rows dense."""
        row = self.row_of.pop(request_id, None)
        if row is None:
            return False
        last = len(self.row_of)  # index of the last used row before the pop
        if row != last:
            moved = self._owner[last]
            if moved is None:  # pragma: no cover - invariant: rows 0..n-1 have owners
                raise EngineError("KV cache rows are not dense")
            length = self.lengths[last]
            if length:
                self.slab[:, :, row, :, :length].copy_(self.slab[:, :, last, :, :length])
            self.row_of[moved] = row
            self._owner[row] = moved
            self.lengths[row] = length
        self._owner[last] = None
        self.lengths[last] = 0
        return True

    def fork(self, parent: str, child: str) -> int:
        """Open a row for ``child`` holding a copy of ``parent``'s cached positions (several
        sequences of one request share its prefill); :class:`KVCacheFull` if none is free."""
        src = self.row_of.get(parent)
        if src is None:
            raise EngineError(f"request {parent!r} has no KV row to fork", request_id=parent)
        row = self.open(child)
        length = self.lengths[src]
        if length:
            self.slab[:, :, row, :, :length].copy_(self.slab[:, :, src, :, :length])
        self.lengths[row] = length
        return row

    def length_of(self, request_id: str) -> int:
        row = self.row_of.get(request_id)
        return 0 if row is None else self.lengths[row]
