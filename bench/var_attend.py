"""The attention path of next-scale KV compression alone, in CPU time: what a method's store
costs per generation against the plain cache, with the rest of the model left out.

One generation (class 0 or the Infinity prompt, seed 0) of each model (``--models``) is recorded
as its layers hand their q, k, v to the history store; the recorded calls are then replayed
``--repeats`` times, in rotated order, into the plain cache (:class:`FullHistory`) and into a
budgeted store of each method (``--methods``) at each budget (``--budgets``), plans as
``bench/var.py`` builds them. Each replay is timed with ``time.process_time`` (the process's
own CPU time: other processes' load does not inflate it; one torch thread). Reported per cell:
median [lowest, highest] ms per generation and the median over the plain cache's median.

Where the time goes, per cell: the aten ops one replay dispatches (a ``TorchDispatchMode``
counts them: a deterministic measure of the per-call work), and the attention alone: SDPA over
as many key rows as each call's queries attended (the store's (query, key) pairs per call),
timed on contiguous tensors of those shapes like the replays. The plain cache's attention minus
a store's is what its fewer rows can save; the store's time minus its attention is what it
spends to keep them (appends, scores, top-k, compaction, bookkeeping).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from arg_types import among, fraction, listed, positive
from torch.utils._python_dispatch import TorchDispatchMode
from var import BUDGETS, CALIBRATION_SEED, hack_classes, model_shape, plan_for, selection_of, text
from var import METHODS as ALL_METHODS

from diffcache.errors import DiffCacheError
from diffcache.eval.timing import measurement_threads, rotated
from diffcache.generate import Request, generate
from diffcache.kv.budget import BudgetedHistory
from diffcache.kv.history import FullHistory, History, ScaleCall, attention
from diffcache.kv.history_method import fitted_selection
from diffcache.models import builtin_models, load_model

MODELS = ("var-digits", "var-d16-random")
METHODS = ("scalekv", "hack")

Calls = list[tuple[ScaleCall, torch.Tensor, torch.Tensor, torch.Tensor]]


def record(pipe: Any, request: Request) -> Calls:
    """The layer calls of one plain generation, raw queries evaluated (a replay gives them)."""
    calls: Calls = []

    class Recording(FullHistory):
        def attend(
            self, call: ScaleCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
        ) -> torch.Tensor:
            raw = None if call.raw_query is None else call.raw_query()
            calls.append((dataclasses.replace(call, raw_query=lambda: raw), q, k, v))
            return super().attend(call, q, k, v)

    pipe.history_store = Recording
    try:
        generate(pipe, request)
    finally:
        del pipe.history_store
    return calls


def replay(make: Callable[[], History], calls: Calls) -> float:
    """CPU seconds of one generation's calls through a fresh store."""
    store = make()
    start = time.process_time()
    for call, q, k, v in calls:
        store.attend(call, q, k, v)
    return time.process_time() - start


