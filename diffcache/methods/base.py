"""MethodConfig: the frozen, strictly validated settings of one caching method.

A method's runtime is one file: a ``MethodConfig`` subclass (its options, documented with
``option``), an optional calibration dataclass (what ``diffcache profile`` measures, checked as
strictly), a state dataclass and a handler that decides, reuses and stores, and an
``apply(session, config)`` function bound with ``@register_method(Config)``. The core owns the
bookkeeping: ``apply`` only answers calls (``session.on_step`` / ``session.on_sites``). A method
that records and fits offline keeps that in ``<name>_calibrate.py``, which imports the runtime
and binds its ``calibrate(config, profiling)`` with ``@register_calibrator(Config)``; the
runtime never imports it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch

from diffcache.adapter import Capabilities
from diffcache.calibration import calibrator, fingerprint, split_calibration
from diffcache.errors import PlanError, UnsupportedModelError
from diffcache.fewstep import StepLimit
from diffcache.options import coerce, option, to_plain
from diffcache.plan import Plan

if TYPE_CHECKING:
    from collections.abc import Callable

    from diffcache.adapter import Adapter, Target

GRANULARITIES = ("step", "block", "module", "kv")
#: how a refusal words a needed KV store or denoiser kind (``Capabilities``)
WORDS = {"kv_store": "a kv store ({})", "denoiser": "a {} denoiser"}

__all__ = [
    "MethodConfig",
    "PositionKVConfig",
    "HistoryKVConfig",
    "Calibrated",
    "Observer",
    "Profiling",
    "option",
    "tune_knob",
    "GRANULARITIES",
]


class Observer(Protocol):
    """A method's profiling recorder: ``see`` gets every call of the plain run at sites of the
    ``kinds`` it names (the call: site, step, branch, arguments; and its output),
    ``end_request`` ends one calibration request, and ``result`` gives sums of tensors, which
    are added up over processes."""

    kinds: tuple[str, ...]

    def see(self, call: Any, output: Any) -> None: ...

    def end_request(self) -> None: ...

    def result(self) -> dict[str, torch.Tensor]: ...


class Profiling(Protocol):
    """What a method's ``calibrate`` is handed (``diffcache.profile`` makes it): the trace of
    the plain run, the model and its compute target, and calibration runs."""

    trace: Any  # every probe record, and ``observed``: the observer's sums
    target: Target
    target_compute: float | None  # the compute fraction the plan must not exceed, if any
    valid_for: dict[str, Any]  # of the plan being made

    def record(self, observer: Observer) -> dict[str, torch.Tensor]:
        """Run the calibration requests plain with ``observer`` attached; its sums."""
        ...

    def measure(self, config: MethodConfig, calibration: Any = None) -> dict[str, Any]:
        """Run the calibration requests with ``config``; the mean ``compute_fraction``."""
        ...

    def tune(
        self,
        make: Callable[[float], MethodConfig],
        lo: float,
        hi: float,
        knob: str,
        iterations: int = 14,
        rising: bool = False,
    ) -> tuple[MethodConfig, dict[str, Any]]:
        """The ``knob`` in [lo, hi] closest to full computation that meets the target."""
        ...


@dataclasses.dataclass(frozen=True)
class Calibrated:
    """What ``calibrate`` returns: the config to write, its calibration data (or None) and what
    was measured on the calibration prompts (recorded in the plan's provenance)."""

    config: MethodConfig
    calibration: Any = None
    measured: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    valid_for: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Base of every method config. Subclasses are frozen dataclasses declared with ``option``.

    Class attributes: ``name`` (YAML, registry and file name), ``granularity``
    (``step | block | module | kv``), ``kind`` (the work unit of ``compute_fraction``: a site kind,
    the granularity by default), ``kernels`` (kernel ops the method calls), ``calibration``
    (the dataclass of its calibration data; methods that have one refuse plans without it),
    ``probe_kinds`` (the site kinds ``diffcache profile`` traces for it), ``valid_for_keys``
    (``valid_for`` keys it adds to the core's and its family's, with their types) and ``needs``
    (the ``Capabilities`` it needs of a model: a model whose adapter lacks one is refused).

    Every subclass defines ``identity()`` (never reuses: outputs equal the plain model) and
    ``aggressive()`` (reuses as much as it allows), checked at registration.
    """

    name: ClassVar[str]
    granularity: ClassVar[str]
    kind: ClassVar[str] = ""
    kernels: ClassVar[tuple[str, ...]] = ()
    calibration: ClassVar[type | None] = None
    probe_kinds: ClassVar[tuple[str, ...]] = ("step",)  # sites the profiler traces for it
    valid_for_keys: ClassVar[Mapping[str, type]] = {}  # extra plan valid_for keys it checks
    needs: ClassVar[Capabilities]  # what it needs of a model's adapter

    @classmethod
    def work_kind(cls) -> str:
        return cls.kind or cls.granularity

    @classmethod
    def profile_hint(cls, model: str = "MODEL") -> str:
        return (
            f"diffcache profile --model {model} --method {cls.name} --num-prompts 8 --out plan.yaml"
        )

    def unmet_needs(self, adapter: Adapter) -> list[str]:
        """Each of this method's ``needs`` that ``adapter`` does not provide, in words."""
        needs, have = self.needs, adapter.provides
        gaps = [(f"{s} sites", "none") for s in needs.sites if s not in have.sites]
        for key, words in WORDS.items():
            need, got = getattr(needs, key), getattr(have, key)
            if need and need != got:
                gaps.append((words.format(need), words.format(got) if got else "none"))
        return [
            f"{self.name} needs {need} but {adapter.name}'s adapter provides {got}"
            for need, got in gaps
        ]

    def not_supported_reasons(self, target: Target) -> list[str]:
        """Every reason this method cannot run on ``target`` ([] if it can): each of its
        ``needs`` the model's adapter does not provide, or else its own (``own_reasons``)."""
        return self.unmet_needs(target.adapter) or self.own_reasons(target)

    def check_needs(self, adapter: Adapter, given: str) -> None:
        """Refuse a family whose adapter lacks one of this method's needs, before its model is
        built (``given``: what named the method, as ``--plan p.yaml``)."""
        unmet = self.unmet_needs(adapter)
        if unmet:
            raise UnsupportedModelError(f"{given}: " + "; ".join(unmet))

    def check_supported(self, target: Target, owner: str) -> None:
        """Raise UnsupportedModelError naming every reason this method cannot run on
        ``target`` (``owner``: what the user passed, by class name); nothing if it can."""
        reasons = self.not_supported_reasons(target)
        if reasons:
            raise UnsupportedModelError(
                f"method {self.name!r} cannot run on {owner}:\n  - " + "\n  - ".join(reasons)
            )

    def own_reasons(self, target: Target) -> list[str]:
        """This method's reasons beyond its needs (a sampler it cannot run, options that
        conflict), asked once the model provides them all; [] if none."""
        return []

    def plan_problems(self, valid_for: Mapping[str, Any]) -> list[str]:
        """Problems of these options together with the plan's ``valid_for`` (checked at load):
        by default, a ``num_inference_steps`` too few for them to reuse anything."""
        steps = valid_for.get("num_inference_steps")
        problem = self.steps_problem(steps) if steps is not None else None
        return [problem] if problem else []

    def step_limit(self, steps: int) -> StepLimit | None:
        """Why these options reuse nothing in a run of ``steps`` steps (a warm-up that covers
        it, computed first and last steps); None where they can reuse something."""
        return None

    def steps_problem(self, steps: int) -> str | None:
        """The one-line problem of running these options for ``steps`` steps (None: none)."""
        limit = self.step_limit(steps)
        return limit.problem(self.name, steps) if limit else None

    def kv_target(self, fraction: float) -> MethodConfig | None:
        """These options with the history budget that keeps ``fraction`` of the plain model's
        history KV before the last scale (``diffcache profile --target-kv``); None: the method
        has no such budget."""
        return None

    def observer(self, target: Target) -> Observer | None:
        """What this method records at the whole-step site while ``diffcache profile`` runs
        the plain pipeline, beyond the generic probes (None: nothing): its registered
        calibrator's observer, if any."""
        found = calibrator(self.name)
        return found.observer(self, target) if found and found.observer else None

    def calibrate(self, profiling: Profiling) -> Calibrated:
        """Make this method's plan from a profiling session (observe-only trace + calibration
        runs): its registered calibrator's, if any. Methods without calibration keep their
        options and report what they measure."""
        found = calibrator(self.name)
        if found is not None:
            return found.calibrate(self, profiling)
        return Calibrated(self, measured=profiling.measure(self))

    @classmethod
    def from_options(cls, options: Any, where: str = "options") -> MethodConfig:
        """Build from a plan's ``options``: unknown keys, wrong types and out-of-range values
        raise one PlanError naming ``where.key`` for every problem."""
        if options is None:
            options = {}
        if not isinstance(options, Mapping):
            raise PlanError(f"{where}: expected a mapping of options, got {options!r}")
        return coerce(options, cls, where)

    def to_options(self) -> dict[str, Any]:
        return to_plain(self)

    def as_plan(self, target: Target, calibration: Any, valid_for: Mapping[str, Any]) -> Plan:
        """A plan for ``target`` with these options and ``calibration`` (with it, the plan is
        valid for the model's fingerprint only)."""
        plain, tensors = split_calibration(calibration)
        valid = dict(valid_for)
        if calibration is not None:
            valid["fingerprint"] = fingerprint(target.experts)
        return Plan(
            model=target.adapter.family,
            method=self.name,
            options=self.to_options(),
            valid_for=valid,
            calibration=plain,
            tensors=tensors,
        )


@dataclasses.dataclass(frozen=True)
class PositionKVConfig(MethodConfig):
    """What every text-LM KV method shares: a policy over the position-indexed KV store, its
    work counted in token-layers, with the store's K/V scatter and the sampler's fused
    confidence kernels."""

    granularity: ClassVar[str] = "kv"
    kind: ClassVar[str] = "token_layer"
    needs: ClassVar[Capabilities] = Capabilities(kv_store="position")
    kernels: ClassVar[tuple[str, ...]] = ("kv_scatter", "token_confidence")


@dataclasses.dataclass(frozen=True)
class HistoryKVConfig(MethodConfig):
    """What every next-scale KV method shares (VAR, Infinity): a selection over the history
    store, its work counted in attention pairs, with the store's compaction kernel.

    Each defines ``make(calibration, schedule, layers, heads)``: its selection for a model of
    that schedule and shape (None: the unlimited budget), ``calibration`` the plan's
    calibration data (None for a method without one); ``accelerate`` and ``diffcache kv``
    build it the same way (``kv.history_method.attach_selection``, ``kv.memory.plan_memory``).
    """

    granularity: ClassVar[str] = "kv"
    kind: ClassVar[str] = "attn_pair"
    needs: ClassVar[Capabilities] = Capabilities(kv_store="history")
    kernels: ClassVar[tuple[str, ...]] = ("kv_compact",)


def tune_knob(
    config: MethodConfig,
    profiling: Profiling,
    knob: str,
    lo: float,
    hi: float,
    rising: bool = False,
    integer: bool = False,
    near_one: bool = False,
) -> Calibrated:
    """``calibrate`` of a method with one knob: keep the options, or with a compute target set
    ``knob`` to the value in [lo, hi] closest to full computation that meets it
    (``Profiling.tune``; ``rising``: the compute fraction rises with the knob; ``integer``:
    the knob is rounded to a whole number; ``near_one``: the search runs on the distance to 1,
    log-scaled, for knobs whose useful values crowd below 1 — a confidence or a similarity)."""
    if profiling.target_compute is None:
        return Calibrated(config, measured=profiling.measure(config))

    def value(x: float) -> float:
        return round(x) if integer else 1.0 - x if near_one else x

    def make(x: float) -> MethodConfig:
        return dataclasses.replace(config, **{knob: value(x)})

    tried: list[list[float]] = []
    if near_one:  # x = 1 - knob on a log scale; x = 0 (knob 1, most compute) is off it: try it
        assert rising and hi == 1.0, "a near_one knob rises to 1"
        m = profiling.measure(make(0.0))
        tried = [[1.0, m["compute_fraction"]]]
        if m["compute_fraction"] <= profiling.target_compute:
            return Calibrated(make(0.0), measured={**m, "search": tried})
        lo, hi, rising = 1e-6, 1.0 - lo, False
    tuned, measured = profiling.tune(make, lo=lo, hi=hi, knob=knob, rising=rising)
    search = [[float(f"{value(x):.6g}"), c] for x, c in measured.get("search", [])]
    return Calibrated(tuned, measured={**measured, "search": tried + search})
