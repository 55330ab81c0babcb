"""Every DiT method on the trained reference models, at its default and two more aggressive
settings, beside diffusers' caches: quality that means something, in one table and one report.

For each reference model (``dit-digits``, ``wan-shapes``) the plans are:

- each method's bundled plan for the model (``<model>.yaml`` is EasyCache; ``<model>-ertacache``,
  ``-hyca``, ``-invardiff``), the method's default here;
- the same method profiled in this run to two lower compute targets (``--targets``, default 0.4
  and 0.3) on the model's calibration inputs (those ``python -m diffcache.profiles.make`` uses,
  never the evaluation inputs), keeping the bundled plan's fixed options;
- diffusers' FirstBlockCache, TaylorSeer and MagCache where the transformer has ``enable_cache``
  (DiT's has not); MagCache at diffusers' default settings with magnitude ratios measured in
  this run by diffusers' calibration mode on this model, on the calibration inputs and seed of
  the model's bundled EasyCache plan (``eval/baselines.py``: ``magcache``).

One ``diffcache.eval.runner.evaluate`` call then runs them all on the model's evaluation inputs
and seeds, interleaved, and writes report.html (quality-vs-speedup charts, sample grids) under
``--out``. The table: latency, speedup, compute fraction (of the method's work unit: steps for
EasyCache / ERTACache, block calls for HyCa, module calls for InvarDiff), MACs (the denoiser's
Linear multiply-accumulates over the baseline's, the mean over every request, ``--macs first``
counts the first only: one unit for every method and diffusers' caches alike), PSNR / SSIM
against the plain output of the same request, the task score beside the baseline's and the
samples lost / won against it (paired by request). Numbers are printed as measured; nothing is
asserted. Speed at real size: ``bench/dit_step_cache.py``.

    python bench/dit_methods.py --models wan-shapes --seeds 2
    python bench/dit_methods.py --models wan-shapes --targets 0.3 --inputs 8   # a short run
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
from arg_types import among, fraction, listed, positive
from reference_models import DIFFUSERS, fmt, lost_won, per_request, sign_p, table

import diffcache
from diffcache.eval.baselines import magcache
from diffcache.eval.runner import evaluate
from diffcache.generate import Request
from diffcache.methods.base import MethodConfig
from diffcache.models import builtin_models, load_model
from diffcache.plan import Plan
from diffcache.profiles import bundled_plans
from diffcache.profiles.make import PLANS

MODELS = ("dit-digits", "wan-shapes")
METHODS = ("", "-ertacache", "-hyca", "-invardiff")  # bundled plan suffixes


def sweep(model: str, targets: list[float]) -> list[Plan]:
    """Each method's bundled plan, then the method profiled to each lower target."""
    pipe = load_model(model)
    plans = []
    for suffix in METHODS:
        name = f"{model}{suffix}.yaml"
        if name not in bundled_plans():
            continue
        base = Plan.load(name)
        plans.append(base)
        _, _, fixed, _, inputs, seed = PLANS[name]
        request = Request(seed=seed).merged(builtin_models()[model].defaults)
        for target in targets:
            config = type(base.config).from_options(fixed, f"{name}: options")
            plans.append(profiled(pipe, config, inputs(), target, request))
    return plans


def profiled(
    pipe: Any, config: MethodConfig, inputs: list, target: float, request: Request
) -> Plan:
    """``config`` profiled on ``inputs`` to compute at most ``target`` (the time it took and
    the options it chose printed), labelled ``METHOD c<=TARGET``."""
    t0 = time.perf_counter()
    plan = diffcache.profile(pipe, config, inputs, target_compute=target, request=request)
    print(
        f"  profiled {config.name} to {target:g} in {time.perf_counter() - t0:.0f} s: "
        f"{dict(plan.options)}",
        flush=True,
    )
    return dataclasses.replace(plan, source=f"{config.name} c<={target:g}")


