"""Marks shared by the kernel tests: the Triton interpreter on CPU, or native CUDA kernels."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import pytest
import torch

from diffcache.kernels import _dispatch

F = TypeVar("F", bound=Callable[..., object])

#: the test runs Triton kernels through the interpreter (tests/conftest.py sets it before import)
needs_interpreter = pytest.mark.skipif(
    _dispatch.triton_status() != [] or not _dispatch._interpret_enabled(),
    reason="needs triton importable and TRITON_INTERPRET=1 at import (tests/conftest.py sets it)",
)
_NATIVE_MARKS = (
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        _dispatch.triton_status() != [] or _dispatch._interpret_enabled(),
        reason="needs triton and TRITON_INTERPRET=0 at import (native kernels)",
    ),
)


def native(fn: F) -> F:
    """Mark a test as a native-CUDA check (run with ``-m gpu`` and TRITON_INTERPRET=0)."""
    for mark in _NATIVE_MARKS:
        fn = mark(fn)
    return fn
