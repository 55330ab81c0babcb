"""The position-indexed KV store of text diffusion LMs.

A masked diffusion LM never moves a token: position ``p`` holds the same slot from the first step
to the last, only its token changes (mask -> committed). So each layer keeps one K and one V row
per absolute position, keys **after** RoPE (no re-rotation per step), and a step recomputes only
the rows its policy chose and writes them in place (research/dlm.md §6.1).
"""

from __future__ import annotations

from collections.abc import MutableMapping

import torch

from diffcache.kernels import kv_scatter


class KVStore:
    """Per-layer K and V, ``[B, H_kv, L, head_dim]`` each, indexed by absolute position.

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
        self, layer: int, rows: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, step: int
    ) -> None:
        """Store fresh ``k``/``v`` ``[B, H_kv, n, hd]`` at positions ``rows`` ``[B, n]`` (None:
        every position, in order)."""
        if rows is None:
            self.k[layer].copy_(k)
            self.v[layer].copy_(v)
        else:
            kv_scatter(self.k[layer], rows, k, backend=self.backend, record=self.record)
            kv_scatter(self.v[layer], rows, v, backend=self.backend, record=self.record)
        if self.trace is not None:
            all_rows = torch.arange(self.length).expand(k.shape[0], -1) if rows is None else rows
            self.trace.append((step, layer, all_rows.cpu().clone()))

    @property
    def length(self) -> int:
        return self.k[0].shape[2]

    def nbytes(self) -> int:
        return sum(t.nelement() * t.element_size() for t in (*self.k, *self.v))
