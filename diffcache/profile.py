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
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from diffcache import distributed
from diffcache.adapter import Target
from diffcache.api import accelerate, open_session, remove, session_of, stats
from diffcache.calibration import fingerprint, round_to
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
from diffcache.generate import Request, check, check_writable, expand, generate
from diffcache.kv.memory import Geometry
from diffcache.lora import adapter_state, weights_norm
from diffcache.methods.base import Calibrated, MethodConfig, Observer
from diffcache.models import builtin_of
from diffcache.output import latent_part, sample_of
from diffcache.plan import Plan
from diffcache.profiles import bundled_plans
from diffcache.registry import adapters, find_adapter, get_method, methods
from diffcache.runstate import RunState
from diffcache.session import Call, Session
from diffcache.variants import steps_run
from diffcache.weights import weights
from diffcache.yamlio import read_yaml

#: what the calibration inputs (a prompt file, bundled prompts or class ids) are called in
#: errors: the user passed no --prompt or --class-label
CALIBRATION_INPUT = "calibration input"


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
    """What a method's ``calibrate`` works with (``methods.base.Profiling``): the trace, the
    target and calibration runs."""

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
        plan = config.as_plan(self.target, calibration, self.valid_for)
        mine = []
        for i, req in distributed.shard(list(enumerate(self.requests))):
            accelerate(self.pipe, plan)
            try:
                generate(self.pipe, req)
                s = stats(self.pipe)
                mine.append((i, s.compute_fraction, kv_history_fraction(s)))
            finally:
                remove(self.pipe)
        runs = [x[1:] for x in sorted(x for part in distributed.gather(mine) for x in part)]
        self.runs += 1
        out = {"compute_fraction": round(sum(f for f, _ in runs) / len(runs), 6)}
        if all(kv is not None for _, kv in runs):
            out["kv_history_fraction"] = round(max(kv for _, kv in runs), 6)
        return out

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


@dataclasses.dataclass(frozen=True)
class Names:
    """How errors name a profile's inputs: Python's arguments, or the CLI's flags (``CLI``)."""

    method: str = "method"
    start: str = ""  # the plan to start from
    steps: str = ""  # a step count the caller gave (empty: "N steps")
    options: str = ""  # where the caller sets options (empty: not named)
    target_compute: str = "target_compute"
    target_speedup: str = "target_speedup"
    target_kv: str = "target_kv"

    def of(self, name: str, value: Any) -> str:
        """``value`` labelled with the input ``name`` names (``--from x.yaml``, ``x.yaml``)."""
        return f"{getattr(self, name)} {value}".strip()


CLI = Names(
    "--method",
    "--from",
    "--steps",
    "--option KEY=VALUE",
    "--target-compute",
    "--target-speedup",
    "--target-kv",
)


@dataclasses.dataclass(frozen=True)
class Start:
    """Where a profile starts: the method's options, the plan they came from and the steps."""

    config: MethodConfig
    plan: Plan | None  # the plan the options came from (None: the method's defaults)
    published: bool  # ``plan`` is the family's published settings for real checkpoints
    request_steps: int | None  # the step count the request sets: the caller's, else the plan's


def published_plan(family: str, method: str) -> Plan | None:
    """The bundled published settings of ``method`` for real checkpoints of ``family`` (the
    plan whose provenance names a ``checkpoint``), loaded as a template; None if there is none."""
    for path in bundled_plans().values():
        data = read_yaml(path)
        if (data.get("model"), data.get("method")) == (family, method) and "checkpoint" in (
            data.get("provenance") or {}
        ):
            return Plan.load(path, template=True)
    return None


def model_plan(model: str, method: str) -> Plan | None:
    """A built-in model's bundled plan of ``method`` (its default ``MODEL.yaml`` when it uses
    the method, else ``MODEL-METHOD.yaml``), loaded as a template; None if there is none."""
    for name in (f"{model}.yaml", f"{model}-{method}.yaml"):
        plan = Plan.load(name, template=True) if name in bundled_plans() else None
        if plan is not None and plan.method == method:
            return plan
    return None


