"""KV stores: the protocol every world's store follows, and the position-indexed store of the
text diffusion LMs.

A store keeps each layer's K and V rows between model calls. Its caller writes fresh rows, reads
the layer's rows to attend over, and evicts rows it no longer wants. It measures its own memory:

- :meth:`Store.nbytes`: the bytes its K and V tensors occupy now (what the device holds for it;
  bookkeeping excluded). A run records this after each model call (``RunState.record_kv``): Stats
  keep its peak over the run and per step.
- :meth:`Store.history_nbytes`: the bytes of the rows it holds from earlier writes, written and not
  evicted since: what a later call may read without recomputing (VAR's "history KV" before a
  scale, research/var.md §2.1.8). Preallocated room that holds no row is not history.

The text LMs' store is position-indexed: a masked diffusion LM never moves a token, position
``p`` holds the same slot from the first step to the last, only its token changes (mask ->
committed). So each layer keeps one K and one V row per absolute position, keys **after** RoPE
(no re-rotation per step), and a step recomputes only the rows its policy chose and writes them in
place (research/dlm.md §6.1).
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Protocol, runtime_checkable

import torch

from diffcache.kernels import kv_scatter


@runtime_checkable
class Store(Protocol):
    """Per-layer K and V rows kept between model calls (text LMs: one per position; VAR: the
    kept history of the earlier scales). ``rows`` ``[B, n]`` index a layer's row slots; K and V
    are ``[B, H_kv, n, head_dim]``."""

    def write(
        self, layer: int, rows: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Store fresh ``k``/``v`` at ``rows`` of ``layer`` (None: every row, in order)."""

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's K and V ``[B, H_kv, L, head_dim]``, to attend over."""

    def evict(self, layer: int, rows: torch.Tensor) -> None:
        """Drop ``rows`` of ``layer``: they are no longer held (nor history)."""

    def nbytes(self) -> int:
        """Bytes of the K and V tensors the store occupies now."""

    def history_nbytes(self) -> int:
        """Bytes of the rows held from earlier writes (written, not evicted since)."""


class KVStore:
    """The position-indexed :class:`Store`: per layer K and V ``[B, H_kv, L, head_dim]`` each,
    row ``p`` the absolute position ``p``. Preallocated: ``nbytes`` is constant, and
    ``history_nbytes`` counts the positions written and not evicted.

    ``trace`` (when a list) gets ``(step, layer, rows)`` for every write, for tests that check a
    method recomputes exactly the rows its rule says.
    """

    def __init__(
        self,
        num_layers: int,
        batch: int,
        kv_heads: int,
        length: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        backend: str = "auto",
        record: MutableMapping[str, str] | None = None,
    ) -> None:
        shape = (batch, kv_heads, length, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        # [layers, B, L]: the positions holding a written row
        self.held = torch.zeros(num_layers, batch, length, dtype=torch.bool, device=device)
        self.backend, self.record = backend, record  # the scatters' backend, where it is noted
        self.trace: list[tuple[int, int, torch.Tensor]] | None = None

    @classmethod
    def for_model(
        cls,
        model: torch.nn.Module,
        ids: torch.Tensor,
        backend: str = "auto",
        record: MutableMapping[str, str] | None = None,
    ) -> KVStore:
        """An empty store sized for ``model`` and token ids ``[B, L]``."""
        param = next(model.parameters())
        return cls(
            model.num_layers,
            ids.shape[0],
            model.num_kv_heads,
            ids.shape[1],
            model.head_dim,
            param.dtype,
            param.device,
            backend,
            record,
        )

    def write(
        self, layer: int, rows: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, step: int = 0
    ) -> None:
        """Store fresh ``k``/``v`` ``[B, H_kv, n, hd]`` at positions ``rows`` ``[B, n]`` (None:
        every position, in order); ``step`` names the write in the trace."""
        if rows is None:
            self.k[layer].copy_(k)
            self.v[layer].copy_(v)
            self.held[layer] = True
        else:
            kv_scatter(self.k[layer], rows, k, backend=self.backend, record=self.record)
            kv_scatter(self.v[layer], rows, v, backend=self.backend, record=self.record)
            self.held[layer].scatter_(1, rows, True)
        if self.trace is not None:
            all_rows = torch.arange(self.length).expand(k.shape[0], -1) if rows is None else rows
            self.trace.append((step, layer, all_rows.cpu().clone()))

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's K and V at every position (an evicted or unwritten one is zeros)."""
        return self.k[layer], self.v[layer]

    def evict(self, layer: int, rows: torch.Tensor) -> None:
        """Zero the K and V of positions ``rows`` ``[B, n]`` of ``layer``; no longer held."""
        for t in (self.k[layer], self.v[layer]):
            t.scatter_(2, rows[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3]), 0.0)
        self.held[layer].scatter_(1, rows, False)

    @property
    def length(self) -> int:
        return self.k[0].shape[2]

    def nbytes(self) -> int:
        """Bytes of every layer's K and V (the whole preallocated store)."""
        return sum(t.nelement() * t.element_size() for t in (*self.k, *self.v))

    def history_nbytes(self) -> int:
        """Bytes of the K and V rows at the positions written and not evicted since."""
        k, v = self.k[0], self.v[0]
        row = k.shape[1] * k.shape[3] * (k.element_size() + v.element_size())
        return int(self.held.sum()) * row