def builtins(model: str) -> list:
    """diffusers' caches for the model: FirstBlockCache and TaylorSeer as specs, MagCache
    calibrated here (none for DiT, whose transformer has no ``enable_cache``)."""
    if builtin_models()[model].family == "dit":
        return []
    _, _, _, _, inputs, seed = PLANS[f"{model}.yaml"]
    request = Request(seed=seed).merged(builtin_models()[model].defaults)
    t0 = time.perf_counter()
    mag = magcache(load_model(model), inputs(), request, threshold=0.06)
    print(f"  calibrated {mag.name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return [*DIFFUSERS, mag]


def verdict(report: dict) -> None:
    """The goal, read off the table: per method the fewest MACs among its settings that keep
    the baseline's task score, and whether each of ours computes less than every diffusers
    cache that keeps it."""
    base = report["baseline"]["task_score"]
    if base is None:
        return
    scores = per_request(report, "task_score")
    best: dict[str, tuple[float, str] | None] = {}
    for r in report["runs"]:
        macs, kept = r.get("macs_fraction"), (r["task_score"] or 0) >= base - 1e-9
        old = best.setdefault(r["method"], None)
        if kept and macs is not None and (old is None or macs < old[0]):
            best[r["method"]] = (macs, r["plan"])

    def short_of(m: str) -> str:
        """The method's best task score (fewest MACs among equals), with its paired test."""
        runs = [r for r in report["runs"] if r["method"] == m]
        r = max(runs, key=lambda r: (r["task_score"] or 0, -(r.get("macs_fraction") or 1e9)))
        paired = (scores.get("baseline", {}), scores.get(r["plan"], {}))
        return (f"{m} none (best task {fmt(r['task_score'], '.3f')} at MACs "
                f"{fmt(r.get('macs_fraction'), '.3f')}, lost/won {lost_won(*paired)}, "
                f"sign test p {sign_p(*paired)})")  # fmt: skip

    cells = [f"{m} {b[0]:.3f} ({b[1]})" if b else short_of(m) for m, b in best.items()]
    print(f"  - fewest MACs at task score >= baseline {base:.3f}: " + "; ".join(cells))
    theirs = min((b[0] for m, b in best.items() if m.startswith("diffusers:") and b), default=None)
    if theirs is not None:
        ours = [f"{m} {'yes' if b and b[0] < theirs else 'no'}"
                for m, b in best.items() if not m.startswith("diffusers:")]  # fmt: skip
        print("  - fewer MACs than every diffusers cache at that score: " + ", ".join(ours))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=among(MODELS), default=",".join(MODELS))
    p.add_argument("--seeds", type=positive, default=1, help="seeds per evaluation input")
    p.add_argument(
        "--targets", type=listed(fraction), default="0.4,0.3",
        help="lower compute targets per method",
    )  # fmt: skip
    p.add_argument("--out", default="out/bench-dit-methods")
    p.add_argument(
        "--threads", type=positive, default=None, help="torch threads (default: torch's)"
    )
    p.add_argument(
        "--macs", choices=("all", "first"), default="all",
        help="count MACs on every request (default; adaptive caches differ per input, one more "
        "untimed run each) or on the first only (half the time)",
    )  # fmt: skip
    p.add_argument(
        "--inputs",
        type=positive,
        default=None,
        help="evaluate the first N evaluation inputs only",
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    targets = args.targets
    for model in args.models:
        print(f"== {model}: profiling the sweeps", flush=True)
        plans: list = sweep(model, targets) + builtins(model)
        prompts = None
        if args.inputs:
            prompts = list(builtin_models()[model].default_prompts() or [])[: args.inputs] or None
        t0 = time.perf_counter()
        report = evaluate(
            model, plans, Path(args.out) / model, prompts=prompts, seeds=args.seeds,
            progress=True, macs=args.macs,
        )  # fmt: skip
        table(report, time.perf_counter() - t0)
        verdict(report)


if __name__ == "__main__":
    main()
