"""Shared expectations of the VAR tests, written from research/var.md §1.1.2."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest


def expected_keep(row: list[float], top_k: int, top_p: float) -> set[int]:
    """The tokens sampling keeps in one logits row, by counting: top-k keeps j when fewer than
    k logits are larger; top-p then drops j (not the largest) when the softmax mass of the
    kept logits <= its own is <= 1 - p."""
    kept = set(range(len(row)))
    if top_k > 0:
        kept = {j for j in kept if sum(x > row[j] for x in row) < top_k}
    if top_p > 0:
        z = sum(math.exp(row[i]) for i in kept)
        best = max(kept, key=lambda i: row[i])
        kept -= {
            j
            for j in kept
            if j != best
            and sum(math.exp(row[i]) for i in kept if row[i] <= row[j]) / z <= 1 - top_p
        }
    return kept


@pytest.fixture
def keep_of() -> Callable[[list[float], int, float], set[int]]:
    return expected_keep
