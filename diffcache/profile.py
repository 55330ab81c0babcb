"""Profiling: observe-only probes -> Trace -> the method's ``calibrate`` -> Plan.

``profile`` runs the unmodified pipeline on calibration prompts with probes on the sites the
method asks for (outputs stay bit-identical), collects a :class:`Trace` per (request, step,
branch, site), and hands the method a :class:`Profiling`: the trace, the compute target, and
``measure`` / ``tune`` for calibration runs with the method attached. The plan it returns carries
the method's options and calibration, ``valid_for`` (steps, scheduler and, for calibrated
methods, the model fingerprint) and provenance (toolkit version, model, prompts hash, what was
measured). Nothing in a plan depends on the clock unless ``target_speedup`` is asked for.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from diffcache import distributed
from diffcache.adapter import Target
from diffcache.errors import (
    AlreadyAcceleratedError,
    DiffCacheError,
    PlanError,
    TargetUnreachable,
    UnsupportedModelError,
)
from diffcache.eval.timing import (
    REPEATS,
    check_count,
    paired_speedups,
    rotated,
    summary,
    timed,
)
from diffcache.methods.base import Calibrated, MethodConfig, Observer
from diffcache.models import builtin_of
from diffcache.output import sample_of
from diffcache.plan import Plan, model_plan
from diffcache.registry import find_adapter, get_method
from diffcache.request import CALIBRATION_INPUT, Request, check, expand
from diffcache.runstate import RunState
from diffcache.session import Call, Session


@dataclasses.dataclass(frozen=True)
class Record:
    """What the probe saw at one site call."""

    request: int  # index of the calibration request
    step: int
    substep: int
    branch: int
    expert: int
    kind: str
    site: str
    values: dict[str, Any]


class Trace:
    """Every probe record of a profiling run, in call order, and ``observed``: the sums a
    method's own observer (``MethodConfig.observer``) accumulated, added up over processes."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.observed: dict[str, torch.Tensor] = {}
        self.facts: dict[str, Any] = {}  # what the run reported of itself (gen_length ...)

    def select(self, kind: str | None = None, site: str | None = None) -> list[Record]:
        return [
            r
            for r in self.records
            if (kind is None or r.kind == kind) and (site is None or r.site == site)
        ]

    def __len__(self) -> int:
        return len(self.records)


def probe(site_kind: str, x: torch.Tensor | None, output: Any, memory: dict) -> dict[str, Any]:
    """Generic statistics of one site call, relative to the same site's previous call.

    ``in_abs`` / ``out_abs``: mean|x|, mean|v|; ``in_change`` / ``out_change``: mean absolute
    change from the previous call (None on the first); for blocks and modules also
    ``out_channel_mean``: the output's mean over every axis but the last (one value per hidden
    dimension). ``memory`` holds this site's previous tensors (private copies).
    """
    v = sample_of(output).detach().float()
    values: dict[str, Any] = {"out_abs": v.abs().mean().item(), "out_change": None}
    prev_v = memory.get("v")
    if prev_v is not None and prev_v.shape == v.shape:
        values["out_change"] = (v - prev_v).abs().mean().item()
    memory["v"] = v.clone()
    if x is not None:
        x = x.detach().float()
        values["in_abs"], values["in_change"] = x.abs().mean().item(), None
        prev_x = memory.get("x")
        if prev_x is not None and prev_x.shape == x.shape:
            values["in_change"] = (x - prev_x).abs().mean().item()
        memory["x"] = x.clone()
    if site_kind != "step":
        values["out_channel_mean"] = v.reshape(-1, v.shape[-1]).mean(0)
    return values


