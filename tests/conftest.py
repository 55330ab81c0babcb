"""Test setup. TRITON_INTERPRET must be set before diffcache.kernels defines its kernels."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # CPU machines run the Triton kernels in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import diffcache.testing.toys_seq  # noqa: F401, E402  (registers the toy text and next-scale families)
from diffcache.registry import adapters, register_adapter  # noqa: E402
from diffcache.testing.toys import TOY  # noqa: E402

if "toy" not in adapters():
    register_adapter(TOY)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
