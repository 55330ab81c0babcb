"""One forward pass of a text diffusion LM over the rows a step plan chose.

The model (LLaDA or Dream, ``diffcache.pipelines``) exposes its layers as ``qkv`` -> ``attend``
-> ``finish``; this loop runs them on the plan's rows only, writes the fresh K/V rows into the
store, attends over every stored row, and applies the LM head only to the rows whose logits the
sampler needs. With every row planned it performs exactly the model's own forward.

A batch's ragged row sets are padded to one width by repeating a row's first position. The
position-wise work (norms, projections, RoPE, the MLP) runs on the real rows only, packed into
one matrix, and is spread back to the padded layout for attention: padding costs copies, not
matrix products (it matters when one batch row refreshes every position and the others keep a
few).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from diffcache.kv.policy import LayerView, Policy, StepPlan
from diffcache.kv.store import KVStore


def forward_rows(
    model: torch.nn.Module,
    ids: torch.Tensor,
    positions: torch.Tensor,
    key_mask: torch.Tensor | None,
    plan: StepPlan,
    store: KVStore | None = None,
    policy: Policy | None = None,
    step: int = 0,
) -> torch.Tensor:
    """Logits ``[B, m, V]`` at ``plan.targets`` for token ids ``[B, L]``.

    Args:
        positions: ``[B, L]`` RoPE positions of every slot.
        key_mask: ``[B, L]`` bool, False for padding keys (None: attend to all).
        store: where K/V rows live between steps; None recomputes all rows (``plan.rows`` must
            be None then).
        policy: asked after each layer's attention when it ``wants_layers``; its ``hidden``
            (per layer, ``[B, L, d]`` inputs of every position, or None) is kept up to date for
            the rows computed (Elastic-Cache's depth refresh reads it).
    """
    rows = plan.rows
    hidden = None if policy is None else policy.hidden
    if rows is not None and store is None:
        raise ValueError("recomputing a subset of rows needs a KV store")
    h = model.embed(ids if rows is None else ids.gather(1, rows))
    if policy is not None and policy.keeps_inputs and hidden is None:
        hidden = policy.hidden = [h.new_zeros(*ids.shape, h.shape[-1]) for _ in model.layers]
    cos, sin = model.rope(positions if rows is None else positions.gather(1, rows))
    mask = None if key_mask is None else key_mask[:, None, None, :]
    watch = policy is not None and policy.wants_layers
    batch, length = ids.shape
    layers = len(model.layers)
    full = torch.zeros(batch, dtype=torch.bool, device=ids.device)  # rows refreshed from here on
    grow: torch.Tensor | None = None  # batch rows that start a full refresh at this layer
    counts = None if rows is None or plan.counts is None else plan.counts.cpu()
    pack = _packing(rows, counts)
    for index, layer in enumerate(model.layers):
        if grow is not None:  # every position of those rows from here on, from stored inputs
            full |= grow
            h, rows = _expand(hidden[index], rows, h, full)
            cos, sin = model.rope(positions.gather(1, rows))
            if counts is not None:
                counts = torch.where(full.cpu(), length, counts)
            pack = _packing(rows, counts)
            grow = None
        elif hidden is not None:
            _keep(hidden[index], rows, h)
        if pack is None:
            q, k, v = layer.qkv(h, cos, sin)
        else:
            q, k, v = (
                _spread(t, pack, 2) for t in layer.qkv(*(_take(t, pack) for t in (h, cos, sin)))
            )
        old_k = None
        if watch and rows is not None:
            stored_k = store.read(index)[0]
            old_k = stored_k.gather(2, _index(rows, stored_k))
        if store is None:
            keys, values = k.contiguous(), v.contiguous()
        else:
            store.write(index, rows, k, v, step)
            keys, values = store.read(index)
        o = layer.attend(q, keys, values, mask)
        if watch and rows is not None and index + 1 < layers:
            view = LayerView(index, rows, q, keys, old_k, q.shape[-1] ** -0.5, full, key_mask)
            new = torch.as_tensor(policy.layer_end(index, view), device=ids.device) & ~full
            if bool(new.any()):
                grow = new.expand(batch)
                if plan.full_from is None:
                    plan.full_from = torch.full((batch,), layers, device=ids.device)
                plan.full_from = torch.where(grow, index + 1, plan.full_from)
        elif watch:
            scale = q.shape[-1] ** -0.5
            policy.layer_end(index, LayerView(index, rows, q, keys, old_k, scale, full, key_mask))
        if pack is None:
            h = layer.finish(h, o)
        else:
            h = _spread(layer.finish(_take(h, pack), _take(o, pack)), pack, 1)
    return model.head(h.gather(1, _sources(plan, rows, model.logit_shift, h)))


class _Pack(NamedTuple):
    """The real entries of a padded ``[B, n]`` row set: ``take`` ``[N]`` their flat indices,
    ``source`` ``[B * n]`` for every entry the index of its real entry among the N."""

    take: torch.Tensor
    source: torch.Tensor
    batch: int
    width: int


def _packing(rows: torch.Tensor | None, counts: torch.Tensor | None) -> _Pack | None:
    """The packing of ``rows`` ``[B, n]`` with ``counts`` (on the CPU: no device sync when
    there is nothing to pack) real entries each (the padding trails and repeats the row's first
    position; an empty row computes its one padding position), or None when there is no
    padding."""
    if rows is None or counts is None:
        return None
    batch, width = rows.shape
    counts = counts.clamp(min=1)
    if bool((counts >= width).all()):
        return None
    columns = torch.arange(width, device=rows.device)
    real = columns < counts.to(rows.device)[:, None]
    packed_at = real.flatten().cumsum(0) - 1
    source = (
        torch.where(real, columns, 0) + torch.arange(batch, device=rows.device)[:, None] * width
    )
    return _Pack(real.flatten().nonzero().flatten(), packed_at[source.flatten()], batch, width)


def _take(x: torch.Tensor, pack: _Pack) -> torch.Tensor:
    """The real rows of ``x`` ``[B, n, ...]`` as one batch row ``[1, N, ...]``."""
    return x.flatten(0, 1)[pack.take][None]


def _spread(x: torch.Tensor, pack: _Pack, dim: int) -> torch.Tensor:
    """Packed ``x`` (batch 1, its N rows along ``dim``) back to the padded layout: batch first,
    the n rows along ``dim``."""
    out = x[0].index_select(dim - 1, pack.source).unflatten(dim - 1, (pack.batch, pack.width))
    return out.movedim(dim - 1, 0)


def _index(rows: torch.Tensor, store: torch.Tensor) -> torch.Tensor:
    """Gather index selecting ``rows`` [B, n] from a [B, H, L, hd] tensor."""
    b, heads, _, hd = store.shape
    return rows[:, None, :, None].expand(b, heads, rows.shape[1], hd)


def _keep(hidden: torch.Tensor, rows: torch.Tensor | None, h: torch.Tensor) -> None:
    if rows is None:
        hidden.copy_(h)
    else:
        hidden.scatter_(1, rows[..., None].expand(-1, -1, h.shape[-1]), h)


def _expand(
    hidden: torch.Tensor, rows: torch.Tensor, h: torch.Tensor, full: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer inputs for rows that grow to every position (``full`` [B]): the stored inputs with
    the fresh rows written in. Other batch rows keep their rows, padded to the full length by
    repeating their first position (computed twice, same values). Returns (h, rows)."""
    _keep(hidden, rows, h)
    batch, length = hidden.shape[:2]
    every = torch.arange(length, device=rows.device).expand(batch, -1)
    padded = torch.cat([rows, rows[:, :1].expand(-1, length - rows.shape[1])], 1)
    rows = torch.where(full[:, None], every, padded)
    return hidden.gather(1, rows[..., None].expand(-1, -1, hidden.shape[-1])), rows


def _sources(
    plan: StepPlan, rows: torch.Tensor | None, shift: int, h: torch.Tensor
) -> torch.Tensor:
    """Gather index into ``h`` [B, n, d] of the rows whose hidden states give the logits."""
    src = (plan.targets - shift).clamp(min=0)
    if rows is not None:  # position -> index of that position in rows
        where = torch.full(
            (src.shape[0], int(rows.max()) + 1 if rows.numel() else 1),
            -1,
            dtype=torch.long,
            device=rows.device,
        )
        where.scatter_(1, rows, torch.arange(rows.shape[1], device=rows.device).expand_as(rows))
        found = where.gather(1, src.clamp(max=where.shape[1] - 1))
        missing = (found < 0) | (src >= where.shape[1])
        if plan.idle is not None:  # a row with nothing to decode reads any recomputed row
            missing &= ~plan.idle[:, None]
        if bool(missing.any()):
            raise AssertionError("a logit target's source row was not recomputed this step")
        src = found.clamp(min=0)
    return src[..., None].expand(-1, -1, h.shape[-1])