def resolve_start(
    method: str | Path | MethodConfig | Plan | None,
    *,
    family: str | None,
    model: str | None = None,
    start: str | Path | Plan | None = None,
    options: Mapping[str, Any] | None = None,
    steps: int | None = None,
    default_steps: int | None = None,
    what: str = "the model",
    names: Names = Names(),
) -> Start:
    """The one rule for where ``diffcache.profile`` and ``diffcache profile`` start.

    The options are those of (the first that applies) the plan ``start`` or ``method`` names
    (a ``.yaml`` path, bundled name or Plan: templates too), the built-in ``model``'s bundled
    plan of the method, the ``family``'s published settings for real checkpoints, else the
    method's defaults; ``options`` go on top. The step count is ``steps``, else the starting
    plan's (for a family that takes a step count), else ``default_steps``. ``family`` None
    means not known yet (a checkpoint folder before it is loaded): the options are checked
    against the step count once a plan or the family is known. ``what`` names the model in
    errors, ``names`` the inputs.
    """
    if isinstance(method, Plan) or str(method).endswith((".yaml", ".yml")):
        if start is not None:
            raise PlanError(f"give a plan to start from once, not {method} and {start}")
        method, start = None, method
    plan = Plan.load(start, template=True) if start is not None else None
    name = method.name if isinstance(method, MethodConfig) else method
    if plan is not None:
        if name not in (None, plan.method):
            raise PlanError(
                f"{names.of('method', name)} but {names.of('start', plan.name)} is a "
                f"{plan.method} plan; give one"
            )
        if family is not None and plan.model != family:
            raise PlanError(
                f"{names.of('start', plan.name)}: a plan for {plan.model} models, and {what} is a "
                f"{family} model; use a plan made for {family} (`diffcache plans list`)"
            )
    published = False
    if plan is None and isinstance(method, str):
        if model is not None:
            plan = model_plan(model, method)
        elif family is not None:
            plan = published_plan(family, method)
            published = plan is not None
    if name is None and plan is None:
        plan_or_template = names.of("start", "a plan or template")
        raise PlanError(f"give {names.method}, or {plan_or_template} to take it from")
    name = name or plan.method
    if isinstance(method, MethodConfig) and not options:
        config = method
    else:
        cls, _ = get_method(name, names.method)
        given = method.to_options() if isinstance(method, MethodConfig) else {}
        merged = {**(plan.options if plan is not None else {}), **given, **(options or {})}
        config = cls.from_options(merged, f"{names.of('method', name)} options")
    request_steps = steps
    adapter = adapters().get(family) if family is not None else None
    takes_steps = adapter is None or adapter.field("steps") is not None
    if request_steps is None and plan is not None and takes_steps:  # not next-scale models
        request_steps = plan.valid_for.get("num_inference_steps")
    checked = request_steps if request_steps is not None else default_steps
    problems = config.plan_problems({"num_inference_steps": checked}) if checked else []
    if problems and (plan is not None or family is not None):
        origin = (
            names.of("method", name)
            if method is not None
            else (f"{names.of('start', plan.name)} ({name})")
        )
        at = f"{names.steps} {checked}" if names.steps and checked == steps else f"{checked} steps"
        hint = f" (set the method's options with {names.options})" if names.options else ""
        raise PlanError(f"{origin} at {at}: {'; '.join(problems)}{hint}")
    return Start(config, plan, published, request_steps)


def check_steps_run(config: MethodConfig, adapter: Any, request: Request) -> None:
    """PlanError if the method's options cannot act on the steps ``request`` denoises, where the
    family runs fewer than its step count (``Adapter.steps_run``: img2img's strength)."""
    run = steps_run(adapter, request.values)
    steps = request.get("steps")
    problems = config.plan_problems({"num_inference_steps": run}) if run != steps else []
    if run is not None and problems:
        raise PlanError(
            f"{config.name}: this request denoises {run} of its {steps} scheduled steps; "
            + "; ".join(problems)
        )


def kv_history_fraction(s: Any) -> float | None:
    """The history KV a generation held before its last scale (the papers' "KV cache"), as a
    fraction of the plain model's (every row kept: ``diffcache.kv.memory`` on its geometry);
    None for a run with no history store."""
    if not s.kv_history_bytes or not s.kv_geometry:
        return None
    return s.kv_history_bytes[-1] / Geometry.of(s.kv_geometry).history_before()[-1]


def check_targets(
    target_compute: float | None,
    target_speedup: float | None,
    names: Names = Names(),
    target_kv: float | None = None,
) -> None:
    """Refuse two targets at once and a target out of range (before any work)."""
    compute, speedup = names.target_compute, names.target_speedup
    values = {"target_compute": target_compute, "target_speedup": target_speedup}
    given = [
        getattr(names, n) for n, v in {**values, "target_kv": target_kv}.items() if v is not None
    ]
    if len(given) > 1:
        raise DiffCacheError(f"give one target, not {' and '.join(given)}")
    if target_kv is not None and not 0 < target_kv <= 1:
        raise DiffCacheError(f"{names.target_kv} must be in (0, 1], got {target_kv}")
    if target_compute is not None and not 0 < target_compute <= 1:
        raise DiffCacheError(f"{compute} must be in (0, 1], got {target_compute}")
    if target_speedup is not None and not 1 <= target_speedup < math.inf:
        raise DiffCacheError(f"{speedup} must be a number >= 1, got {target_speedup}")


