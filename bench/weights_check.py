"""What ``valid_for.weights: profiled`` costs each run: one read of the denoisers' squared norm
(``diffcache.lora.weights_norm``, what ``WeightsWatch`` computes at each run's first call),
beside one plain generation of the model's default request.

Per model: the denoisers' parameter count, then the median (lowest-highest) CPU seconds
(``time.process_time``, so that other processes on the machine do not count) of the norm and
of the generation over ``--repeats`` rounds, after an untimed warm-up of each, the two
alternating in each round (their order rotated by the round), and the norm's share of a run
(the median of the per-round ratios). ``--compare`` adds, in the same rounds, the read as
it was first written (a float64 copy of each parameter, squared and summed) beside
``vector_norm``'s. Numbers are printed as measured; nothing is asserted.

    python bench/weights_check.py                          # flux-tiny, dit-digits, wan-shapes
    python bench/weights_check.py --models wan2.1-1.3b-random --repeats 3 --steps 2 --compare
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from arg_types import names, positive

from diffcache.adapter import Target
from diffcache.eval.timing import measurement_threads, rotated, summary
from diffcache.generate import Request, generate
from diffcache.lora import weights_norm
from diffcache.models import builtin_models, load_model
from diffcache.registry import find_adapter

MODELS = ("flux-tiny", "dit-digits", "wan-shapes")


def cpu_seconds(fn: Callable[[], Any]) -> float:
    """The CPU seconds of this process that ``fn()`` takes."""
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def copied_norm(experts: list[Any]) -> float:
    """The squared norm read through a float64 copy of each parameter (the first way)."""
    return sum(float(p.detach().double().square().sum()) for e in experts for p in e.parameters())


def measure(name: str, repeats: int, steps: int | None, compare: bool) -> dict[str, Any]:
    """The parameter count, and the norm's and a generation's (of ``steps``, default the
    model's) CPU seconds per round."""
    pipe = load_model(name)
    experts = Target.resolve(find_adapter(pipe), pipe).experts
    entry = builtin_models()[name]
    prompt = "a red square moving left" if name == "wan-shapes" else "a cat"
    request = Request(**({} if entry.family == "dit" else {"prompt": prompt}))
    request = request.merged(entry.defaults)  # dit-digits: its default class 3
    if steps is not None:
        request = request.replace(steps=steps)
    jobs = {"norm": lambda: weights_norm(experts), "run": lambda: generate(pipe, request)}
    if compare:
        jobs["copy"] = lambda: copied_norm(experts)
    for job in jobs.values():  # warm-up
        job()
    times: dict[str, list[float]] = {k: [] for k in jobs}
    for r in range(repeats):
        for key in rotated(list(jobs), r):
            times[key].append(cpu_seconds(jobs[key]))
    params = sum(p.numel() for e in experts for p in e.parameters())
    shares = [n / g for n, g in zip(times["norm"], times["run"], strict=True)]
    return {"params": params, **times, "share": shares}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=names, default=list(MODELS))
    parser.add_argument("--repeats", type=positive, default=9)
    parser.add_argument("--threads", type=positive, default=None)
    parser.add_argument("--steps", type=positive, default=None, help="default: the model's")
    parser.add_argument("--compare", action="store_true", help="also time the float64-copy read")
    args = parser.parse_args(argv)
    with measurement_threads(args.threads) as threads:
        print(f"CPU seconds (time.process_time), {threads} torch thread(s), median (range)")
        print(f"{'model':<22}{'params':>12}{'norm s':>28}{'run s':>28}{'norm / run':>12}")
        for name in args.models:
            m = measure(name, args.repeats, args.steps, args.compare)
            norm, run, share = (summary(m[k]) for k in ("norm", "run", "share"))
            cells = [f"{a:.4f} ({b:.4f}-{c:.4f})" for a, b, c in (norm, run)]
            print(f"{name:<22}{m['params']:>12,}{cells[0]:>28}{cells[1]:>28}{share[0]:>12.2%}")
            if args.compare:
                a, b, c = summary(m["copy"])
                print(f"{'  float64 copy':<34}{f'{a:.4f} ({b:.4f}-{c:.4f})':>28}")


if __name__ == "__main__":
    main()