class OpCount(TorchDispatchMode):
    """Counts the aten ops dispatched while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops += 1
        return func(*args, **(kwargs or {}))


def anatomy(make: Callable[[], History], calls: Calls) -> tuple[int, list[int]]:
    """The aten ops of one generation's calls through a fresh store, and the key rows each
    call's queries attended (the plain cache: the whole history and map; a budgeted store: its
    (query, key) pairs over the call's queries, heads and batch rows)."""
    store = make()
    keys = []
    with OpCount() as count:
        for call, q, k, v in calls:
            before = getattr(store, "pairs", 0)
            store.attend(call, q, k, v)
            if isinstance(store, BudgetedHistory):
                keys.append((store.pairs - before) // (q.shape[0] * q.shape[1] * q.shape[2]))
            else:
                keys.append(call.schedule.start(call.si + 1))
    return count.ops, keys


def attention_seconds(calls: Calls, keys: list[int]) -> float:
    """CPU seconds of SDPA alone over each call's queries and ``keys`` rows (contiguous K and V
    in the call's dtypes, random values)."""
    work = []
    for (call, q, k, v), rows in zip(calls, keys, strict=True):
        shape = (*k.shape[:2], rows, k.shape[3])
        work.append((q, torch.randn(shape).to(k.dtype), torch.randn(shape).to(v.dtype), call))
    start = time.process_time()
    for q, k, v, call in work:
        attention(q, k, v, call.scale)
    return time.process_time() - start


def bench_model(model: str, args: argparse.Namespace) -> dict[str, Any]:
    """Every (method, budget) cell of one model against its plain cache."""
    entry = builtin_models()[model]
    pipe = load_model(model)
    schedule, layers, heads = model_shape(pipe)
    classes = hack_classes(pipe, Request(CALIBRATION_SEED, **text(model)), schedule)
    label = {"class_label": 0} if entry.family == "var" else {}
    calls = record(pipe, Request(seed=0, **label, **text(model)))
    stores: dict[str, Callable[[], History]] = {"plain": FullHistory}
    refused: dict[str, str] = {}
    for method in args.methods:
        for ratio in args.budgets:
            name = f"{method}@{ratio:g}"
            try:
                plan = plan_for(method, ratio, schedule, entry.family, classes)
                selection = fitted_selection(
                    name, lambda *shape, p=plan: selection_of(p, *shape), schedule, layers, heads
                )
            except DiffCacheError as e:  # a budget below the method's mandatory rows
                refused[name] = str(e)
                continue
            stores[name] = lambda s=selection: BudgetedHistory(s)
    times: dict[str, list[float]] = {name: [] for name in stores}
    attn: dict[str, list[float]] = {name: [] for name in stores}
    for name in stores:  # warm-up
        replay(stores[name], calls)
    shapes = {name: anatomy(make, calls) for name, make in stores.items()}
    for round_ in range(args.repeats):
        for name in rotated(list(stores), round_):
            times[name].append(replay(stores[name], calls))
            attn[name].append(attention_seconds(calls, shapes[name][1]))
    plain = statistics.median(times["plain"])
    cells: dict[str, dict[str, Any]] = {
        name: {
            "ms": [1e3 * f(t) for f in (statistics.median, min, max)],
            "vs_plain": statistics.median(t) / plain,
            "aten_ops": shapes[name][0],
            "key_rows": sum(shapes[name][1]),
            "attention_ms": 1e3 * statistics.median(attn[name]),
        }
        for name, t in times.items()
    }
    cells.update({name: {"refused": why} for name, why in refused.items()})
    return {"calls": len(calls), "cells": cells}


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| model | store | CPU ms / generation [min, max] | vs plain | aten ops | key rows "
        "| SDPA alone ms | the rest ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, res in results.items():
        for name, c in res["cells"].items():
            if "refused" in c:
                lines.append(f"| {model} | {name} | refused: {c['refused']} |" + " |" * 5)
                continue
            ms, sdpa = c["ms"], c["attention_ms"]
            lines.append(
                f"| {model} | {name} | {ms[0]:.2f} [{ms[1]:.2f}, {ms[2]:.2f}] "
                f"| {c['vs_plain']:.2f} | {c['aten_ops']} | {c['key_rows']} | {sdpa:.2f} "
                f"| {ms[0] - sdpa:.2f} |"
            )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    known = [n for n, e in builtin_models().items() if e.family in ("var", "infinity")]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=among(known), default=",".join(MODELS))
    p.add_argument("--methods", type=among(ALL_METHODS), default=",".join(METHODS))
    p.add_argument(
        "--budgets",
        type=listed(fraction),
        default=",".join(f"{b:g}" for b in BUDGETS),
        help="fractions of the history before the last scale",
    )
    p.add_argument("--repeats", type=positive, default=10, help="timed replays per store")
    p.add_argument("--out", default="out/bench-var-attend", help="folder for var_attend.json")
    args = p.parse_args(argv)
    for flag in ("models", "methods", "budgets"):
        if not getattr(args, flag):
            p.error(f"--{flag}: give at least one")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with measurement_threads(1):
        results = {model: bench_model(model, args) for model in args.models}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(
        ["python bench/var_attend.py", *(argv if argv is not None else sys.argv[1:])]
    )
    (out / "var_attend.json").write_text(
        json.dumps({"command": command, "torch": torch.__version__, "models": results}, indent=1)
    )
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