def with_kv_target(config: MethodConfig, target_kv: float, names: Names = Names()) -> MethodConfig:
    """``config`` with the history budget that keeps ``target_kv`` of the plain model's history
    KV (its ``kv_target``), or one error line for a method that has no such budget."""
    budgeted = config.kv_target(target_kv)
    if budgeted is None:
        kv = sorted(n for n, c in methods().items() if c.kv_target is not MethodConfig.kv_target)
        raise DiffCacheError(
            f"{names.target_kv} sets the history KV budget of {', '.join(kv)}; "
            f"{names.of('method', config.name)} has none"
        )
    return budgeted


def profile(
    pipe: Any,
    method: str | MethodConfig | Plan,
    prompts: Sequence[str] = (),
    seeds: int | Sequence[int] = 1,
    out: str | Path | None = None,
    *,
    target_compute: float | None = None,
    target_speedup: float | None = None,
    target_kv: float | None = None,
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
            A name starts where ``diffcache profile --method`` does (``resolve_start``): a
            built-in model's bundled plan of the method, else the published settings of the
            pipeline's family (e.g. Wan2.1's ERTACache for UniPC), else the method's defaults.
        prompts: calibration prompts (class ids as text for class-conditional models).
        seeds: how many seeds per prompt (from ``request.seed`` on), or the seeds themselves.
        out: where to write the plan (and its sidecar).
        target_compute: the compute fraction the plan must not exceed on these prompts.
        target_speedup: a speedup to reach; turned into a compute target with the denoiser's
            measured share of the generation time.
        target_kv: for a next-scale KV method, the fraction of the plain model's history KV
            (before the last scale, the papers' "KV cache") the plan keeps: the budget is set
            by arithmetic (``MethodConfig.kv_target``: the history is ``min(budget, T)`` rows,
            ``diffcache.kv.memory``), and the store's measured fraction goes in the provenance.
        request: the other request fields (size, steps, guidance ...); a built-in model's
            defaults fill the ones it leaves out.
        repeats: timed rounds of the speedup measured for ``target_speedup`` (its median,
            lowest and highest go in the provenance, with the torch threads it ran on).
    """
    request = request or Request()
    check_targets(target_compute, target_speedup, target_kv=target_kv)
    check_count(repeats, "repeats")
    out = _check_inputs(prompts, seeds, out)
    if session_of(pipe) is not None:
        raise AlreadyAcceleratedError(
            f"{type(pipe).__name__} is accelerated; call diffcache.remove() before profiling."
        )
    adapter, entry = find_adapter(pipe), builtin_of(pipe)
    start = resolve_start(
        method,
        family=adapter.family,
        model=entry.name if entry is not None else None,
        steps=request.get("steps"),
        default_steps=entry.defaults.get("steps") if entry is not None else None,
        what=type(pipe).__name__,
    )
    if start.request_steps is not None:
        request = request.replace(steps=start.request_steps)
    if entry is not None:
        request = request.merged(entry.defaults)
    config = start.config
    check_steps_run(config, adapter, request)
    if target_kv is not None:
        config = with_kv_target(config, target_kv)
    target = Target.resolve(adapter, pipe)
    if target.driver == "timestep":
        raise UnsupportedModelError(
            f"profiling runs whole generations: pass the pipeline, not its {type(pipe).__name__}"
        )
    config.check_supported(target, type(pipe).__name__)  # before any calibration run
    for kind in config.needs.sites:  # resolved now: a site that a compiled graph holds is
        if kind in ("block", "module"):  # refused before the plain run (diffcache.compiled)
            target.sites(kind)
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
    targets = {
        "target_compute": target_compute,
        "target_speedup": target_speedup,
        "target_kv": target_kv,
    }
    try:
        calibrated = config.calibrate(profiling)
    except TargetUnreachable as e:
        if target_speedup is None:  # a compute target is a bound: refused
            raise
        # a speed is a goal: the best plan the method can make for it, the fastest one
        targets["least_compute"] = e.least
        profiling.target_compute = e.least * (1 + 1e-9)
        calibrated = config.calibrate(profiling)
    plan = calibrated.config.as_plan(target, calibrated.calibration, valid_for)
    if calibrated.calibration is not None:  # measured on these weights: valid for them only
        plan = dataclasses.replace(
            plan, valid_for={**plan.valid_for, "weights": weights(target.experts)}
        )
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


class _Probes:
    """The observe-only handler of a profiling run: the generic probes of the method's
    ``probe_kinds`` and its observer (or, with ``observer`` given, that observer only)."""

    def __init__(self, target: Target, config: MethodConfig | None, observer: Observer | None):
        self.generic = observer is None and config is not None
        self.kinds = config.probe_kinds if self.generic else ()
        self.observer = config.observer(target) if self.generic else observer
        self.seen = self.observer.kinds if self.observer is not None else ()
        self.latent = target.adapter.latent_arg, target.arg_index(target.adapter.latent_arg)
        latent = target.adapter.provides.denoiser == "latent"
        self.cdim = target.adapter.channel_dim if latent else None  # of a latent denoiser
        self.trace, self.clock = Trace(), {"denoiser": 0.0, "probe": 0.0}
        self.memory: dict[tuple, dict] = {}  # each site's previous tensors, per request
        self.request = 0  # the index of the request running

    def attach(self, session: Session) -> None:
        session.on_step(self)
        hook = getattr(self.observer, "attach", None)  # an observer of a seam other than sites
        if hook is not None:
            hook(session)
        for kind in dict.fromkeys([*self.kinds, *self.seen]):
            if kind != "step":
                session.on_sites(session.target.sites(kind), self, "probe")

    def __call__(self, call: Call) -> Any:
        t0 = time.perf_counter()
        out = call.compute()
        t1 = time.perf_counter()
        site, run = call.site, call.run
        if site.kind in self.kinds:
            x = call.arg(*self.latent) if site.kind == "step" else None
            if x is not None and self.cdim is not None:  # the latent channels only
                x = latent_part(x, sample_of(out), self.cdim)  # (research/dit.md: input semantics)
            key = (self.request, site.name, site.expert, call.branch)
            values = probe(site.kind, x, out, self.memory.setdefault(key, {}))
            where = (run.step, run.substep, call.branch, site.expert, site.kind, site.name)
            self.trace.records.append(Record(self.request, *where, values))
        if site.kind in self.seen:
            self.observer.see(call, out)
        if site.kind == "step":
            self.clock["denoiser"] += t1 - t0
        self.clock["probe"] += time.perf_counter() - t1
        return out


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
    run, probes = RunState("profile"), _Probes(target, config, observer)
    trace, clock, observer = probes.trace, probes.clock, probes.observer
    steps, total = 0, 0.0
    mine = distributed.shard(list(enumerate(requests)))
    open_session(pipe, Session(target, None, run), probes.attach)
    try:
        for i, req in _progress(mine, progress and distributed.is_main(), "profiling"):
            probes.request = i
            probes.memory.clear()
            t0 = time.perf_counter()
            generate(pipe, req)
            total += time.perf_counter() - t0
            steps = run.num_steps or run.stats.steps
            trace.facts = dict(run.facts)
            if observer is not None:
                observer.end_request()
    finally:
        remove(pipe)
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
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def seconds(with_plan: bool, req: Request) -> float:
        if with_plan:
            accelerate(pipe, plan)
        try:
            return timed(lambda: generate(pipe, req), device)[1]
        finally:
            if with_plan:
                remove(pipe)

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


def _with_provenance(
    plan: Plan,
    target: Target,
    calibrated: Calibrated,
    prompts: Sequence[str],
    requests: Sequence[Request],
    targets: dict[str, Any],
) -> Plan:
    given = target.adapter.input_field  # each request's own input: not one of the fields
    fields = {k: v for k, v in requests[0].values.items() if given is None or k != given.name}
    provenance: dict[str, Any] = {
        "tool": f"diffcache {metadata.version('diffcache')} profile",
        "model_fingerprint": fingerprint(target.experts),
        "weights": weights(target.experts),
        "prompts": len(prompts),
        "prompts_sha256": hashlib.sha256("\n".join(map(str, prompts)).encode()).hexdigest(),
        "seeds": sorted({r.seed for r in requests}),
        "request": fields,
        "measured": dict(calibrated.measured),
        **{k: v for k, v in targets.items() if v is not None},
    }
    norm = weights_norm(target.experts)  # not with weights offloaded to the meta device
    if norm is not None:
        provenance["weights_norm"] = norm
    lora = adapter_state(target.experts, target.pipe)  # recorded with a LoRA only (none: default)
    if lora is not None:
        provenance["lora"] = lora
    return dataclasses.replace(plan, provenance=provenance)


def _progress(items: Sequence[Any], on: bool, desc: str) -> Any:
    if not on:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="run")
