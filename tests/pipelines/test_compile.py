"""torch.compile under each DiT method (issue 24, item 5), compiled before ``accelerate``.

The whole transformer (``torch.compile(pipe.transformer)``), each block on its own (what
diffusers' ``compile_repeated_blocks`` does) or each cached module on its own
(``bench/compile_cache.py``'s ``compile_pipe``), under every method that supports it: no graph
is compiled after a generation's first steps nor in a second generation, the output equals the
eager pipeline's under the same plan, and ``remove`` gives the compiled pipeline's own output
bit for bit. ``backend="eager"`` captures graphs and guards exactly as inductor does, without
building C++ (the measured difference to eager is 0; the tolerance allows float noise only); one
slow test runs inductor. Sites a compiled graph would hold, and compiling after ``accelerate``,
are refused with one line. ``diffcache.profile`` on a compiled pipeline makes the eager
pipeline's plan, and refuses those sites before its first run.
"""

from __future__ import annotations

import runpy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

import diffcache
from diffcache import hooks
from diffcache.errors import RunError, UnsupportedModelError
from diffcache.generate import Request, generate
from diffcache.models import builtin_models, load_model
from diffcache.testing.toys import clean

MODELS = ("dit-tiny", "flux-tiny", "wan2.1-tiny")
METHODS = ("easycache", "ertacache", "hyca", "invardiff")
STEPS = 20  # the bundled tiny plans' valid_for.num_inference_steps
ATOL = 1e-5  # images in [0, 1]: float noise only (backend "eager" measured 0.0)
SETTLED = 2  # steps after which no graph may be compiled any more
#: the methods each way of compiling serves (diffcache.compiled); the others are refused
SERVES = {
    "whole": ("easycache", "ertacache"),
    "blocks": ("easycache", "ertacache", "hyca"),
    "modules": METHODS,
}
#: the calibrated block and module methods, each compiled where it runs (bench WHERE)
WHERE_OWN = [("hyca", "blocks"), ("invardiff", "modules")]
BENCH = Path(__file__).resolve().parents[2] / "bench" / "compile_cache.py"
VARIANTS = BENCH.with_name("dit_variants.py")


def _bench(script: Path) -> dict[str, Any]:
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(script.parent))  # as `python bench/<script>` has it
        return runpy.run_path(str(script))


@pytest.fixture(scope="module")
def compile_pipe() -> Any:
    """``bench/compile_cache.py``'s ``compile_pipe`` (what the benchmarks compile with)."""
    return _bench(BENCH)["compile_pipe"]


def _plan(model: str, method: str) -> str:
    return f"{model}.yaml" if method == "easycache" else f"{model}-{method}.yaml"


def _request(model: str) -> Request:
    entry = builtin_models()[model]
    prompt = None if entry.family == "dit" else "a cat surfing"
    return Request(prompt=prompt, steps=STEPS).merged(entry.defaults)


def _blocks(pipe: Any) -> list[torch.nn.Module]:
    t = pipe.transformer
    names = ("transformer_blocks", "single_transformer_blocks", "blocks")
    return [b for n in names for b in getattr(t, n, None) or ()]


CASES = [(m, w) for m in MODELS for w in SERVES]


@pytest.fixture(scope="module", params=CASES, ids=[f"{m}-{w}" for m, w in CASES])
def compiled(
    request: pytest.FixtureRequest, compile_pipe: Any
) -> Iterator[tuple[str, str, Any, dict]]:
    """(model, where, the compiled pipeline, outputs): eager under each plan, plain compiled."""
    model, where = request.param
    torch._dynamo.reset()
    pipe = load_model(model)
    req = _request(model)
    outputs = {}
    for method in SERVES[where]:
        diffcache.accelerate(pipe, _plan(model, method))
        outputs[method] = generate(pipe, req)
        diffcache.remove(pipe)
    compile_pipe(pipe, where, backend="eager")
    outputs["compiled"] = generate(pipe, req)
    yield model, where, pipe, outputs
    torch._dynamo.reset()


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _generations(pipe: Any, req: Request, n: int) -> tuple[list[list[int]], np.ndarray]:
    """``n`` generations; the compiled graph count at each scheduler step of each."""
    seen: list[list[int]] = []
    step = pipe.scheduler.step

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen[-1].append(_graphs())
        return step(*args, **kwargs)

    pipe.scheduler.step = spy
    try:
        for _ in range(n):
            seen.append([])
            out = generate(pipe, req)
    finally:
        del pipe.scheduler.step
    return seen, out


