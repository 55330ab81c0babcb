"""The DiT methods where users run them: each method on each variant of the trained reference
models (issue 24's benchmark), against the same variant uncached.

Variants (``--variants``): ``base`` (the model as built), ``lora`` (the built-in LoRA models
trained here: ``dit-digits-lora``, a class shift scored on the shifted classes, and
``wan-shapes-lora``, a direction swap scored on the reversed directions), ``int8`` (torchao
weight-only int8: ``diffcache.quant.quantize_int8``),
``8step`` (the distilled ``dit-digits-8step`` and ``wan-shapes-8step``) and ``compiled``
(``torch.compile`` where each method supports it, ``bench/compile_cache.py``'s ``WHERE``,
uncached and cached alike). A compiled cell compiles its pipeline and runs one untimed
generation first, whose seconds are printed apart (the compile; evaluate's warm-up and timed
rounds then find the graphs built). ``--compile-backend inductor`` builds C++: minutes per
graph on a CPU the first time, seconds once inductor's FX graph cache holds it (on by default,
on disk across processes: ``TORCHINDUCTOR_CACHE_DIR``); ``eager`` / ``aot_eager`` only trace
(no speed of their own: a quick check of the column). Plans: each method's
bundled plan for the model; a calibrated method (ERTACache, InvarDiff, HyCa) on a variant its
bundled plan was not calibrated on (LoRA, int8) is profiled on that variant first as the bundled
plan was made (``diffcache.profiles.make``: its fixed options and compute target, the model's
calibration inputs), as the plan's warning tells a user to do. Each cell is one
``diffcache.eval.runner.evaluate`` call (its ``prepare`` builds the variant), the plan and the
uncached variant interleaved per request.

Printed per cell: compute_fraction, speedup (median of the paired per-round ratios, with their
range), ``share`` (``s``: the share of a plain run's time spent in the work the method's compute
fraction counts: the denoiser calls for the step methods, the blocks for HyCa, the attention /
feed-forward modules for InvarDiff; measured on the same variant in this process:
:func:`shares`), of ideal (the goal, DESIGN.md section 8: speedup / (1 / ((1 - s) + s x
compute_fraction)), 1.0 when the reuse itself costs nothing; the rest of the run, text encoder,
scheduler, VAE and the denoiser's work outside the counted sites, stays as it was), of 1/cf
(informational: speedup / (1 / compute_fraction), as if the whole run scaled with the counted
work, which no cell can reach), PSNR against the uncached variant, the task score beside the
uncached variant's, lost / won samples and the sign test's p; under the table each variant's
shares. Goals (issue 24): of ideal >= 0.9 where a method skips work, no cell losing task score
at p < 0.05. Numbers are printed as measured; nothing is asserted.

``--clock`` is what every run and share is timed by: ``wall`` (the default, ``time.perf_counter``)
or ``cpu`` (``time.process_time``: the process's CPU seconds, which on a machine loaded by other
work read what an idle machine's wall clock would, less the effects of cache and core sharing;
meaningful with 1 torch thread, the default, and on a CPU only). The clock is printed with the
table.

    python bench/dit_variants.py --models dit-digits --variants base,int8,8step --inputs 10
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from arg_types import among, positive
from compile_cache import BACKENDS, WHERE, compile_pipe
from reference_models import fmt, lost_won, sign_p

import diffcache
from diffcache.adapter import Target
from diffcache.errors import UnsupportedModelError
from diffcache.eval.paired import per_request
from diffcache.eval.report import speedup_text
from diffcache.eval.runner import evaluate
from diffcache.eval.timing import ideal_speedup, measurement_threads, time_inside, timed
from diffcache.generate import Request, expand, generate
from diffcache.models import builtin_models, builtin_of, load_model
from diffcache.plan import Plan
from diffcache.profiles import bundled_plans
from diffcache.profiles.make import PLANS
from diffcache.quant import quantize_int8
from diffcache.registry import find_adapter

MODELS = ("dit-digits", "wan-shapes")
VARIANTS = ("base", "lora", "int8", "8step", "compiled")
METHODS = {"easycache": "", "ertacache": "-ertacache", "hyca": "-hyca", "invardiff": "-invardiff"}
#: the variant's built-in model where it is one (the others prepare the model's own pipeline)
MODEL_OF = {
    ("dit-digits", "lora"): "dit-digits-lora",
    ("wan-shapes", "lora"): "wan-shapes-lora",
    ("dit-digits", "8step"): "dit-digits-8step",
    ("wan-shapes", "8step"): "wan-shapes-8step",
}
#: plain runs (the first inputs, one seed) whose median gives the denoiser's share of the time
SHARE_INPUTS = 6
#: the part of a plain run each method's compute fraction counts: the denoiser calls, or the
#: sites of a ``Target.sites`` kind
COUNTS = {"easycache": "denoiser", "ertacache": "denoiser", "hyca": "block", "invardiff": "module"}
#: the parts whose share of a plain run :func:`shares` measures
PARTS = ("denoiser", "block", "module")
#: ``--clock``: what the runs are timed by, and how the table names it
CLOCKS: dict[str, tuple[Callable[[], float], str]] = {
    "wall": (time.perf_counter, "wall seconds (time.perf_counter)"),
    "cpu": (time.process_time, "CPU seconds of the process (time.process_time)"),
}


def prepare_for(variant: str, method: str, backend: str, first: str) -> Callable[[Any], Any] | None:
    """What turns the loaded pipeline into the variant (None: it already is); ``first``: the
    evaluation input a compiled pipeline compiles on."""
    if variant == "int8":
        return quantize_int8
    if variant == "compiled":
        return lambda pipe: compiled(pipe, WHERE[method], backend, first)
    return None


def compiled(pipe: Any, where: str, backend: str, first: str) -> Any:
    """``pipe`` compiled (:func:`compile_pipe`) and its graphs built by one untimed generation
    of the input ``first``, whose seconds are printed: the compile, kept out of the timings."""
    compile_pipe(pipe, where, backend)
    request = Request().merged(builtin_of(pipe).defaults)
    (request,) = expand(find_adapter(pipe), [first], 1, request)
    seconds = timed(lambda: generate(pipe, request))[1]
    print(f"  compiled {where} ({backend}): first generation {seconds:.1f} s", flush=True)
    return pipe


def plan_for(model: str, variant: str, method: str) -> Plan:
    """The method's bundled plan for the variant's model, or (calibrated methods on LoRA / int8
    weights) the same fixed options profiled on the variant."""
    own = MODEL_OF.get((model, variant), model)
    name = f"{own}{METHODS[method]}.yaml"  # the distilled model's own; a LoRA takes the base's
    name = name if name in bundled_plans() else f"{model}{METHODS[method]}.yaml"
    plan = Plan.load(name)
    if method == "easycache" or variant not in ("lora", "int8"):
        return plan
    _, _, fixed, target, inputs, seed = PLANS[f"{model}{METHODS[method]}.yaml"]
    pipe = load_model(own)
    pipe = quantize_int8(pipe) if variant == "int8" else pipe
    config = type(plan.config).from_options(fixed, f"{name}: options")
    request = Request(seed=seed).merged(builtin_models()[own].defaults)
    t0 = time.perf_counter()
    made = diffcache.profile(pipe, config, inputs(), request=request, target_compute=target)
    print(f"  profiled {method} on {variant} in {time.perf_counter() - t0:.0f} s", flush=True)
    return made


def shares(
    own: str,
    prepare: Callable[[Any], Any] | None,
    inputs: list[str],
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """The share of a plain run's time on this variant spent inside the denoiser calls
    (``"denoiser"``), its block calls (``"block"``) and its module calls (``"module"``): each the
    median over the inputs of (seconds inside those calls) / (seconds of the whole generation),
    timed in the same runs, after one untimed run (outside the denoiser: text encoding, the
    scheduler, the VAE, which no cache skips; outside the blocks also the denoiser's embeddings
    and final layer, which the block methods always run). Sites a compiled graph holds (the
    blocks of a transformer compiled whole, the modules of blocks compiled on their own) are
    not timed: a timer there would break the graph. ``clock`` times both."""
    pipe = load_model(own)
    pipe = prepare(pipe) if prepare is not None else pipe
    adapter = find_adapter(pipe)
    target = Target.resolve(adapter, pipe)
    parts = {"denoiser": list(target.experts)}
    for kind in PARTS[1:]:
        with contextlib.suppress(UnsupportedModelError):  # diffcache.compiled.check_site
            parts[kind] = [s.module for s in target.sites(kind)]
    base = Request(seed=0).merged(builtin_models()[own].defaults)
    requests = expand(adapter, inputs, 1, base) if inputs else [base]
    measured: dict[str, list[float]] = {name: [] for name in parts}
    with measurement_threads():
        generate(pipe, requests[0])
        for request in requests:
            with ExitStack() as stack:
                inside = {
                    k: stack.enter_context(time_inside(m, clock=clock)) for k, m in parts.items()
                }
                _, seconds = timed(lambda r=request: generate(pipe, r), clock=clock)
            for name, total in inside.items():
                measured[name].append(total[0] / seconds)
    return {name: statistics.median(values) for name, values in measured.items()}


def of_ideals(
    method: str, speedup: float, cf: float | None, share: dict[str, float]
) -> tuple[float | None, float | None]:
    """The speedup over its ideal (DESIGN.md: the time outside the work the compute fraction
    counts stays fixed, ``share`` that work's part of a plain run) and over 1 / ``cf`` (None
    where the plan skips nothing)."""
    if cf is None or cf >= 1:
        return None, None
    return speedup / ideal_speedup(cf, share[COUNTS[method]]), speedup / ideal_speedup(cf)


def row(
    model: str, variant: str, method: str, report: dict[str, Any], share: dict[str, float]
) -> str:
    run = report["runs"][0]
    cf, speedup = run["compute_fraction"], run["speedup"]
    of_ideal, of_cf = of_ideals(method, speedup, cf, share)
    scores = per_request(report, "task_score")
    paired = (scores.get("baseline", {}), scores.get(run["plan"], {}))
    return (
        f"{model:<11} {variant:<8} {method:<10} {fmt(cf, '.3f'):>7} "
        f"{speedup_text(run):>20} {share[COUNTS[method]]:>5.3f} {fmt(of_ideal, '.2f'):>8} "
        f"{fmt(of_cf, '.2f'):>7} "
        f"{fmt(run.get('psnr'), '.1f'):>7} {fmt(run['task_score'], '.3f'):>6} "
        f"{fmt(report['baseline']['task_score'], '.3f'):>6} {lost_won(*paired):>8} "
        f"{sign_p(*paired):>6}"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=among(MODELS), default=",".join(MODELS))
    p.add_argument("--variants", type=among(VARIANTS), default=",".join(VARIANTS))
    p.add_argument("--methods", type=among(tuple(METHODS)), default=",".join(METHODS))
    p.add_argument("--inputs", type=positive, default=None, help="the first N evaluation inputs")
    p.add_argument("--seeds", type=positive, default=1, help="seeds per evaluation input")
    p.add_argument("--repeats", type=positive, default=3, help="timed rounds per request")
    p.add_argument(
        "--compile-backend", choices=BACKENDS, default="inductor", help="torch.compile backend"
    )
    p.add_argument(
        "--clock", choices=tuple(CLOCKS), default="wall", help="time runs in wall or CPU seconds"
    )
    p.add_argument("--out", default="out/bench-dit-variants")
    args = p.parse_args(argv)
    clock, clock_name = CLOCKS[args.clock]
    header = (
        f"{'model':<11} {'variant':<8} {'method':<10} {'compute':>7} {'speedup (range)':>20} "
        f"{'share':>5} {'of ideal':>8} {'of 1/cf':>7} "
        f"{'PSNR dB':>7} {'task':>6} {'plain':>6} "
        f"{'lost/won':>8} {'p':>6}"
    )
    lines, notes = [header], ["share of a plain run's time (denoiser, blocks, modules):"]
    print(f"timed in {clock_name}", flush=True)
    print(header, flush=True)
    for model in args.models:
        for variant in args.variants:
            own = MODEL_OF.get((model, variant), model)
            prompts = None
            if args.inputs:
                prompts = list(builtin_models()[own].default_prompts() or [])[: args.inputs]
            inputs = prompts or list(builtin_models()[own].default_prompts() or [])
            measured: dict[str, dict[str, float]] = {}  # by what the variant compiles (one else)
            for method in args.methods:
                plan = plan_for(model, variant, method)
                prepare = prepare_for(variant, method, args.compile_backend, inputs[0])
                where = WHERE[method] if variant == "compiled" else ""
                if where not in measured:
                    measured[where] = share = shares(own, prepare, inputs[:SHARE_INPUTS], clock)
                    values = ", ".join(f"{share[k]:.3f}" if k in share else "-" for k in PARTS)
                    notes.append(f"{model} {variant} {where}".rstrip() + f": {values}")
                report = evaluate(
                    own, [plan], Path(args.out) / f"{model}-{variant}-{method}",
                    prompts=prompts or None, seeds=args.seeds, repeats=args.repeats,
                    samples=0, prepare=prepare, clock=clock,
                )  # fmt: skip
                lines.append(row(model, variant, method, report, measured[where]))
                print(lines[-1], flush=True)
                if variant == "compiled":  # beside the first generation's (the compile)
                    latency = report["baseline"]["latency_s"]
                    print(f"  uncached compiled, warmed: {latency:.2f} s a generation", flush=True)
    print("\n".join(["", f"timed in {clock_name}", *lines, "", *notes]))


if __name__ == "__main__":
    main()
