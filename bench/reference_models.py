"""Caches on the trained reference models: quality that means something, measured side by side.

For each reference model (``dit-digits``, ``wan-shapes``) one ``diffcache.eval.runner.evaluate``
call runs, on the same inputs and seeds and interleaved request by request: the plain pipeline,
EasyCache at three thresholds (``--thresholds``; the model's bundled plan gives the warm-up),
the model's bundled plans of other methods (``<model>-ertacache.yaml`` ...),
and diffusers' FirstBlockCache and TaylorSeer where the model's transformer supports diffusers'
``enable_cache`` (DiT's does not: those rows say so). The table: latency, speedup (median of
the paired per-round ratios, with their range; ``--repeats`` rounds on ``--threads`` threads),
compute_fraction (ours: computed denoiser calls / calls; diffusers' caches report none), PSNR and
SSIM against the plain output of the same request, and the task score (class accuracy of the
generated digits / share of shape clips whose colour and motion direction are right) beside the
baseline's, and the samples each run lost / won against the baseline on the same request (two
runs with one score can differ in which samples they get right) with the exact sign test's p of
that split (below 0.05: the run's task score differs from the baseline's by more than which
samples happen to flip; ``diffcache.eval.paired``, as in the report's tables). This is the
table later DiT methods are judged on. Numbers are printed as measured; nothing is asserted.
The full reports (with sample grids) are written under ``--out``.

    python bench/reference_models.py                      # both models, their default inputs
    python bench/reference_models.py --models dit-digits --seeds 2 --thresholds 0.05,0.1,0.2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from arg_types import among, listed, non_negative_float, positive

from diffcache.eval import paired
from diffcache.eval.paired import per_request
from diffcache.eval.report import speedup_text
from diffcache.eval.runner import evaluate
from diffcache.eval.timing import REPEATS
from diffcache.models import builtin_models
from diffcache.plan import Plan
from diffcache.profiles import bundled_plans

MODELS = ("dit-digits", "wan-shapes")
THRESHOLDS = {"dit-digits": (0.05, 0.1, 0.2), "wan-shapes": (0.05, 0.1, 0.2)}
DIFFUSERS = ("diffusers:fbcache:threshold=0.1", "diffusers:taylorseer:cache_interval=2")


def comparisons(model: str, thresholds: tuple[float, ...]) -> list[Any]:
    base = Plan.load(f"{model}.yaml").to_dict()
    plans = [
        {**base, "options": {**base["options"], "threshold": t}, "provenance": {}}
        for t in thresholds
    ]
    others = sorted(p for p in bundled_plans() if p.startswith(f"{model}-"))  # other methods
    family = builtin_models()[model].family  # DiT has no diffusers enable_cache
    return [*plans, *others, *(DIFFUSERS if family != "dit" else ())]


def fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def lost_won(base: dict[int, float], run: dict[int, float]) -> str:
    """``lost/won``: samples the run scores worse / better on than the baseline (same request)."""
    return "—" if not run else "{}/{}".format(*paired.lost_won(base, run))


def sign_p(base: dict[int, float], run: dict[int, float]) -> str:
    """The exact sign test's p of lost against won (``diffcache.eval.paired.sign_test``)."""
    return "—" if not run else f"{paired.sign_test(*paired.lost_won(base, run)):.2g}"


def table(report: dict[str, Any], took: float) -> None:
    base = report["baseline"]
    print(
        f"\n== {report['model']} | {base['samples']} samples | baseline {base['latency_s']:.3f} "
        f"s, task score {fmt(base['task_score'], '.3f')} | {took:.0f} s"
    )
    print(
        f"  {'config':<46} {'latency':>8} {'speedup (range)':>20} {'compute':>7} {'MACs':>6} "
        f"{'PSNR':>6} {'SSIM':>6} {'task':>6} {'lost/won':>8} {'p':>5}"
    )
    scores = per_request(report, "task_score")
    for r in report["runs"]:
        print(
            f"  {r['plan']:<46} {r['latency_s']:8.3f} {speedup_text(r):>20} "
            f"{fmt(r['compute_fraction'], '.3f'):>7} {fmt(r.get('macs_fraction'), '.3f'):>6} "
            f"{fmt(r['psnr'], '.2f'):>6} "
            f"{fmt(r['ssim'], '.4f'):>6} {fmt(r['task_score'], '.3f'):>6} "
            f"{lost_won(scores.get('baseline', {}), scores.get(r['plan'], {})):>8} "
            f"{sign_p(scores.get('baseline', {}), scores.get(r['plan'], {})):>5}"
        )
    print("  - p: two-sided exact sign test of lost against won (small: a real difference)")
    every = all("macs" in rec for rec in report["records"])
    print(f"  - MACs: {'mean over every request' if every else 'counted on the first request'}")
    if not any(r["method"].startswith("diffusers:") for r in report["runs"]):
        print("  - diffusers' caches: n/a (this model's transformer has no enable_cache)")
    for key, note in report["notes"].items():
        print(f"  - {key}: {note}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=among(MODELS), default=",".join(MODELS))
    p.add_argument("--seeds", type=positive, default=1, help="seeds per default input")
    p.add_argument(
        "--thresholds", type=listed(non_negative_float), default=None,
        help="EasyCache thresholds (comma-separated)",
    )  # fmt: skip
    p.add_argument("--out", default="out/bench-reference")
    p.add_argument(
        "--threads", type=positive, default=None,
        help="torch threads while measuring (default: OMP_NUM_THREADS, else 1)",
    )  # fmt: skip
    p.add_argument("--repeats", type=positive, default=REPEATS, help="timed rounds per request")
    args = p.parse_args(argv)
    for model in args.models:
        thresholds = THRESHOLDS[model]
        if args.thresholds:
            thresholds = tuple(args.thresholds)
        plans = comparisons(model, thresholds)
        t0 = time.perf_counter()
        report = evaluate(
            model, plans, Path(args.out) / model, seeds=args.seeds, progress=True,
            repeats=args.repeats, threads=args.threads,
        )  # fmt: skip
        table(report, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