@pytest.mark.parametrize("method", METHODS)
def test_no_recompile_and_outputs(compiled: tuple[str, str, Any, dict], method: str) -> None:
    model, where, pipe, outputs = compiled
    if method not in SERVES[where]:
        pytest.skip(f"{method} refuses {where} compilation (below)")
    diffcache.accelerate(pipe, _plan(model, method))
    try:
        counts, out = _generations(pipe, _request(model), 2)
        skipped = diffcache.stats(pipe).skipped
    finally:
        diffcache.remove(pipe)
    first, second = counts
    assert len(first) == len(second) == STEPS
    assert first[SETTLED:] == [first[SETTLED]] * (STEPS - SETTLED), f"compiled per step: {first}"
    assert second == [first[-1]] * STEPS, f"second generation compiled again: {second}"
    assert skipped > 0, f"{method} skipped nothing on {model}: the check proves nothing"
    np.testing.assert_allclose(out, outputs[method], rtol=0, atol=ATOL)
    assert clean(*_blocks(pipe), pipe.scheduler, exact=False)
    assert np.array_equal(generate(pipe, _request(model)), outputs["compiled"])


@pytest.mark.parametrize(
    ("where", "method", "words"),
    [
        ("whole", "hyca", "block caching inside a transformer compiled whole"),
        ("whole", "invardiff", "module caching inside a transformer compiled whole"),
        ("blocks", "invardiff", "module caching inside a block compiled on its own"),
    ],
)
def test_sites_inside_a_compiled_graph_are_refused(
    compile_pipe: Any, where: str, method: str, words: str
) -> None:
    pipe = compile_pipe(load_model("dit-tiny"), where, backend="eager")
    fix = {
        "block": "compile its blocks on their own instead (transformer.compile_repeated_blocks("
        "fullgraph=True), or .compile() on each block)",
        "module": "compile the modules it caches on their own instead (.compile() on each "
        "block's attention and feed-forward modules)",
    }[words.split()[0]]
    with pytest.raises(UnsupportedModelError) as e:
        diffcache.accelerate(pipe, _plan("dit-tiny", method))
    message = str(e.value)
    assert "transformer_blocks.0: " in message and f"{words}" in message
    assert message.endswith(f" would break its graph; {fix}")
    assert clean(pipe.transformer, *_blocks(pipe), pipe.scheduler, exact=False)


PROMPTS = ["1", "7"]  # calibration class ids


@pytest.mark.parametrize(("method", "where"), [("ertacache", "whole"), *WHERE_OWN])
def test_profile_on_a_compiled_pipeline(compile_pipe: Any, method: str, where: str) -> None:
    """The calibrated methods record the plain run: on a pipeline compiled where the method runs
    (backend "eager": the same float results), the plan equals the eager pipeline's, tensors
    included, and the compiled pipeline is left as it was."""
    torch._dynamo.reset()
    eager = diffcache.profile(load_model("dit-tiny"), method, PROMPTS, target_compute=0.6)
    pipe = compile_pipe(load_model("dit-tiny"), where, backend="eager")
    plain = generate(pipe, _request("dit-tiny"))
    plan = diffcache.profile(pipe, method, PROMPTS, target_compute=0.6)
    torch._dynamo.reset()
    assert plan == eager
    assert plan.tensors.keys() == eager.tensors.keys()
    assert all(torch.equal(plan.tensors[k], eager.tensors[k]) for k in plan.tensors)
    assert np.array_equal(generate(pipe, _request("dit-tiny")), plain)


@pytest.mark.parametrize(
    ("where", "method", "words"),
    [
        ("whole", "hyca", "block caching inside a transformer compiled whole"),
        ("blocks", "invardiff", "module caching inside a block compiled on its own"),
    ],
)
def test_profile_refuses_sites_inside_a_compiled_graph_before_running(
    compile_pipe: Any, monkeypatch: pytest.MonkeyPatch, where: str, method: str, words: str
) -> None:
    pipe = compile_pipe(load_model("dit-tiny"), where, backend="eager")
    runs = []
    call = type(pipe).__call__
    monkeypatch.setattr(type(pipe), "__call__", lambda *a, **k: runs.append(1) or call(*a, **k))
    with pytest.raises(UnsupportedModelError, match=rf"transformer_blocks\.0: {words}"):
        diffcache.profile(pipe, method, PROMPTS)
    assert runs == [], "profiling ran the pipeline before refusing"
    assert clean(pipe.transformer, *_blocks(pipe), pipe.scheduler, exact=False)


