"""Step caching on DiTs: diffcache's EasyCache beside diffusers' own caches, in one process.

For each model, these configurations run on the same request (prompt, size, steps, seed):

- ``baseline``: the pipeline as built, no acceleration.
- ``identity``: diffcache.accelerate() with an EasyCache plan of threshold 0 (never reuses); it
  measures what our hooks cost when they do nothing.
- ``EasyCache tau=T``: diffcache.accelerate() with an EasyCache plan (one line per threshold).
- ``ERTACache c<=F`` / ``HyCa c<=F`` / ``InvarDiff c<=F``: ``diffcache.profile`` makes the
  method's plan for compute fraction F (HyCa: of the block calls, InvarDiff: of the module calls)
  on two calibration prompts (not the bench's), then it runs like the others
  (``--erta-compute``, ``--hyca-compute``, ``--invardiff-compute``). For block and module
  methods "of ideal" is optimistic: the parts of the denoiser outside the blocks always run.
- ``FirstBlockCache``: diffusers' ``transformer.enable_cache(FirstBlockCacheConfig(threshold))``.
- ``TaylorSeer``: diffusers' ``transformer.enable_cache(TaylorSeerCacheConfig(cache_interval,
  disable_cache_before_step, max_order=1, cache_identifiers))``: the attention modules of every
  block (diffusers' default patterns miss Wan's and CogVideoX's ``attn1`` / ``attn2``, which would
  make it a no-op there; the line shows how many modules are hooked). MLPs run every step.

Procedure: one untimed probe run per configuration (the baseline's comes first and is the
warm-up), with forward hooks counting MACs and timing the calls of ``pipe.transformer`` (the
denoiser share), and the decoded output kept for PSNR; then
``for r in range(repeats): for config in configs (order rotated by r): set up, time one
generation, tear down``, no counting hooks attached. Latency is the median of the timed runs of
a configuration (the whole pipeline call: text encoder, denoising loop, VAE decode).

Definitions:

- speedup = baseline median / config median.
- calls = diffcache.stats(pipe).compute_fraction: computed denoiser calls / denoiser calls
  (our method only; diffusers' caches skip inside the transformer and report nothing).
- MACs = multiply-accumulates of every ``torch.nn.Linear`` inside ``pipe.transformer`` in the
  run (input.numel() // in_features * in_features * out_features per call, counted by forward
  hooks) / the same sum in the baseline run. A Linear inside a skipped block never runs, so its
  hook never fires; attention's matmuls and convolutions are not counted.
- PSNR = diffcache.eval.metrics.psnr(baseline media, config media) on the decoded output in
  [0, 1]; "inf" means bit-identical.
- of ideal (ours) = speedup / ideal speedup, where the ideal speedup of a compute fraction c with
  denoiser share s (denoiser time / baseline latency; the text encoder, VAE and scheduler are not
  cached) is 1 / ((1 - s) + s * c): 1.0 means the reuse itself costs nothing; target >= 0.95.
- of MAC ideal (every configuration) = the same with the MACs fraction for c: one measure for
  step, block and module methods and for diffusers' caches (a block method's calls ideal leaves
  out the denoiser's work outside the blocks, which always runs).
- identity / baseline = identity median / baseline median; target within 1%.
- profile (``--profile-models``, default wan2.1-tiny and dit-tiny): ``diffcache.profile`` tunes
  EasyCache's threshold (the bundled plan's warm-up kept) to ``--target-compute`` on 8 bundled
  calibration prompts (class ids 0-7 for DiT), then the plan runs on 4 held-out prompts (class ids
  100-103) and the compute fraction it reaches there is printed.

Targets are printed as measured facts ("met" / "not met"), never asserted.

Threads: 1 for the tiny models (their many small ops gain nothing from a second thread and stall
badly when another process holds a core), torch's default for the real-size model; --threads
sets both.

Models: the tiny built-ins use their default request (20 steps, CFG on) and their bundled plan
``<model>.yaml``. ``wan2.1-1.3b-random`` (the real Wan2.1-1.3B transformer, random weights) runs
``--steps`` (default 10) with ``--guidance`` (default 1.0, CFG off) to stay affordable on a few
CPU cores, with EasyCache warm-up = 20% of the steps (the reference's 10 of 50) and one line per
``--threshold``. The defaults add tau=0.3 beside the paper's 0.05: on these random weights (10
steps, warm-up 2) 0.05, 0.1 and 0.2 reuse no step, 0.3 reuses half of them (an exploratory run).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from arg_types import fraction, listed, names, non_negative, non_negative_float, positive

import diffcache
from diffcache.eval.macs import count_macs
from diffcache.eval.metrics import psnr
from diffcache.eval.timing import ideal_speedup, rotated, sync, time_inside, timed
from diffcache.generate import Request, generate
from diffcache.models import builtin_models, cast, load_model
from diffcache.plan import Plan
from diffcache.profiles import calibration_prompts
from diffcache.registry import find_adapter

BIG = "wan2.1-1.3b-random"
TINY = (
    "wan2.1-tiny",
    "hunyuanvideo-tiny",
    "flux-tiny",
    "qwenimage-tiny",
    "dit-tiny",
    "cogvideox-tiny",
)
PROMPT = "a cat surfing a wave at sunset"
# diffusers' default TaylorSeer patterns (hooks.taylorseer_cache) end in "attn", so under
# re.fullmatch they miss the numbered attn1 / attn2 of Wan and CogVideoX blocks; allow a number.
TAYLOR_PATTERNS = [
    rf"^{blocks}.*attn\d*"
    for blocks in (
        "blocks",
        "transformer_blocks",
        "single_transformer_blocks",
        "temporal_transformer_blocks",
    )
]
OVERHEAD_TARGET = 0.95
IDENTITY_TOLERANCE = 0.01


@dataclasses.dataclass
class Config:
    """One configuration: how to set it up and tear it down on a pipeline."""

    name: str
    setup: Callable[[Any], None]
    teardown: Callable[[Any], None]
    ours: bool = False  # diffcache-accelerated: stats() is available
    fallible: bool = False  # a diffusers baseline: failures are reported, not raised
    unavailable: str | None = None  # reason it cannot run on this model


@dataclasses.dataclass
class Result:
    """What one configuration measured."""

    times: list[float] = dataclasses.field(default_factory=list)
    media: np.ndarray | None = None
    macs: int = 0
    calls: float | None = None
    deterministic: bool = True
    error: str | None = None
    share: float = 0.0  # probe run: time inside pipe.transformer / run time

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def _one(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".splitlines()[0]
    return text if len(text) <= 90 else text[:87] + "..."


def ours(plan: Plan, name: str) -> Config:
    """A diffcache configuration."""
    return Config(name, lambda p: diffcache.accelerate(p, plan), diffcache.remove, ours=True)


#: calibration inputs of the profiled methods (not the bench request's)
CALIBRATION = {"class": ["5", "6"], "text": ["a quiet harbour at dawn", "a dog running on grass"]}


def ertacache(pipe: Any, request: Request, compute: float) -> Config:
    """ERTACache profiled here to ``compute`` on two calibration prompts (other than the bench
    request's), with the timestep adjustment where the scheduler is flow-matching Euler."""
    from diffcache.methods.ertacache import EULER, ERTACacheConfig

    euler = type(pipe.scheduler).__name__ == EULER
    prompts = CALIBRATION["class" if request.get("class_label") is not None else "text"]
    config = ERTACacheConfig(time_adjust=euler)
    plan = diffcache.profile(pipe, config, prompts, target_compute=compute, request=request)
    adjust = ", dt adjusted" if euler else ""
    return ours(plan, f"ERTACache c<={compute:g} (lambda={plan.options['threshold']:g}{adjust})")


def hyca(pipe: Any, request: Request, compute: float) -> Config:
    """HyCa profiled here to ``compute`` (of the block calls) on two calibration prompts."""
    from diffcache.methods.hyca import HyCaConfig

    prompts = CALIBRATION["class" if request.get("class_label") is not None else "text"]
    plan = diffcache.profile(pipe, HyCaConfig(), prompts, target_compute=compute, request=request)
    solvers = "/".join(plan.calibration["cluster_solvers"])
    return ours(plan, f"HyCa c<={compute:g} (N={plan.options['interval']}, {solvers})")


def invardiff(pipe: Any, request: Request, compute: float) -> Config:
    """InvarDiff profiled here to ``compute`` (of the module calls) on two calibration prompts."""
    from diffcache.methods.invardiff import InvarDiffConfig

    prompts = CALIBRATION["class" if request.get("class_label") is not None else "text"]
    config = InvarDiffConfig()
    plan = diffcache.profile(pipe, config, prompts, target_compute=compute, request=request)
    return ours(plan, f"InvarDiff c<={compute:g} (q={plan.options['step_quantile']:g})")


def diffusers_cache(pipe: Any, name: str, make: Callable[[], Any]) -> Config:
    """A diffusers ``enable_cache`` configuration (or an unavailable one, with the reason)."""
    transformer = pipe.transformer
    reason = None
    if not hasattr(transformer, "enable_cache"):
        reason = f"{type(transformer).__name__} has no enable_cache (not a diffusers CacheMixin)"

    def teardown(p: Any) -> None:
        if getattr(p.transformer, "is_cache_enabled", False):
            p.transformer.disable_cache()

    return Config(
        name,
        lambda p: p.transformer.enable_cache(make()),
        teardown,
        fallible=True,
        unavailable=reason,
    )


def build_configs(name: str, pipe: Any, args: argparse.Namespace, steps: int) -> list[Config]:
    """The configurations measured on model ``name``."""
    family = find_adapter(pipe).name
    if name == BIG:
        warmup = max(2, round(0.2 * steps))
        base = {
            "diffcache": 1,
            "model": family,
            "method": "easycache",
            "options": {"warmup_steps": warmup},
            "valid_for": {"num_inference_steps": steps},
        }
        thresholds = args.thresholds
    else:
        base = Plan.load(f"{name}.yaml").to_dict()
        warmup = int(base["options"]["warmup_steps"])
        thresholds = [float(base["options"]["threshold"])]

    def plan(threshold: float) -> Plan:
        return Plan.load({**base, "options": {**base["options"], "threshold": threshold}})

    dtype = next(pipe.transformer.parameters()).dtype
    configs = [
        Config("baseline", lambda p: None, lambda p: None),
        ours(plan(0.0), "identity (EasyCache tau=0)"),
    ]
    configs += [ours(plan(t), f"EasyCache tau={t:g}") for t in thresholds]
    from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig

    configs += [
        diffusers_cache(
            pipe,
            f"FirstBlockCache tau={t:g}",
            lambda t=t: FirstBlockCacheConfig(threshold=t),
        )
        for t in args.fbc_thresholds
    ]
    hooked = sum(
        any(re.fullmatch(pat, n) for pat in TAYLOR_PATTERNS)
        for n, _ in pipe.transformer.named_modules()
    )
    taylor = diffusers_cache(
        pipe,
        f"TaylorSeer N={args.taylor_interval} warm={warmup} ({hooked} attn)",
        lambda: TaylorSeerCacheConfig(
            cache_interval=args.taylor_interval,
            disable_cache_before_step=warmup,
            max_order=1,
            taylor_factors_dtype=dtype,
            cache_identifiers=TAYLOR_PATTERNS,
        ),
    )
    if taylor.unavailable is None and not hooked:
        taylor.unavailable = "no attention module matches the TaylorSeer patterns"
    configs.append(taylor)
    return configs


def run_once(
    pipe: Any, config: Config, request: Request, device: torch.device, result: Result, probe: bool
) -> None:
    """Set up, run one generation (timed, or with MAC counting when ``probe``), tear down."""
    config.setup(pipe)
    try:
        if probe:
            sync(device)
            t0 = time.perf_counter()
            with (
                count_macs(pipe.transformer) as macs,
                time_inside([pipe.transformer], device) as inside,
            ):
                result.media = generate(pipe, request)
            sync(device)
            result.share = inside[0] / (time.perf_counter() - t0)
            result.macs = macs[0]
        else:
            media, seconds = timed(lambda: generate(pipe, request), device)
            result.times.append(seconds)
            result.deterministic &= bool(np.array_equal(media, result.media))
        if config.ours:
            calls = diffcache.stats(pipe).compute_fraction
            if probe:
                result.calls = calls
            else:
                result.deterministic &= calls == result.calls
    finally:
        config.teardown(pipe)


def request_for(name: str, pipe: Any, args: argparse.Namespace) -> Request:
    """The one request every run of model ``name`` uses."""
    takes_prompt = find_adapter(pipe).field("prompt") is not None
    req = Request(prompt=PROMPT if takes_prompt else None, seed=args.seed)
    if name == BIG:
        req = req.replace(steps=args.steps, guidance=args.guidance, **args.size)
    return req.merged(dict(builtin_models()[name].defaults))


def fmt(value: float | None, spec: str) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    return format(value, spec)


def bench_model(name: str, args: argparse.Namespace, device: torch.device) -> None:
    """Build ``name``, measure every configuration, print one table."""
    t0 = time.perf_counter()
    pipe = load_model(name)
    pipe.to(device)
    if name == BIG and args.dtype != "float32":
        cast(pipe, getattr(torch, args.dtype))
    build_s = time.perf_counter() - t0
    request = request_for(name, pipe, args)
    steps = request.get("steps")
    configs = build_configs(name, pipe, args, steps)
    configs[2:2] = [
        *(ertacache(pipe, request, c) for c in args.erta_computes),
        *(hyca(pipe, request, c) for c in args.hyca_computes),
        *(invardiff(pipe, request, c) for c in args.invardiff_computes),
    ]
    size = "x".join(str(request.get(k)) for k in ("height", "width") if request.get(k))
    frames = f"x{request.get('frames')}f" if request.get("frames") else ""
    print(
        f"\n== {name} ({find_adapter(pipe).name}, {type(pipe.transformer).__name__}) | "
        f"{size or 'default size'}{frames}, {steps} steps, guidance {request.get('guidance')}, "
        f"seed {request.seed} | {torch.get_num_threads()} threads | built in {build_s:.1f} s",
        flush=True,
    )

    results = {c.name: Result() for c in configs}
    active: list[Config] = []
    for c in configs:  # probe runs: MACs, outputs, compute fraction; the baseline's is the warm-up
        res = results[c.name]
        if c.unavailable:
            res.error = c.unavailable
            continue
        if not c.fallible:
            run_once(pipe, c, request, device, res, probe=True)
        else:
            try:
                run_once(pipe, c, request, device, res, probe=True)
            except Exception as e:  # diffusers' caches only: unsupported blocks and the like
                res.error = _one(e)
                continue
        active.append(c)

    share = results["baseline"].share
    for r in range(args.repeats):
        for c in rotated(active, r):  # no config always runs in one slot
            run_once(pipe, c, request, device, results[c.name], probe=False)
        print(
            f"  repeat {r + 1}/{args.repeats} (s, in table order): "
            + " ".join(f"{results[c.name].times[-1]:.2f}" for c in active),
            flush=True,
        )

    print_table(configs, results, share)
    if name in args.profile_models:
        profile_section(name, pipe, request, args)
    del pipe
    gc.collect()


def print_table(configs: list[Config], results: dict[str, Result], share: float) -> None:
    """One compact table and the target lines; ``share`` = denoiser time / baseline latency."""
    base = results["baseline"]
    width = max(len(c.name) for c in configs)
    print(
        f"  {'config':<{width}}  {'median s':>9}  {'spread':>6}  {'speedup':>7}  {'calls':>5}  "
        f"{'MACs':>5}  {'PSNR dB':>7}  {'of ideal':>8}  {'of MAC ideal':>12}"
    )
    notes: list[str] = []
    for c in configs:
        res = results[c.name]
        if res.error is not None:
            print(f"  {c.name:<{width}}  n/a: {res.error}")
            continue
        med = res.median
        spread = (max(res.times) - min(res.times)) / med
        speedup = base.median / med
        macs = res.macs / base.macs if base.macs else None
        quality = "ref" if c.name == "baseline" else fmt(psnr(base.media, res.media), ".2f")
        ideal = ideal_speedup(res.calls, share)
        overhead = speedup / ideal if ideal is not None else None
        mac_ideal = ideal_speedup(macs, share)
        of_mac = speedup / mac_ideal if mac_ideal is not None else None
        print(
            f"  {c.name:<{width}}  {med:9.3f}  {spread:6.1%}  {speedup:7.3f}  "
            f"{fmt(res.calls, '.3f'):>5}  {fmt(macs, '.3f'):>5}  {quality:>7}  "
            f"{fmt(overhead, '.3f'):>8}  {fmt(of_mac, '.3f'):>12}"
        )
        if c.ours and c.name.startswith("EasyCache") and res.calls == 1.0:
            notes.append(
                f"{c.name} reused no step on this model (compute fraction 1.0); "
                "pass --threshold with larger values to see reuse"
            )
        if not res.deterministic:
            notes.append(
                f"{c.name}: a timed run differs from its probe run in output or compute "
                "fraction (nondeterministic)"
            )
        if c.ours and not c.name.startswith("identity"):
            met = "met" if overhead >= OVERHEAD_TARGET else "not met"
            notes.append(
                f"{c.name}: speedup {speedup:.3f} of ideal {ideal:.3f} = {overhead:.3f} "
                f"(target >= {OVERHEAD_TARGET}): {met}"
            )
        elif c.ours:
            ratio = med / base.median
            met = "met" if abs(ratio - 1.0) <= IDENTITY_TOLERANCE else "not met"
            notes.append(
                f"identity / baseline latency {ratio:.3f} "
                f"(target within {IDENTITY_TOLERANCE:.0%}): {met}"
            )
    notes.append(
        f"denoiser share of the baseline latency: {share:.3f} (baseline probe run; the "
        "rest, text encoder, VAE and scheduler, is not cached)"
    )
    for n in notes:
        print(f"  - {n}")
    print(
        "  spread = (max - min) / median of the timed runs; calls = diffcache compute_fraction; "
        "MACs = nn.Linear MACs in the transformer / baseline's; of MAC ideal = speedup / "
        "(1 / ((1 - share) + share x MACs)), the same measure for every configuration (block and "
        "module methods: the work outside the blocks counts, which the calls ideal leaves out)",
        flush=True,
    )


def profile_section(name: str, pipe: Any, request: Request, args: argparse.Namespace) -> None:
    """Tune EasyCache to the compute target on calibration prompts; measure held-out prompts."""
    from diffcache.eval.runner import DEFAULT_PROMPTS
    from diffcache.methods.easycache import EasyCacheConfig

    bundled = Plan.load(f"{name}.yaml").config
    start = EasyCacheConfig(warmup_steps=bundled.warmup_steps)
    if find_adapter(pipe).field("prompt") is not None:
        calibration = calibration_prompts()[:8]
        held_out = [request.replace(prompt=p) for p in DEFAULT_PROMPTS]
    else:
        calibration = [str(i) for i in range(8)]
        held_out = [request.replace(class_label=c) for c in range(100, 104)]
    t0 = time.perf_counter()
    plan = diffcache.profile(
        pipe, start, calibration, target_compute=args.target_compute, request=request
    )
    took = time.perf_counter() - t0
    measured = plan.provenance["measured"]
    fractions = []
    for req in held_out:
        diffcache.accelerate(pipe, plan)
        try:
            generate(pipe, req)
            fractions.append(diffcache.stats(pipe).compute_fraction)
        finally:
            diffcache.remove(pipe)
    mean = sum(fractions) / len(fractions)
    print(
        f"  profile --target-compute {args.target_compute}: threshold "
        f"{plan.config.threshold:g} (warm-up {start.warmup_steps}) after "
        f"{len(measured['search'])} calibration passes in {took:.1f} s; compute fraction "
        f"{measured['compute_fraction']:.3f} on 8 calibration inputs, {mean:.3f} on 4 held-out "
        f"({', '.join(f'{f:.2f}' for f in fractions)})",
        flush=True,
    )


def _size(p: argparse.ArgumentParser, text: str | None) -> dict[str, int]:
    """``HxWxF`` as request fields (empty: the model's defaults)."""
    if text is None:
        return {}
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(x.isdigit() and int(x) > 0 for x in parts):
        p.error(f"--size must be HEIGHTxWIDTHxFRAMES with positive integers, got {text!r}")
    return dict(zip(("height", "width", "frames"), map(int, parts), strict=True))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--models",
        default=None,
        help=f"comma-separated built-in models (default: {', '.join(TINY + (BIG,))})",
    )
    p.add_argument(
        "--repeats", type=positive, default=None, help="timed runs per config (default 3)"
    )
    p.add_argument("--steps", type=positive, default=10, help=f"{BIG} only (default 10)")
    p.add_argument(
        "--guidance",
        type=non_negative_float,
        default=1.0,
        help=f"{BIG} only (default 1.0: CFG off, one forward per step)",
    )
    p.add_argument(
        "--threshold",
        dest="thresholds",
        type=listed(non_negative_float),
        default="0.05,0.3",
        help=f"{BIG} only: comma-separated EasyCache thresholds, one line each "
        "(default 0.05,0.3: the paper's value and one that reuses on random weights); "
        "tiny models use their bundled plan",
    )
    p.add_argument(
        "--fbc-threshold",
        dest="fbc_thresholds",
        type=listed(non_negative_float),
        default="0.05,0.35",
        help="comma-separated diffusers FirstBlockCache thresholds, one line each (default "
        f"0.05,0.35: diffusers' default, and one that skips about half the tail on {BIG})",
    )
    p.add_argument(
        "--taylor-interval",
        type=positive,
        default=2,
        help="diffusers TaylorSeer cache_interval (default 2); its warm-up is EasyCache's",
    )
    p.add_argument(
        "--erta-compute",
        dest="erta_computes",
        type=listed(fraction),
        default="0.5",
        help="comma-separated compute targets for ERTACache, profiled in the run (one line each; "
        "'' for none)",
    )
    p.add_argument(
        "--hyca-compute",
        dest="hyca_computes",
        type=listed(fraction),
        default="0.5",
        help="comma-separated block-compute targets for HyCa, profiled in the run ('' for none)",
    )
    p.add_argument(
        "--invardiff-compute",
        dest="invardiff_computes",
        type=listed(fraction),
        default="0.5",
        help="comma-separated module-compute targets for InvarDiff, profiled in the run ('' for "
        "none)",
    )
    p.add_argument(
        "--size",
        default=None,
        help=f"{BIG} only: HEIGHTxWIDTHxFRAMES, e.g. 480x832x17 on a GPU (default: the model's "
        "64x64x5, which a CPU can afford)",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float16", "bfloat16"],
        help=f"{BIG} only: the pipeline's dtype (default float32; bfloat16 on a GPU)",
    )
    p.add_argument("--seed", type=non_negative, default=0)
    p.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument(
        "--threads",
        type=positive,
        default=None,
        help="torch.set_num_threads for every model (default: 1 for the tiny models, whose many "
        "small ops only pay thread synchronisation and stall when another process holds a core; "
        "torch's own choice for the real-size model)",
    )
    p.add_argument("--quick", action="store_true", help="tiny models only, 2 repeats (smoke run)")
    p.add_argument(
        "--profile-models",
        type=names,
        default=None,
        help="models on which to run the profile section (comma-separated, among --models; "
        "'' for none; default: wan2.1-tiny and dit-tiny where run)",
    )
    p.add_argument("--target-compute", type=fraction, default=0.5, help="profile section target")
    args = p.parse_args(argv)
    args.size = _size(p, args.size)
    if args.models is None:
        args.models = ",".join(TINY if args.quick else TINY + (BIG,))
    args.models = names(args.models)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 3
    unknown = [m for m in args.models if m not in builtin_models()]
    if unknown:
        p.error(f"unknown models {unknown}; built-in: {', '.join(builtin_models())}")
    if args.profile_models is None:
        args.profile_models = [m for m in ("wan2.1-tiny", "dit-tiny") if m in args.models]
    outside = [m for m in args.profile_models if m not in args.models]
    if outside:
        p.error(f"--profile-models {outside} are not among --models {args.models}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    default_threads = torch.get_num_threads()
    import diffusers

    cpu = platform.processor() or platform.machine()
    print(
        f"machine: {os.cpu_count()} CPUs ({cpu}), torch {torch.__version__} "
        f"(default {default_threads} threads), diffusers {diffusers.__version__}, "
        f"diffcache {getattr(diffcache, '__version__', '?')}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    )
    print(
        f"settings: models {','.join(args.models)}; repeats {args.repeats} (median); "
        f"{BIG}: steps {args.steps}, guidance {args.guidance}, {args.dtype}, EasyCache tau "
        f"{','.join(f'{t:g}' for t in args.thresholds)}, warm-up 20% of steps; tiny models: "
        f"their defaults and bundled plans; FirstBlockCache tau "
        f"{','.join(f'{t:g}' for t in args.fbc_thresholds)}; "
        f"TaylorSeer cache_interval {args.taylor_interval}, max_order 1, warm-up = EasyCache's"
    )
    for name in args.models:
        torch.set_num_threads(args.threads or (default_threads if name == BIG else 1))
        bench_model(name, args, device)


if __name__ == "__main__":
    main()