class Profiling:
    """What a method's ``calibrate`` works with: the trace, the target and calibration runs."""

    def __init__(
        self,
        pipe: Any,
        target: Target,
        requests: Sequence[Request],
        trace: Trace,
        valid_for: dict[str, Any],
        target_compute: float | None,
        progress: bool = False,
    ) -> None:
        self.pipe, self.target, self.requests, self.trace = pipe, target, requests, trace
        self.valid_for, self.target_compute, self.progress = valid_for, target_compute, progress
        self.runs = 0

    def record(self, observer: Observer) -> dict[str, torch.Tensor]:
        """Run every calibration request plain with ``observer`` attached (no other probes); its
        results, added up over processes. For methods whose recording depends on the settings
        ``calibrate`` picks (HyCa's interval)."""
        trace = record_trace(self.pipe, self.target, None, self.requests, self.progress, observer)
        return trace[0].observed

    def measure(self, config: MethodConfig, calibration: Any = None) -> dict[str, Any]:
        """Run every calibration request with ``config`` attached; the mean compute fraction."""
        from diffcache.api import accelerate, remove, stats
        from diffcache.generate import generate

        plan = make_plan(self.target, config, calibration, self.valid_for)
        mine = []
        for i, req in distributed.shard(list(enumerate(self.requests))):
            accelerate(self.pipe, plan)
            try:
                generate(self.pipe, req)
                mine.append((i, stats(self.pipe).compute_fraction))
            finally:
                remove(self.pipe)
        fractions = [f for _, f in sorted(x for part in distributed.gather(mine) for x in part)]
        self.runs += 1
        return {"compute_fraction": round(sum(fractions) / len(fractions), 6)}

    def tune(
        self,
        make: Callable[[float], MethodConfig],
        lo: float,
        hi: float,
        knob: str,
        iterations: int = 14,
        rising: bool = False,
    ) -> tuple[MethodConfig, dict[str, Any]]:
        """The ``knob`` in [lo, hi] (both > 0) closest to full computation whose calibration
        runs compute at most ``target_compute``: the smallest one when the compute fraction does
        not rise with the knob (a threshold on change), the largest when it does not fall
        (``rising``: a confidence threshold, a refresh probability). Bisection on a log scale."""
        goal = self.target_compute
        assert goal is not None, "tune() needs a compute target"
        search: list[list[float]] = []
        measured: dict[str, dict[str, Any]] = {}  # by config: a whole-number knob repeats

        def run(value: float) -> dict[str, Any]:
            config = make(value)
            key = repr(config)
            if key not in measured:
                measured[key] = self.measure(config)
                search.append([value, measured[key]["compute_fraction"]])
            return measured[key]

        cheap, dear = (lo, hi) if rising else (hi, lo)  # least and most compute
        best = run(cheap)
        if best["compute_fraction"] > goal:
            config = make(cheap)
            fixed = ", ".join(
                f"{f.name}={getattr(config, f.name)}"
                for f in dataclasses.fields(config)
                if f.name != knob
            )
            raise TargetUnreachable(
                f"{knob}: even at {knob}={getattr(config, knob, cheap):g} the calibration runs "
                f"compute {best['compute_fraction']:.3f} of the work, above the target "
                f"{goal:.3f}; ask for less, or change the options the search keeps fixed "
                f"({fixed}) with --option KEY=VALUE.",
                best["compute_fraction"],
            )
        low = run(dear)
        if low["compute_fraction"] <= goal:
            return make(dear), {**low, "search": search}
        for _ in range(iterations):
            mid = math.sqrt(cheap * dear)
            m = run(mid)
            if m["compute_fraction"] <= goal:
                cheap, best = mid, m
            else:
                dear = mid
        rounded = round_to(cheap, down=rising)  # a readable knob, kept if it measures the same
        if rounded != cheap and run(rounded)["compute_fraction"] == best["compute_fraction"]:
            cheap = rounded
        return make(cheap), {**best, "search": [[float(f"{k:.6g}"), c] for k, c in search]}


