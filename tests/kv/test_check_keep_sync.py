"""The budgeted store reads a selection's kept indices back to the host (sorted, unique, in
range: one synchronisation per compaction) only for selections diffcache does not define; its
own selections are checked for shape, dtype and budget alone, and still pass the value checks
on every bundled next-scale plan."""

from __future__ import annotations

import unittest.mock
from pathlib import Path
from typing import Any

import pytest
import torch

import diffcache
from diffcache.generate import Request, generate
from diffcache.kv import ScaleCall, Schedule
from diffcache.kv import budget as budget_module
from diffcache.kv.baselines import SnapKVSelection
from diffcache.kv.budget import BudgetedHistory
from diffcache.models import builtin_models, load_model
from diffcache.profiles import __path__ as profiles_path

SCHED = Schedule.square((1, 2, 3, 4))
#: the tensor methods that read a value back to the host (a device synchronisation on CUDA)
HOST_READS = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist")


class Theirs(SnapKVSelection):
    """A third party's selection: SnapKV's rule, defined outside diffcache."""


class TheirsUnsorted(SnapKVSelection):
    """A third party's selection keeping SnapKV's rows in descending order."""

    def select(self, call: ScaleCall, q: Any, k: Any, budget: int) -> torch.Tensor:
        return super().select(call, q, k, budget).flip(-1)


def _reads_per_check(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Each ``check_keep`` call's host reads, counted by patching the tensor methods that read
    values during the call only."""
    reads: list[int] = []
    real = budget_module.check_keep

    def counting(*args: Any, **kwargs: Any) -> None:
        count = [0]

        def patched(name: str) -> Any:
            method = getattr(torch.Tensor, name)

            def read(self: torch.Tensor, *a: Any, **k: Any) -> Any:
                count[0] += 1
                return method(self, *a, **k)

            return unittest.mock.patch.object(torch.Tensor, name, read)

        patches = [patched(name) for name in HOST_READS]
        for p in patches:
            p.start()
        try:
            real(*args, **kwargs)
        finally:
            for p in patches:
                p.stop()
            reads.append(count[0])

    monkeypatch.setattr(budget_module, "check_keep", counting)
    return reads


def _sweep(selection: Any) -> list[torch.Tensor]:
    """Drive a store of ``selection`` over SCHED (2 layers, 2 heads); the outputs."""
    store, g, outs = BudgetedHistory(selection), torch.Generator().manual_seed(0), []
    for si in range(len(SCHED)):
        for layer in range(2):
            q, k, v = (torch.randn(1, 2, SCHED.tokens(si), 4, generator=g) for _ in range(3))
            call = ScaleCall(layer=layer, si=si, schedule=SCHED, cond_rows=1)
            outs.append(store.attend(call, q, k, v))
    return outs


def test_our_selection_is_not_read_back_a_third_partys_is_once_per_compaction(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same rule as diffcache's SnapKV and as a third party's subclass: the same outputs;
    no host read in any of ours' checks, one in each of theirs."""
    reads = _reads_per_check(monkeypatch)
    mine = _sweep(SnapKVSelection(9, window=4, kernel=3))
    ours, reads[:] = list(reads), []
    theirs = _sweep(Theirs(9, window=4, kernel=3))
    assert all(torch.equal(a, b) for a, b in zip(mine, theirs, strict=True))
    # rows before each scale 0, 1, 5, 9 + the maps 1, 4, 9, 16: over 9 at the last two scales
    compactions = 2 * 2
    assert ours == [0] * compactions and reads == [1] * compactions


def test_a_bad_third_party_selection_is_refused_as_before() -> None:
    with pytest.raises(
        ValueError, match=r"^kept indices must be sorted ascending and unique per \(row, head\)$"
    ):
        _sweep(TheirsUnsorted(9, window=4, kernel=3))


def _kv_plans() -> list[str]:
    """The bundled plans of the tiny next-scale models."""
    folder = Path(profiles_path[0])
    return sorted(p.name for m in ("var-tiny", "infinity-tiny") for p in folder.glob(f"{m}-*.yaml"))


@pytest.mark.parametrize("name", _kv_plans())
def test_our_selections_pass_the_value_checks(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checked as a third party's, every bundled plan's selection keeps sorted, unique rows in
    range at every compaction (what the store now takes on trust)."""
    monkeypatch.setattr(budget_module, "ours", lambda selection: False)
    reads = _reads_per_check(monkeypatch)
    model = name.split("-tiny")[0] + "-tiny"
    pipe = load_model(model)
    req = Request(prompt="a red fox" if model == "infinity-tiny" else None)
    diffcache.accelerate(pipe, name)
    try:
        generate(pipe, req.merged(builtin_models()[model].defaults))
    finally:
        diffcache.remove(pipe)
    assert reads and set(reads) == {1}, reads
