"""Tiny LLaDA and Dream pipelines (real vocabularies and special ids), built once per session."""

from __future__ import annotations

import copy

import pytest

from diffcache.pipelines.dream import build_tiny as build_dream
from diffcache.pipelines.llada import build_tiny as build_llada

_BUILT: dict[str, object] = {}


def _pipe(family: str):
    if family not in _BUILT:
        _BUILT[family] = build_llada() if family == "llada" else build_dream()
    return copy.deepcopy(_BUILT[family])


@pytest.fixture(params=["llada", "dream"])
def family(request) -> str:
    return request.param


@pytest.fixture
def pipe(family: str):
    return _pipe(family)


@pytest.fixture
def llada():
    return _pipe("llada")


@pytest.fixture
def dream():
    return _pipe("dream")