def profile(
    pipe: Any,
    method: str | MethodConfig | Plan,
    prompts: Sequence[str] = (),
    seeds: int | Sequence[int] = 1,
    out: str | Path | None = None,
    *,
    target_compute: float | None = None,
    target_speedup: float | None = None,
    request: Request | None = None,
    progress: bool = False,
    repeats: int = REPEATS,
) -> Plan:
    """Profile ``pipe`` on ``prompts`` x ``seeds`` and return (and with ``out`` write) a plan.

    Args:
        pipe: a pipeline of a supported family, not accelerated.
        method: a method name, a MethodConfig, or a plan to start from (a Plan, or a ``.yaml``
            path or bundled name, templates included, e.g. the published
            ``"wan21-ertacache.yaml"``): its options, and its step count when ``request`` has none.
            A name on a built-in model (``load_model``) starts from the model's bundled plan
            of the method, as ``diffcache profile`` does; else from the method's defaults.
        prompts: calibration prompts (class ids as text for class-conditional models).
        seeds: how many seeds per prompt (from ``request.seed`` on), or the seeds themselves.
        out: where to write the plan (and its sidecar).
        target_compute: the compute fraction the plan must not exceed on these prompts.
        target_speedup: a speedup to reach; turned into a compute target with the denoiser's
            measured share of the generation time.
        request: the other request fields (size, steps, guidance ...); a built-in model's
            defaults fill the ones it leaves out.
        repeats: timed rounds of the speedup measured for ``target_speedup`` (its median,
            lowest and highest go in the provenance, with the torch threads it ran on).
    """
    request, start, entry = request or Request(), None, builtin_of(pipe)
    if isinstance(method, Plan) or str(method).endswith((".yaml", ".yml")):
        start = Plan.load(method, template=True)
    elif isinstance(method, str) and entry is not None:
        start = model_plan(entry.name, method)
    if start is not None:
        steps = start.valid_for.get("num_inference_steps")
        if steps is not None and request.get("steps") is None:
            request = request.replace(steps=steps)
        method = start.config
    if entry is not None:
        request = request.merged(entry.defaults)
    config = method if isinstance(method, MethodConfig) else get_method(method)[0]()
    if target_compute is not None and target_speedup is not None:
        raise DiffCacheError("give target_compute or target_speedup, not both")
    if target_compute is not None and not 0 < target_compute <= 1:
        raise DiffCacheError(f"target_compute must be in (0, 1], got {target_compute}")
    if target_speedup is not None and not target_speedup >= 1:
        raise DiffCacheError(f"target_speedup must be >= 1, got {target_speedup}")
    check_count(repeats, "repeats")
    out = _check_inputs(prompts, seeds, out)
    from diffcache.api import session_of

    if session_of(pipe) is not None:
        raise AlreadyAcceleratedError(
            f"{type(pipe).__name__} is accelerated; call diffcache.remove() before profiling."
        )
    adapter = find_adapter(pipe)
    if start is not None:
        start.check_family(adapter.name, type(pipe).__name__)
    target = Target.resolve(adapter, pipe)
    if target.driver == "timestep":
        raise UnsupportedModelError(
            f"profiling runs whole generations: pass the pipeline, not its {type(pipe).__name__}"
        )
    steps = request.get("steps")
    problems = config.plan_problems({"num_inference_steps": steps}) if steps else []
    if problems:  # before any calibration run
        raise PlanError(f"{config.name} options at {steps} steps: {'; '.join(problems)}")
    reasons = config.support_problems(target)
    if reasons:  # before any calibration run
        raise UnsupportedModelError(
            f"method {config.name!r} cannot run on {type(pipe).__name__}:\n  - "
            + "\n  - ".join(reasons)
        )
    requests = expand(adapter, prompts, seeds, request)
    for req in requests:  # every request is checked before any work
        check(adapter, req, pipe, CALIBRATION_INPUT)
    trace, steps, share = record_trace(pipe, target, config, requests, progress)
    if target_speedup is not None:
        target_compute = compute_for_speedup(target_speedup, share)
    valid_for: dict[str, Any] = {"num_inference_steps": steps, **trace.facts}
    if target.scheduler is not None:
        valid_for["scheduler"] = type(target.scheduler).__name__
    profiling = Profiling(pipe, target, requests, trace, valid_for, target_compute, progress)
    targets = {"target_compute": target_compute, "target_speedup": target_speedup}
    try:
        calibrated = config.calibrate(profiling)
    except TargetUnreachable as e:
        if target_speedup is None:  # a compute target is a bound: refused
            raise
        # a speed is a goal: the best plan the method can make for it, the fastest one
        targets["least_compute"] = e.least
        profiling.target_compute = e.least * (1 + 1e-9)
        calibrated = config.calibrate(profiling)
    plan = make_plan(target, calibrated.config, calibrated.calibration, valid_for)
    if target_speedup is not None:  # the compute target assumed ideal scaling: check the clock
        targets["denoiser_share"] = round(share, 3)
        median, low, high = measure_speedup(pipe, plan, requests, repeats)
        targets["speedup_measured"] = round(median, 3)
        targets["speedup_spread"] = [round(low, 3), round(high, 3)]
        targets["speedup_repeats"] = repeats
        targets["threads"] = torch.get_num_threads()
    plan = _with_provenance(
        plan,
        target,
        calibrated,
        prompts,
        requests,
        targets,
    )
    if out is not None and distributed.is_main():
        plan = Plan.load(plan.save(out))
    return plan


