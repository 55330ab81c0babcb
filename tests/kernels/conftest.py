"""Fixtures shared by the kernel tests."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import pytest


@pytest.fixture
def spy_kernel(monkeypatch: pytest.MonkeyPatch) -> Callable[[ModuleType, str], list[int]]:
    """``spy_kernel(module, name)``: a list that grows by one at each call of ``module.name``
    (a Triton entry point, still run for real) for the rest of the test."""

    def spy(module: ModuleType, name: str) -> list[int]:
        calls: list[int] = []
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a: calls.append(1) or real(*a))
        return calls

    return spy
