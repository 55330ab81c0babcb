"""torch.compile and diffcache's DiT methods together: do the two speedups compose?

On one reference model (default ``dit-digits``, its bundled plans), four kinds of configuration
run the same request: the eager pipeline (``eager``), the eager pipeline under each method's
bundled plan, the compiled pipeline (``compiled W``: :func:`compile_pipe`, before
``accelerate`` as the README says; W = whole, blocks or modules, per method :data:`WHERE` or
``--where``) and the compiled pipeline under each plan. Procedure: one
untimed run of each configuration (compilation happens there, and is reported apart as the first
run's seconds), then ``--repeats`` rounds in which every configuration runs once, in an order
rotated by the round; latency is the median of the timed runs. Printed per method: latency,
speedup over ``eager`` (median of the per-round ratios, with the lowest and highest),
compute_fraction, the speedup over ``compiled W`` of the compiled cached run, "composed" =
(compiled + cache over eager) / ((compiled W over eager) x (cache over eager)), 1.0 when the two
gains multiply, and the largest difference of the compiled cached output from the eager cached
one. Numbers are printed as measured; nothing is asserted.

    python bench/compile_cache.py                       # inductor; each method's fit (WHERE)
    python bench/compile_cache.py --where blocks --methods easycache,hyca --repeats 5
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from arg_types import among, listed, positive

import diffcache
from diffcache.eval.timing import measurement_threads, paired_speedups, rotated, summary, timed
from diffcache.generate import Request, generate
from diffcache.models import builtin_models, load_model
from diffcache.registry import find_adapter

METHODS = ("easycache", "ertacache", "hyca", "invardiff")
#: torch.compile backends that run on a CPU: inductor builds kernels, the others only trace
BACKENDS = ("inductor", "aot_eager", "eager")


#: what each method needs compiled on its own (diffcache.compiled): every method runs on the
#: blocks or modules it caches compiled alone; step methods also on the whole transformer
WHERE = {"easycache": "whole", "ertacache": "whole", "hyca": "blocks", "invardiff": "modules"}


def compile_pipe(pipe: Any, where: str = "whole", backend: str = "inductor") -> Any:
    """Compile ``pipe``'s denoiser(s) in place, before ``diffcache.accelerate``: ``whole``
    (``torch.compile`` of each expert), ``blocks`` (each block on its own, ``fullgraph=True``:
    what diffusers' ``compile_repeated_blocks`` does where a model declares its blocks) or
    ``modules`` (each attention and feed-forward module of every block on its own). Returns
    ``pipe``."""
    adapter = find_adapter(pipe)
    for attr in adapter.experts:
        module = getattr(pipe, attr, None)
        if module is None:
            continue
        if where == "whole":
            setattr(pipe, attr, torch.compile(module, backend=backend))
            continue
        for stack in adapter.stacks:
            for block in getattr(module, stack.attr, None) or ():
                parts = (
                    [block]
                    if where == "blocks"
                    else [getattr(block, m.attr, None) for m in stack.modules]
                )
                for part in parts:  # a bare torch layer (FLUX's proj_mlp) has no frame to
                    if isinstance(part, torch.nn.Module):  # compile whole: torch skips it
                        part.compile(backend=backend, fullgraph=where == "blocks")
    return pipe


def _plan(model: str, method: str) -> str:
    return f"{model}.yaml" if method == "easycache" else f"{model}-{method}.yaml"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="dit-digits")
    parser.add_argument("--methods", type=among(METHODS), default=list(METHODS))
    parser.add_argument(
        "--backend", choices=BACKENDS, default="inductor", help="torch.compile backend"
    )
    parser.add_argument(
        "--where",
        choices=("fit", "whole", "blocks", "modules"),
        default="fit",
        help="what to compile: fit = what each method caches (WHERE), or one for all",
    )
    parser.add_argument("--repeats", type=positive, default=3)
    parser.add_argument("--threads", type=positive, default=None)
    parser.add_argument("--class-labels", type=listed(int), default=[3])
    args = parser.parse_args(argv)

    entry = builtin_models()[args.model]
    prompt = None if entry.family == "dit" else "a red ball"
    req = Request(prompt=prompt, class_label=args.class_labels[0]).merged(entry.defaults)
    eager = load_model(args.model)
    wheres = {m: WHERE[m] if args.where == "fit" else args.where for m in args.methods}
    compiled = {
        w: compile_pipe(load_model(args.model), w, args.backend) for w in set(wheres.values())
    }

    def run(pipe: Any, method: str | None) -> Callable[[], tuple[np.ndarray, float | None]]:
        def go() -> tuple[np.ndarray, float | None]:
            if method is None:
                return generate(pipe, req), None
            diffcache.accelerate(pipe, _plan(args.model, method))
            try:
                return generate(pipe, req), diffcache.stats(pipe).compute_fraction
            finally:
                diffcache.remove(pipe)

        return go

    configs = {"eager": run(eager, None)}
    configs |= {f"compiled {w}": run(pipe, None) for w, pipe in compiled.items()}
    for m in args.methods:
        configs[m], configs[f"compiled {m}"] = run(eager, m), run(compiled[wheres[m]], m)
    outputs, first, times = {}, {}, {name: [] for name in configs}
    with measurement_threads(args.threads) as threads:
        for name, fn in configs.items():
            outputs[name], first[name] = timed(fn)
        for r in range(args.repeats):
            for name in rotated(list(configs), r):
                times[name].append(timed(configs[name])[1])

    def speedup(name: str, base: str = "eager") -> float:
        return summary(paired_speedups(times[base], times[name]))[0]

    print(
        f"{args.model}, {req.get('steps')} steps, backend {args.backend}, {threads} thread(s), "
        f"{args.repeats} rounds; eager {np.median(times['eager']):.3f} s"
    )
    for w in compiled:
        name = f"compiled {w}"
        print(
            f"{name}: {np.median(times[name]):.3f} s, {speedup(name):.2f}x over eager, "
            f"first run (compiling) {first[name]:.1f} s"
        )
    print(
        "method     compiled  cf     eager+cache  compiled+cache  over compiled  composed  "
        "max|diff|"
    )
    for m in args.methods:
        c, cm, base = speedup(m), speedup(f"compiled {m}"), f"compiled {wheres[m]}"
        composed = cm / (speedup(base) * c)
        diff = float(np.abs(outputs[f"compiled {m}"][0] - outputs[m][0]).max())
        lo, hi = summary(paired_speedups(times["eager"], times[f"compiled {m}"]))[1:]
        print(
            f"{m:<10} {wheres[m]:<8}  {outputs[m][1]:.3f}  {c:>10.2f}x  {cm:>7.2f}x "
            f"[{lo:.2f}-{hi:.2f}]  {speedup(f'compiled {m}', base):>12.2f}x  {composed:>8.2f}  "
            f"{diff:.1e}"
        )


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"took {time.perf_counter() - t0:.0f} s")