def record_trace(
    pipe: Any,
    target: Target,
    config: MethodConfig | None,
    requests: Sequence[Request],
    progress: bool,
    observer: Observer | None = None,
) -> tuple[Trace, int, float]:
    """Run each request with observe-only probes (split across processes under accelerate
    launch); returns the trace, the step count and the denoiser's share of the generation time
    (probe time excluded). With ``observer`` only it records (no generic probes); otherwise the
    method's own observer, if any, rides along with the probes."""
    from diffcache.drivers import DRIVERS
    from diffcache.generate import generate

    run = RunState("profile")
    session = Session(target, None, run)
    trace, memory, clock = Trace(), {}, {"denoiser": 0.0, "probe": 0.0}
    index = [0]
    probes = observer is None and config is not None
    if probes:
        observer = config.observer(target)
    seen = observer.kinds if observer is not None else ()
    latent_arg = target.adapter.latent_arg
    latent_pos = target.arg_index(latent_arg)

    def observe(call: Call) -> Any:
        t0 = time.perf_counter()
        out = call.compute()
        t1 = time.perf_counter()
        site = call.site
        if probes and site.kind in config.probe_kinds:
            x = call.arg(latent_arg, latent_pos) if site.kind == "step" else None
            key = (index[0], site.name, site.expert, call.branch)
            values = probe(site.kind, x, out, memory.setdefault(key, {}))
            record = (run.step, run.substep, call.branch, site.expert, site.kind, site.name)
            trace.records.append(Record(index[0], *record, values))
        if site.kind in seen:
            observer.see(call, out)
        if site.kind == "step":
            clock["denoiser"] += t1 - t0
        clock["probe"] += time.perf_counter() - t1
        return out

    session.on_step(observe)
    for kind in dict.fromkeys([*(config.probe_kinds if probes else ()), *seen]):
        if kind != "step":
            session.on_sites(target.sites(kind), observe, "probe")
    steps, total = 0, 0.0
    mine = distributed.shard(list(enumerate(requests)))
    try:
        session.install(DRIVERS[target.driver]())
        for i, req in _progress(mine, progress and distributed.is_main(), "profiling"):
            index[0] = i
            memory.clear()
            t0 = time.perf_counter()
            generate(pipe, req)
            total += time.perf_counter() - t0
            steps = run.num_steps or run.stats.steps
            trace.facts = dict(run.facts)
            if observer is not None:
                observer.end_request()
    finally:
        session.close()
    observed = observer.result() if observer is not None else {}
    parts = distributed.gather((trace.records, steps, clock, total, observed))
    trace.records = sorted((r for part in parts for r in part[0]), key=lambda r: r.request)
    trace.observed = {k: sum(part[4][k] for part in parts) for k in observed}
    steps = max(part[1] for part in parts)
    denoiser = sum(part[2]["denoiser"] for part in parts)
    wall = sum(part[3] - part[2]["probe"] for part in parts)
    return trace, steps, min(denoiser / max(wall, 1e-9), 1.0)


def _check_inputs(
    prompts: Sequence[str], seeds: int | Sequence[int], out: str | Path | None
) -> Path | None:
    """Refuse prompts given as one string or none, bad seeds and an unwritable ``out``
    (before any calibration run); ``out`` as a Path."""
    from diffcache.generate import check_writable

    if isinstance(prompts, str):
        raise DiffCacheError(
            f"prompts must be a list of prompts, got the string {prompts[:40]!r}; "
            "wrap one prompt in a list"
        )
    if not prompts:
        raise PlanError("profiling needs at least one calibration prompt; got none")

    def whole(s: Any) -> bool:
        return isinstance(s, int) and not isinstance(s, bool)

    if whole(seeds) and seeds < 1:
        raise DiffCacheError(f"seeds must be >= 1 (seeds per prompt), got {seeds}")
    if not whole(seeds) and (not seeds or not all(map(whole, seeds))):
        raise DiffCacheError(
            f"seeds must be a count >= 1 or a non-empty list of seeds, got {seeds!r}"
        )
    return None if out is None else check_writable(Path(out), "out")


