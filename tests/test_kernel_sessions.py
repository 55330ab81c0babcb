"""Kernel backends are recorded per session: two accelerated pipelines of different
``kernels:`` in one process, their calls interleaved, one run inside the other's generation, or
run from two threads, each name in their own Stats the backends their own calls used."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any

import pytest

import diffcache
from diffcache.generate import generate
from diffcache.kernels import _dispatch
from diffcache.models import load_model
from diffcache.pipelines import arith
from diffcache.plan import Plan
from diffcache.testing.toys import tiny_request

pytestmark = pytest.mark.skipif(
    _dispatch.triton_status() != [] or not _dispatch._interpret_enabled(),
    reason="needs triton importable and TRITON_INTERPRET=1 at import (tests/conftest.py sets it)",
)
BACKENDS = ("torch", "triton")
TEXT_OPS = ("kv_scatter", "token_confidence")  # what llada-tiny-fast_dllm.yaml calls


def accelerated(load: Callable[[], Any], plan: str) -> dict[str, Any]:
    """One pipeline per backend, each accelerated with ``plan`` on that backend."""
    pipes = {b: load() for b in BACKENDS}
    for backend, pipe in pipes.items():
        diffcache.accelerate(pipe, dataclasses.replace(Plan.load(plan), kernels=backend))
    return pipes


def remove(pipes: dict[str, Any]) -> None:
    for pipe in pipes.values():
        diffcache.remove(pipe)


def expected(ops: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """Each backend's pipeline names that backend for every op its method calls."""
    return {b: dict.fromkeys(ops, b) for b in BACKENDS}


@pytest.fixture
def texts() -> Any:
    """Two arith LLaDA pipelines under Fast-dLLM, on torch and on triton (the interpreter)."""
    pipes = accelerated(arith.load, "llada-tiny-fast_dllm.yaml")
    yield pipes
    remove(pipes)


def test_two_dits_called_in_turn_each_name_their_own_backends() -> None:
    """dit-tiny under EasyCache: the torch and the triton pipeline, called in turn, each
    measure the change and reuse residuals on their own backend."""
    pipes = accelerated(lambda: load_model("dit-tiny"), "dit-tiny.yaml")
    req = tiny_request("dit-tiny", Plan.load("dit-tiny.yaml").valid_for["num_inference_steps"])[2]
    got = {}
    try:
        for backend in ("torch", "triton", "torch"):
            generate(pipes[backend], req)
            got[backend] = diffcache.stats(pipes[backend]).kernels
    finally:
        remove(pipes)
    assert got == expected(("l1_change", "add_residual"))


def at_last_model_call(pipe: Any, action: Callable[[], Any]) -> Any:
    """Run ``action`` once, right after the last model call of ``pipe``'s next generation of
    ``arith.PROMPTS[0]`` (after its last K/V write, before the generation ends); returns the
    hook's handle. The call count is taken from a generation made first."""
    pipe(arith.PROMPTS[0], **arith.DEFAULTS)
    last = diffcache.stats(pipe).model_calls
    calls: list[int] = []

    def hook(*_: Any) -> None:
        calls.append(1)
        if len(calls) == last:
            action()

    return pipe.model.register_forward_hook(hook)


def test_a_generation_run_inside_another_keeps_each_record_apart(texts) -> None:
    """The triton pipeline generates inside the torch pipeline's generation, after its last
    model call: the outer run still names torch only, the inner one triton only."""
    inner: list[Any] = []

    def generate_inner() -> None:
        inner.append(texts["triton"](arith.PROMPTS[0], **arith.DEFAULTS))

    handle = at_last_model_call(texts["torch"], generate_inner)
    try:
        texts["torch"](arith.PROMPTS[0], **arith.DEFAULTS)
    finally:
        handle.remove()
    assert len(inner) == 1, "the inner generation ran once"
    got = {b: diffcache.stats(p).kernels for b, p in texts.items()}
    assert got == expected(TEXT_OPS)


def test_two_threads_each_name_their_own_backends(texts) -> None:
    """Each pipeline generates in its own thread, the two at once; the torch one waits at its
    last model call until the triton one has generated (so the triton run's kernel calls fall
    inside the torch run)."""
    got: dict[str, dict[str, str]] = {}
    done = threading.Event()
    handle = at_last_model_call(texts["torch"], lambda: done.wait(timeout=60))

    def work(backend: str) -> None:
        texts[backend](arith.PROMPTS[0], **arith.DEFAULTS)
        got[backend] = diffcache.stats(texts[backend]).kernels
        if backend == "triton":
            done.set()

    threads = [threading.Thread(target=work, args=(b,)) for b in BACKENDS]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        handle.remove()
    assert done.is_set() and got == expected(TEXT_OPS)