@pytest.mark.parametrize("method", ["easycache", "hyca"])
def test_compiling_after_accelerate_is_refused(method: str) -> None:
    """In place (the block or transformer keeps its identity): refused at the next call, the
    pipeline left clean; replacing the transformer is refused as any replacement is."""
    pipe = load_model("dit-tiny")
    diffcache.accelerate(pipe, _plan("dit-tiny", method))
    target = pipe.transformer if method == "easycache" else _blocks(pipe)[0]
    target.compile(backend="eager")
    want = (
        rf"^{type(target).__name__} was compiled after accelerate \(.*\); diffcache detached "
        r"itself: compile first, then call diffcache\.accelerate\(\)\.$"
    )
    with pytest.raises(RunError, match=want):
        generate(pipe, _request("dit-tiny"))
    assert clean(pipe.transformer, *_blocks(pipe), pipe.scheduler, exact=False)


def test_a_hook_a_graph_reaches_runs_outside_it() -> None:
    """A hook inside a compiled graph that reads a Python counter would be traced with the
    counter as a guard (a recompile per value); it runs eagerly behind one graph break."""

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner, self.outer = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.outer(self.inner(x).relu())

    net, calls = Net(), []

    def hook(inner: Any, x: torch.Tensor) -> torch.Tensor:
        calls.append(len(calls))
        return inner(x) * (1 + len(calls) % 3)

    hooks.attach(net.inner, "forward", "diffcache.test", hook)
    torch._dynamo.reset()
    fast, x = torch.compile(net, backend="eager"), torch.randn(2, 4)
    graphs = []
    with torch.no_grad():
        for i in range(6):
            got = fast(x)
            graphs.append(_graphs())
            scaled = torch.nn.functional.linear(x, net.inner.weight, net.inner.bias) * (
                1 + (i + 1) % 3
            )
            torch.testing.assert_close(got, net.outer(scaled.relu()), rtol=0, atol=1e-6)
    assert calls == list(range(6))
    assert graphs == [graphs[0]] * 6, f"compiled again: {graphs}"


@pytest.mark.slow
def test_inductor_whole_transformer(compile_pipe: Any) -> None:
    """Inductor's fused kernels round differently from eager: within 1e-3 of the eager cached
    output, no recompile in the second generation, ``remove`` exact against its own output."""
    pipe = load_model("dit-tiny")
    req, plan = _request("dit-tiny"), _plan("dit-tiny", "easycache")
    torch._dynamo.reset()
    diffcache.accelerate(pipe, plan)
    eager = generate(pipe, req)
    diffcache.remove(pipe)
    compile_pipe(pipe, "whole", backend="inductor")
    plain = generate(pipe, req)
    diffcache.accelerate(pipe, plan)
    counts, out = _generations(pipe, req, 2)
    diffcache.remove(pipe)
    assert counts[1] == [counts[0][-1]] * STEPS
    np.testing.assert_allclose(out, eager, rtol=0, atol=1e-3)
    assert np.array_equal(generate(pipe, req), plain)


def test_dit_variants_compiles_before_its_timed_runs() -> None:
    """``bench/dit_variants.py``'s compiled column builds its graphs in ``prepare`` (one untimed
    generation, printed as the compile): the evaluation's generations of other inputs compile
    nothing more."""
    variants = _bench(VARIANTS)
    torch._dynamo.reset()
    counters.clear()
    pipe = variants["compiled"](load_model("dit-tiny"), "blocks", "eager", "3")
    built = _graphs()
    assert built > 0
    for label in (0, 7):
        generate(pipe, _request("dit-tiny").replace(class_label=label))
    assert _graphs() == built
    torch._dynamo.reset()


def test_dit_variants_refuses_an_unknown_compile_backend(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        _bench(VARIANTS)["main"](["--variants", "compiled", "--compile-backend", "inductr"])
    assert e.value.code == 2
    assert "argument --compile-backend: invalid choice: 'inductr'" in capsys.readouterr().err