def measure_speedup(
    pipe: Any, plan: Plan, requests: Sequence[Request], repeats: int = REPEATS
) -> tuple[float, float, float]:
    """Wall-clock speedup of ``plan`` over the plain pipeline on ``requests``, measured as
    ``eval`` measures it (``diffcache.eval.timing``): one untimed warm-up generation of each,
    then ``repeats`` rounds in which every request runs plain and accelerated back to back, in
    a rotated order. Returns the median of the paired ratios, and the lowest and highest."""
    import diffcache
    from diffcache.generate import generate

    device = "cuda" if torch.cuda.is_available() else "cpu"

    def seconds(with_plan: bool, req: Request) -> float:
        if with_plan:
            diffcache.accelerate(pipe, plan)
        try:
            return timed(lambda: generate(pipe, req), device)[1]
        finally:
            if with_plan:
                diffcache.remove(pipe)

    for with_plan in (False, True):  # warm-up: first-call costs must not count
        seconds(with_plan, requests[0])
    times: dict[bool, list[float]] = {False: [], True: []}
    for r in range(repeats):
        for i, req in enumerate(requests):
            for with_plan in rotated([False, True], r + i):
                times[with_plan].append(seconds(with_plan, req))
    measured = summary(paired_speedups(times[False], times[True]))
    assert measured is not None  # at least one request and one round
    return measured


def compute_for_speedup(speedup: float, share: float) -> float:
    """The compute fraction of the denoiser that gives ``speedup`` when the denoiser is
    ``share`` of the generation time: 1/speedup = (1 - share) + share * fraction."""
    fraction = (1 / speedup - (1 - share)) / share if share > 0 else -1.0
    if fraction <= 0:
        best = 1 / (1 - share) if share < 1 else math.inf
        raise DiffCacheError(
            f"a {speedup:g}x speedup is out of reach: the denoiser is {share:.0%} of the "
            f"generation time here, so skipping all of it gives at most {best:.2f}x."
        )
    return min(fraction, 1.0)


def make_plan(
    target: Target, config: MethodConfig, calibration: Any, valid_for: dict[str, Any]
) -> Plan:
    """A plan for ``target`` with these options and calibration (fingerprinted if calibrated)."""
    plain, tensors = split_calibration(calibration)
    valid = dict(valid_for)
    if calibration is not None:
        valid["fingerprint"] = target.fingerprint()
    return Plan(
        model=target.adapter.name,
        method=config.name,
        options=config.to_options(),
        valid_for=valid,
        calibration=plain,
        tensors=tensors,
    )


def split_calibration(calibration: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A calibration dataclass as (plain fields, tensors for the sidecar)."""
    if calibration is None:
        return {}, {}
    from diffcache.options import to_plain

    hints = typing.get_type_hints(type(calibration))
    plain, tensors = {}, {}
    for f in dataclasses.fields(calibration):
        value = getattr(calibration, f.name)
        if hints[f.name] is torch.Tensor:
            tensors[f.name] = value.detach().cpu().contiguous()
        else:
            plain[f.name] = to_plain(value)
    return plain, tensors


def _with_provenance(
    plan: Plan,
    target: Target,
    calibrated: Calibrated,
    prompts: Sequence[str],
    requests: Sequence[Request],
    targets: dict[str, Any],
) -> Plan:
    import diffcache

    fields = {k: v for k, v in requests[0].values.items() if k not in ("prompt", "class_label")}
    provenance: dict[str, Any] = {
        "tool": f"diffcache {diffcache.__version__} profile",
        "model_fingerprint": target.fingerprint(),
        "prompts": len(prompts),
        "prompts_sha256": hashlib.sha256("\n".join(map(str, prompts)).encode()).hexdigest(),
        "seeds": sorted({r.seed for r in requests}),
        "request": fields,
        "measured": dict(calibrated.measured),
        **{k: v for k, v in targets.items() if v is not None},
    }
    return dataclasses.replace(plan, provenance=provenance)


def round_to(x: float, digits: int = 3, down: bool = False) -> float:
    """``x`` rounded up (or ``down``) to ``digits`` significant digits."""
    unit = 10 ** (math.floor(math.log10(x)) - digits + 1)
    whole = math.floor(x / unit) if down else math.ceil(x / unit)
    return float(f"{whole * unit:.{digits}g}")


def _progress(items: Sequence[Any], on: bool, desc: str) -> Any:
    if not on:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="run")
