"""What caching still buys on a few-step model: every DiT method on ``dit-digits-8step`` (the
distilled student of dit-digits, 8 DDIM steps, no CFG), at equal task score or not.

First, per method, whether its default options can act at this step count at all (the one line
``accelerate`` refuses a plan with; ``--steps`` changes the count). Then each method is profiled
on the model's ten classes at seed 0 (as the bundled dit-digits plans are) to each compute
target (``--targets``), with the warm-up shortened where the default one covers the run
(EasyCache: the bundled dit-digits plan's 4, or ``steps - 4``; HyCa: its default 3, or
``steps - 2``). One ``diffcache.eval.runner.evaluate`` call runs them all against the plain model
on the classes x ``--seeds`` seeds and prints the table of ``bench/reference_models.py``
(speedup, compute fraction, PSNR, task score, lost/won and the sign test's p) and, per method,
the fewest MACs at the baseline's task score. Numbers are printed as measured; nothing is
asserted.

    python bench/fewstep.py                       # 8 steps, targets 0.75 and 0.5, 2 seeds
    python bench/fewstep.py --steps 4 --targets 0.75
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from arg_types import fraction, listed, positive
from dit_methods import profiled, verdict
from reference_models import table

import diffcache
from diffcache.eval.runner import evaluate
from diffcache.generate import Request
from diffcache.methods.easycache import EasyCacheConfig
from diffcache.methods.ertacache import ERTACacheConfig
from diffcache.methods.hyca import HyCaConfig
from diffcache.methods.invardiff import InvarDiffConfig
from diffcache.models import builtin_models, load_model

MODEL = "dit-digits-8step"
DEFAULTS = (EasyCacheConfig(), ERTACacheConfig(), HyCaConfig(), InvarDiffConfig())


def configs(steps: int) -> list:
    """Each method's options for this bench: the bundled dit-digits ones, with a warm-up that
    leaves something to reuse in ``steps`` steps."""
    return [
        EasyCacheConfig(warmup_steps=min(4, max(steps - 4, 0))),
        ERTACacheConfig(time_adjust=False),  # DDIM, not the flow-matching Euler update
        HyCaConfig(warmup_steps=min(3, max(steps - 2, 1))),
        InvarDiffConfig(),
    ]


def plans(steps: int, targets: list[float]) -> list:
    """Every method profiled to every target at ``steps`` steps (the targets a method cannot
    reach at this count are reported and left out)."""
    pipe = load_model(MODEL)
    request = Request(seed=0, steps=steps).merged(builtin_models()[MODEL].defaults)
    classes = [str(c) for c in range(10)]
    made = []
    for config in configs(steps):
        for target in targets:
            try:
                made.append(profiled(pipe, config, classes, target, request))
            except diffcache.DiffCacheError as e:
                print(f"  {config.name} to {target:g}: {e}", flush=True)
    return made


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=positive, default=builtin_models()[MODEL].defaults["steps"])
    p.add_argument("--targets", type=listed(fraction), default="0.75,0.5")
    p.add_argument("--seeds", type=positive, default=2, help="seeds per class")
    p.add_argument("--out", default="out/bench-fewstep")
    p.add_argument("--threads", type=positive, default=None, help="torch threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"== {MODEL} at {args.steps} steps: each method's default options")
    for config in DEFAULTS:
        print(f"  {config.name}: {config.steps_problem(args.steps) or 'can act'}")
    made = plans(args.steps, args.targets)
    t0 = time.perf_counter()
    report = evaluate(
        MODEL, made, Path(args.out) / f"{args.steps}-steps", seeds=args.seeds,
        request=Request(steps=args.steps), progress=True,
    )  # fmt: skip
    table(report, time.perf_counter() - t0)
    verdict(report)


if __name__ == "__main__":
    main()
