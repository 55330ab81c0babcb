"""The tiny Infinity pipeline, built once per session (tests get copies)."""

from __future__ import annotations

import copy

import pytest

from diffcache.pipelines.infinity.tiny import build_tiny

_BUILT: list[object] = []


@pytest.fixture
def pipe():
    if not _BUILT:
        _BUILT.append(build_tiny())
    return copy.deepcopy(_BUILT[0])
