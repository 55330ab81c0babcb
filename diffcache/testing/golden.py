"""Golden outputs, Stats and traces of the bundled plans on the small built-in models.

    python -m diffcache.testing.golden --write     # regenerate tests/golden/ (all plans)
    python -m diffcache.testing.golden [--only PLAN ...]   # print what differs from the files

Each entry is one run of the model's default request (its ``models.yaml`` defaults, seed 0, the
model's first evaluation prompt or else the first bundled calibration prompt, batch 1) with the
plan applied, on one CPU thread: a sha256 of the output's raw bytes (media as float32, text
models' token ids: prompt and answer) with its shape, mean and abs-max (6 significant digits,
for readable diffs), and the run's Stats without their wall time; ``bit_stable`` says whether
the bytes survive a rerun on 2 threads (see :func:`differences`). ``tests/test_golden.py``
recomputes every entry. The bytes depend on the torch version and the CPU's vector unit too: the
file records the :func:`platform` it was written on, and elsewhere (another torch, a CPU with
AVX-512 ...) outputs are compared by their summary numbers, Stats still exactly, so a fresh clone
on another machine stays green. Regenerate after a torch upgrade, and say so in the commit.

Each plan's step trace (``accelerate(..., trace=True)``: every decision and the values that made
it) is kept in ``tests/golden/traces/<plan>.json``, one event a line, floats rounded to 6
significant digits like the summaries. On the golden file's platform a trace must match line for
line; elsewhere only what does not depend on float rounding is compared: the event's step,
site and action, and its integer, boolean and text values (floats are left out).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffcache.display import rounded

GOLDEN = Path(__file__).resolve().parents[2] / "tests" / "golden" / "bundled_plans.json"
TRACES = GOLDEN.parent / "traces"
ABOUT = (
    "Outputs and Stats of the bundled plans on the small built-in models (their traces: "
    "traces/<plan>.json); regenerate with `python -m diffcache.testing.golden --write`. A "
    "change to these files must be explained in the commit message."
)
DIGITS = 6  # significant digits of the floats in summaries and traces


def golden_plans() -> dict[str, str]:
    """Bundled plan -> the built-in model it is named after (``<model>.yaml`` or
    ``<model>-<method>.yaml``), for the models small enough to run in about a second.
    Templates and the plans of real-size models are left out."""
    from diffcache.models import builtin_models
    from diffcache.plan import Plan
    from diffcache.profiles import bundled_plans

    small = [m for m in builtin_models() if m.endswith("-tiny")]
    small += ["dit-digits", "dit-digits-8step", "wan-shapes", "wan-shapes-8step"]
    found = {}
    for name in bundled_plans():
        stem = name.removesuffix(".yaml")
        models = [m for m in small if stem == m or stem.startswith(f"{m}-")]
        if models and not Plan.load(name, template=True).is_template:
            found[name] = max(models, key=len)
    return dict(sorted(found.items()))


@contextlib.contextmanager
def threads(n: int = 1) -> Iterator[None]:
    """torch on ``n`` intra-op threads (1: results independent of the machine's cores), then
    restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def default_request(model: str) -> Any:
    """The model's default request at seed 0, with a fixed prompt where the family takes one."""
    from diffcache.generate import Request
    from diffcache.models import builtin_models
    from diffcache.profiles import calibration_prompts
    from diffcache.registry import adapters

    spec = builtin_models()[model]
    request = Request(seed=0).merged(spec.defaults)
    if adapters()[spec.family].field("prompt") is None:
        return request
    prompts = spec.default_prompts()
    if not prompts:
        prompts = calibration_prompts()
    return request.replace(prompt=prompts[0])


def platform() -> dict[str, str]:
    """What the output bytes depend on besides our code: torch's version and the CPU vector
    unit it dispatches to."""
    return {"cpu": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}


def summary(array: np.ndarray) -> dict[str, Any]:
    """sha256 of the raw bytes, dtype, shape, mean and abs-max (6 significant digits)."""
    array = np.ascontiguousarray(array)
    values = array.astype(np.float64)
    return {
        "sha256": hashlib.sha256(array.tobytes()).hexdigest(),
        "dtype": str(array.dtype),
        "shape": list(array.shape),
        "mean": rounded(float(values.mean()), DIGITS),
        "abs_max": rounded(float(np.abs(values).max()), DIGITS),
    }


def run_plan(pipe: Any, plan: str, request: Any, n_threads: int = 1) -> dict[str, Any]:
    """``pipe`` run once on ``request`` with ``plan`` applied (then removed) and traced, on
    ``n_threads``: the request, output summary, Stats and trace (floats rounded)."""
    import diffcache
    from diffcache.generate import generate

    diffcache.accelerate(pipe, plan, trace=True)
    try:
        with threads(n_threads):
            out = generate(pipe, request)
        stats = diffcache.stats(pipe).as_dict()
    finally:
        diffcache.remove(pipe)
    stats.pop("wall_s")
    trace = rounded(stats.pop("trace"), DIGITS)
    array = pipe.last_output.tokens.numpy() if isinstance(out, str) else out
    result = {"request": request.as_dict(), "output": summary(array), "stats": stats}
    result = json.loads(json.dumps(result))  # as the golden file reads back (lists, not tuples)
    return {**result, "trace": [json.loads(line) for line in trace_lines(trace)]}


def trace_lines(trace: list[dict[str, Any]]) -> list[str]:
    """One JSON line per event, keys sorted: the golden trace file's lines."""
    return [json.dumps(event, sort_keys=True) for event in trace]


def trace_file(plan: str) -> Path:
    return TRACES / plan.replace(".yaml", ".json")


def skeleton(event: dict[str, Any]) -> dict[str, Any]:
    """What of a trace event does not depend on float rounding: every value but the floats
    (kept as None)."""

    def keep(value: Any) -> Any:
        if isinstance(value, float):
            return None
        if isinstance(value, dict):
            return {k: keep(v) for k, v in value.items()}
        if isinstance(value, list):
            return [keep(v) for v in value]
        return value

    return keep(event)


def trace_differences(got: list[dict], want: list[dict], exact: bool = True) -> list[str]:
    """The first event where trace ``got`` differs from the golden ``want`` (its file line
    where ``exact``, else its :func:`skeleton`), or that one is longer; [] when they agree."""
    for i, (a, b) in enumerate(zip(got, want, strict=False)):
        mine, golden = trace_lines([a, b])
        if (mine != golden) if exact else (skeleton(a) != skeleton(b)):
            return [f"trace event {i}: {mine} != golden {golden}"]
    if len(got) != len(want):
        return [f"trace: {len(got)} events != golden {len(want)}"]
    return []


def entry(plan: str, pipes: dict[str, Any]) -> dict[str, Any]:
    """The golden entry of ``plan``; ``pipes`` caches the built models by name."""
    from diffcache.models import load_model

    model = golden_plans()[plan]
    if model not in pipes:
        with threads():
            pipes[model] = load_model(model)
    return {"model": model, **run_plan(pipes[model], plan, default_request(model))}


def compute(plans: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """The golden entries of ``plans`` (default: all of :func:`golden_plans`), each with
    ``bit_stable``: whether a rerun on 2 threads gives the same output bytes. Where it does not
    (float sums split across threads), the bytes depend on the machine, and the test compares
    the output's summary numbers instead of its hash."""
    pipes: dict[str, Any] = {}
    entries = {}
    for plan in plans or golden_plans():
        entries[plan] = entry(plan, pipes)
        model, request = entries[plan]["model"], default_request(entries[plan]["model"])
        rerun = run_plan(pipes[model], plan, request, n_threads=2)
        stable = rerun["output"]["sha256"] == entries[plan]["output"]["sha256"]
        entries[plan]["bit_stable"] = stable
    return entries


def differences(got: dict[str, Any], want: dict[str, Any], exact: bool = True) -> list[str]:
    """What of the entry ``got`` differs from the golden ``want``: model, request and Stats
    exactly; the output by its hash where ``want`` is bit-stable and ``exact`` (the golden
    file's platform), else by dtype, shape and summary numbers within their rounding."""
    diffs = [
        f"{k}: {got[k]} != {want[k]}" for k in ("model", "request", "stats") if got[k] != want[k]
    ]
    diffs += trace_differences(got["trace"], want["trace"], exact)
    out, ref = got["output"], want["output"]
    for key, value in ref.items():
        bitwise = exact and want["bit_stable"]
        close = not bitwise and key in ("mean", "abs_max")
        if key != "sha256" or bitwise:
            same = math.isclose(out[key], value, rel_tol=1e-5) if close else out[key] == value
            diffs += [] if same else [f"output {key}: {out[key]} != {value}"]
    return diffs


def _format(value: Any, indent: str = "") -> str:
    """JSON with sorted keys, one key a line, lists of numbers on one line."""
    if not isinstance(value, dict) or not value:
        return json.dumps(value, sort_keys=True)
    inner = indent + " "
    items = [f"{inner}{json.dumps(k)}: {_format(v, inner)}" for k, v in sorted(value.items())]
    return "{\n" + ",\n".join(items) + f"\n{indent}}}"


def dumps(entries: dict[str, dict[str, Any]]) -> str:
    """The golden file's text (traces left out: they have files of their own): readable,
    sorted keys."""
    plans = {name: {k: v for k, v in e.items() if k != "trace"} for name, e in entries.items()}
    return _format({"about": ABOUT, "platform": platform(), "plans": plans}) + "\n"


def dumps_trace(trace: list[dict[str, Any]]) -> str:
    """A golden trace file's text: a JSON list, one event a line."""
    return "[\n" + ",\n".join(trace_lines(trace)) + "\n]\n"


def write(entries: dict[str, dict[str, Any]]) -> None:
    """Rewrite the golden file and every trace file (stale trace files removed)."""
    TRACES.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(dumps(entries))
    for old in TRACES.glob("*.json"):
        old.unlink()
    for name, e in entries.items():
        trace_file(name).write_text(dumps_trace(e["trace"]))


def load() -> tuple[dict[str, dict[str, Any]], bool]:
    """The committed golden entries (each with its trace), and whether this is the platform
    they were written on."""
    data = json.loads(GOLDEN.read_text())
    plans = {
        name: {**e, "trace": json.loads(trace_file(name).read_text())}
        for name, e in data["plans"].items()
    }
    return plans, data["platform"] == platform()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", action="store_true", help=f"rewrite {GOLDEN.name} and the traces")
    p.add_argument("--only", nargs="*", choices=list(golden_plans()), help="these plans only")
    args = p.parse_args(argv)
    if args.write and args.only:
        p.error("--write regenerates the whole file; give no --only")
    entries = compute(args.only)
    if args.write:
        write(entries)
        print(f"wrote {GOLDEN} and {TRACES}/: {len(entries)} plans")
        return 0
    golden, exact = load()
    changed = 0
    for name, got in entries.items():
        for diff in differences(got, golden[name], exact):
            changed += 1
            print(f"{name}: {diff}")
    print(f"{len(entries)} plans, {changed} differences from {GOLDEN}")
    return 1 if changed else 0


if __name__ == "__main__":
    raise SystemExit(main())
