"""ScaleKV's per-(scale, layer) budgets: drafter layers keep ``Max`` rows, refiners ``Min``.

The released plan files (``budgets/{2b,8b}_10%_budget.json`` of StargazerX0/ScaleKV) hold, per key
``"Scale s"``, ``"Max"``, ``"Min"``, ``"High"`` (the drafter count), ``"Limit"`` (the longest
cache at that compression; not used) and ``"Block b"`` (1 = drafter, 0 = refiner). ``"Scale s"``
sets the cache after the compression that follows 0-based scale ``s − 2`` (the code indexes its
sizes with ``si + 2``), so :func:`read_scalekv_json` stores it as ``applies_after_si = s − 2``
(research/var.md §2.1.4). Every scale obeys ``High·Max + (L − High)·Min == L·average``.

The released 10% tables are kept here as data (:data:`RELEASED_2B_10PCT`,
:data:`RELEASED_8B_10PCT`), not the files themselves.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from diffcache.errors import PlanError

#: the released 10% files' average budget, tokens per head and layer (research/var.md §2.1.4:
#: 650 / 6425 ≈ 10.1% of the 1M-pixel cache)
RELEASED_AVERAGE = 650


@dataclasses.dataclass(frozen=True)
class ScaleBudget:
    """The budgets of the compression after 0-based scale ``applies_after_si``: ``roles`` is one
    letter per layer, ``"D"`` (drafter, keeps ``drafter`` rows) or ``"R"`` (refiner)."""

    applies_after_si: int
    roles: str
    drafter: int
    refiner: int

    def budget(self, layer: int) -> int:
        return self.drafter if self.roles[layer] == "D" else self.refiner


@dataclasses.dataclass(frozen=True)
class ScaleKVBudgets:
    """A ScaleKV plan: the average budget (tokens per head and layer) and one
    :class:`ScaleBudget` per compressed scale."""

    average: int
    scales: tuple[ScaleBudget, ...]
    source: str = ""

    def __post_init__(self) -> None:
        for s in self.scales:
            check_average(s, self.average, self.source)

    @property
    def layers(self) -> int:
        return len(self.scales[0].roles)

    def budget(self, si: int, layer: int) -> int | None:
        """Rows ``layer`` keeps after scale ``si``; None when the plan has no entry for it."""
        for s in self.scales:
            if s.applies_after_si == si:
                return s.budget(layer)
        return None


def check_average(s: ScaleBudget, average: int, source: str = "") -> None:
    """Raise PlanError unless ``High·Max + (L − High)·Min == L·average`` for ``s``."""
    layers, high = len(s.roles), s.roles.count("D")
    total = high * s.drafter + (layers - high) * s.refiner
    if set(s.roles) - {"D", "R"} or total != layers * average:
        where = f" {source}" if source else ""
        raise PlanError(
            f"ScaleKV budgets{where} after scale {s.applies_after_si}: "
            f"{high}·{s.drafter} + {layers - high}·{s.refiner} = {total} is not "
            f"{layers}·{average} = {layers * average}"
        )


def read_scalekv_json(
    path: str | Path, layers: int, average: int = RELEASED_AVERAGE
) -> ScaleKVBudgets:
    """Read a ScaleKV budget file of the released format for a model of ``layers`` layers."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PlanError(f"cannot read ScaleKV budgets {path}: {e}") from None
    scales = []
    for key, entry in sorted(data.items(), key=lambda kv: _scale_number(path, kv[0])):
        s = _scale_number(path, key)
        blocks = [entry.get(f"Block {b}") for b in range(layers)]
        extra = {k for k in entry if k.startswith("Block ")} - {f"Block {b}" for b in range(layers)}
        if any(x not in (0, 1) for x in blocks) or extra:
            raise PlanError(
                f"ScaleKV budgets {path} {key!r}: want 'Block 0'..'Block {layers - 1}' each 0 or 1 "
                f"for a {layers}-layer model"
            )
        if entry.get("High") != sum(blocks):
            raise PlanError(
                f"ScaleKV budgets {path} {key!r}: 'High' {entry.get('High')} is not the "
                f"{sum(blocks)} drafter blocks"
            )
        roles = "".join("D" if x else "R" for x in blocks)
        scales.append(ScaleBudget(s - 2, roles, int(entry["Max"]), int(entry["Min"])))
    return ScaleKVBudgets(average, tuple(scales), source=str(path))


def _scale_number(path: Path, key: str) -> int:
    m = re.fullmatch(r"Scale (\d+)", key)
    if m is None or int(m.group(1)) < 2:
        raise PlanError(f"ScaleKV budgets {path}: key {key!r} is not 'Scale <s>' with s >= 2")
    return int(m.group(1))


def _released(
    layers: int, plan: list[tuple[int, tuple[int, ...], int, int]], source: str
) -> ScaleKVBudgets:
    """A plan from ``(scale s, drafter layers, Max, Min)`` rows of a released file."""
    scales = tuple(
        ScaleBudget(s - 2, "".join("D" if b in ds else "R" for b in range(layers)), mx, mn)
        for s, ds, mx, mn in plan
    )
    return ScaleKVBudgets(RELEASED_AVERAGE, scales, source=source)


#: StargazerX0/ScaleKV ``budgets/2b_10%_budget.json`` (Infinity-2B, 32 layers, 650 on average),
#: transcribed in research/var.md §2.1.4.
RELEASED_2B_10PCT = _released(
    32,
    [
        (9, (0, 23), 920, 632),
        (10, (0, 23), 1490, 594),
        (11, (0, 23), 2510, 526),
        (12, (0, 23), 4100, 420),
        (13, (0,), 6385, 465),
    ],
    "StargazerX0/ScaleKV budgets/2b_10%_budget.json",
)

#: StargazerX0/ScaleKV ``budgets/8b_10%_budget.json`` (Infinity-8B, 40 layers, 650 on average),
#: transcribed in research/var.md §2.1.4.
RELEASED_8B_10PCT = _released(
    40,
    [
        (9, (0, 1, 2), 909, 629),
        (10, (0, 1, 2), 1464, 584),
        (11, (0, 1, 2), 2463, 503),
        (12, (0, 1, 2), 4054, 374),
        (13, (0, 1, 2), 6200, 200),
    ],
    "StargazerX0/ScaleKV budgets/8b_10%_budget.json",
)
