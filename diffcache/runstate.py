"""RunState: run / step / sub-step / branch / expert bookkeeping, method state, and Stats.

A *run* is one generation call. Its *steps* are the steps the user asked for; a second-order
scheduler's extra model evaluations are *sub-steps* of a step. The *branch* is the index of the
denoiser call within a sub-step (separate CFG: 0 = cond, 1 = uncond; batched or no CFG: 0); the
*expert* is which denoiser runs (Wan2.2 has two). Drivers (``diffcache.drivers``) feed the
boundaries.

Method state lives in slots keyed by the method (site, expert, branch ...) and is released when the
run ends: nothing of one call is reachable from the next. Stats stay until the next run starts.

With tracing on (``accelerate(..., trace=True)``) every decision a method makes is kept in
``Stats.trace``, one event per site call (and per decision of the text methods), each of the
same shape: ``{"step", "substep", "branch", "expert", "site", "action", "values"}``. ``action``
is one of :data:`ACTIONS`; ``values`` are the numbers that decided it (plain Python).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Hashable, Mapping
from copy import deepcopy
from typing import Any

from diffcache.errors import DiffCacheError, PlanError, outside_valid_for, steps_mismatch
from diffcache.options import to_plain
from diffcache.sites import KINDS

#: valid_for keys ``accelerate`` checks against the model itself (not per call).
CHECKED_AT_ACCELERATE = ("scheduler", "fingerprint", "weights")

#: What a trace event says happened at its site: the work was run (``computed``), answered from
#: the cache (``reused``), extrapolated (``forecast``), run for some rows / tokens only
#: (``partial``), cached state dropped (``evicted``), tokens decoded (``committed``).
ACTIONS = ("computed", "reused", "forecast", "partial", "evicted", "committed")
#: Stats of next-scale KV methods, in ``as_dict`` when set (``diffcache.kv.history_method``)
KV_HISTORY = ("kv_history_bytes", "kv_attn_macs", "kv_geometry")


@dataclasses.dataclass
class Stats:
    """What the last call did. ``compute_fraction`` = computed / total work of the method's
    ``kind`` (its granularity), over the call; ``work`` has the same for every kind counted."""

    method: str
    kind: str = "step"
    steps: int = 0
    model_calls: int = 0
    work: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # kind -> [done, all]
    kv_bytes_peak: int | None = None
    kv_bytes_per_step: list[int] = dataclasses.field(default_factory=list)
    kv_history_bytes: list[int] | None = None  # KV_HISTORY
    kv_attn_macs: list[int] | None = None
    kv_geometry: dict[str, Any] | None = None
    wall_s: float | None = None
    calls: list[tuple[int, int, float]] = dataclasses.field(default_factory=list)
    kernels: dict[str, str] = dataclasses.field(default_factory=dict)
    trace: list[dict[str, Any]] | None = None  # the decisions, when tracing is on

    @property
    def computed(self) -> float:
        return self.work.get(self.kind, [0.0, 0.0])[0]

    @property
    def skipped(self) -> float:
        done, total = self.work.get(self.kind, [0.0, 0.0])
        return total - done

    @property
    def compute_fraction(self) -> float | None:
        done, total = self.work.get(self.kind, [0.0, 0.0])
        return done / total if total else None

    def per_step(self) -> list[float]:
        """Fraction of the work computed at each step (all calls of a step together)."""
        done: dict[int, list[float]] = {}
        for step, _, frac in self.calls:
            done.setdefault(step, []).append(frac)
        return [sum(v) / len(v) for _, v in sorted(done.items())]

    def copy(self) -> Stats:
        """A copy sharing nothing with this one (the run goes on updating this one)."""
        return deepcopy(self)

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "kind": self.kind,
            "steps": self.steps,
            "model_calls": self.model_calls,
            "computed": self.computed,
            "skipped": self.skipped,
            "compute_fraction": self.compute_fraction,
            "kv_bytes_peak": self.kv_bytes_peak,
            "wall_s": self.wall_s,
            "per_step_compute": self.per_step(),
            "work": {k: {"computed": d, "skipped": t - d} for k, (d, t) in self.work.items()},
            "kv_bytes_per_step": list(self.kv_bytes_per_step),
            **{k: deepcopy(v) for k in KV_HISTORY if (v := getattr(self, k)) is not None},
            "kernels": dict(self.kernels),
            **({} if self.trace is None else {"trace": [dict(e) for e in self.trace]}),
        }


class RunState:
    """Bookkeeping of one accelerated model.

    Args:
        method: the method name (for Stats and error messages).
        kind: the work unit of the method's ``compute_fraction`` (a site kind).
        valid_for: the plan's ``valid_for``; ``num_inference_steps`` and any key a driver
            reports in ``begin_run(**facts)`` are checked at the first model call of a run.
        kernels: kernel backend for the method's ops: ``auto | torch | triton``.
        on_error: cleans the model before a mid-run error propagates (set by ``accelerate``).
        owner: the accelerated object's class name, for messages.
        tracing: keep every decision in ``Stats.trace``.
    """

    def __init__(
        self,
        method: str,
        kind: str = "step",
        valid_for: Mapping[str, Any] | None = None,
        kernels: str = "auto",
        on_error: Callable[[], None] | None = None,
        owner: str = "the model",
        tracing: bool = False,
    ) -> None:
        assert kind in KINDS, f"unknown work kind {kind!r}"
        self.method, self.kind, self.kernels, self.owner = method, kind, kernels, owner
        self.tracing = tracing
        self.valid_for = dict(valid_for or {})
        self.on_error = on_error or (lambda: None)
        self.num_steps: int | None = None  # the steps run, of the ``scheduled`` steps the call set
        self.scheduled: int | None = None
        self.facts: dict[str, Any] = {}
        self.active = False
        self.step = self.substep = self.branch = self.expert = 0
        self._checked = False
        self._opened = False  # the current step index is in use (a call or begin_step saw it)
        self._slots: dict[Hashable, Any] = {}
        #: checks at each run's first model call (LoRA state, few steps), returning its facts
        self.reporters: list[Callable[[], dict[str, Any]]] = []
        self._call: list[float] | None = None  # [done, total] of the current model call
        self._t0 = 0.0
        self.stats = self._new_stats()

    # -- driver events ----------------------------------------------------------------------
    def begin_run(self, num_steps: int | None = None, **facts: Any) -> None:
        """Start a generation of ``num_steps`` steps; releases everything of the last run."""
        self.num_steps = self.scheduled = num_steps  # a driver trims num_steps to those run
        self.facts = facts
        self.step, self.substep, self.branch = 0, 0, -1
        self.active, self._checked, self._opened = True, False, False
        self._slots.clear()
        self.stats = self._new_stats()
        self._t0 = time.perf_counter()

    def begin_step(self) -> None:
        """The next step starts (the first step starts with the run)."""
        if self._opened:
            self.step += 1
        self.substep, self.branch, self._opened = 0, -1, True

    def end_substep(self, step_done: bool) -> None:
        """A scheduler update finished: the whole step, or one sub-step of it."""
        if step_done:
            self.step += 1
            self.substep, self._opened = 0, False
        else:
            self.substep += 1
        self.branch = -1
        self._tick()

    def end_run(self) -> None:
        """The run is over: method state is released, Stats stay."""
        self.active = False
        self._slots.clear()
        self._tick()

    # -- model calls ------------------------------------------------------------------------
    def begin_call(self, expert: int = 0) -> None:
        """A denoiser call starts (a run starts first if none is active)."""
        if not self.active:
            self.begin_run(self.valid_for.get("num_inference_steps"))
        if not self._checked:
            self._check_valid_for()
        self.branch += 1
        self.expert, self._opened = expert, True
        self.stats.model_calls += 1
        self.stats.steps = max(self.stats.steps, self.step + 1)
        self._call = [0.0, 0.0]

    def end_call(self, unseen: Mapping[str, float] | None = None) -> None:
        """The denoiser call returned; ``unseen`` counts sites that never ran in it (skipped)."""
        for kind, n in (unseen or {}).items():
            self.record(kind, 0.0, n)
        done, total = self._call or (0.0, 0.0)
        if total:
            self.stats.calls.append((self.step, self.branch, done / total))
        self._call = None
        self._tick()

    def record(self, kind: str, computed: float, total: float = 1.0) -> None:
        """Work of ``kind`` done in the current call: ``computed`` of ``total`` units."""
        entry = self.stats.work.setdefault(kind, [0.0, 0.0])
        entry[0] += computed
        entry[1] += total
        if kind == self.kind and self._call is not None:
            self._call[0] += computed
            self._call[1] += total

    def record_kv(self, nbytes: int) -> None:
        """Bytes the method's KV store holds now; Stats keep the peak, overall and per step."""
        s = self.stats
        s.kv_bytes_peak = max(s.kv_bytes_peak or 0, int(nbytes))
        s.kv_bytes_per_step += [0] * (self.step + 1 - len(s.kv_bytes_per_step))
        s.kv_bytes_per_step[self.step] = max(s.kv_bytes_per_step[self.step], int(nbytes))

    def trace(self, site: str, action: str, **values: Any) -> None:
        """Keep one decision at ``site`` of the current call (a no-op unless tracing)."""
        if self.stats.trace is None:
            return
        assert action in ACTIONS, f"unknown trace action {action!r}"
        self.stats.trace.append(
            {
                "step": self.step,
                "substep": self.substep,
                "branch": self.branch,
                "expert": self.expert,
                "site": site,
                "action": action,
                "values": to_plain(values),
            }
        )

    # -- state and queries ------------------------------------------------------------------
    def slot(self, key: Hashable, factory: Callable[[], Any]) -> Any:
        """Method state under ``key`` for this run, made by ``factory`` on first use."""
        if key not in self._slots:
            self._slots[key] = factory()
        return self._slots[key]

    def is_last_step(self) -> bool:
        return self.num_steps is not None and self.step >= self.num_steps - 1

    def where(self) -> str:
        sub = f", sub-step {self.substep}" if self.substep else ""
        expert = f", expert {self.expert}" if self.expert else ""
        return f"step {self.step}{sub}, branch {self.branch}{expert}, method {self.method!r}"

    def fail(self, error: DiffCacheError) -> DiffCacheError:
        """Clean the model (detach everything), then hand back ``error`` for the caller to raise."""
        self.end_run()
        self.on_error()
        return error

    def refuse(self, problem: str, after: int = 0) -> PlanError:
        """A PlanError for a call the plan does not cover; the model stays accelerated.
        ``after``: the steps of this call that already ran (a bare denoiser sees a run too
        long only when it goes on)."""
        self.end_run()
        ran = (
            f"this call stopped after {after} steps"
            if after
            else "no denoising step of this call ran"
        )
        return PlanError(
            f"{problem}; {ran} and {self.owner} is still accelerated (the next call starts a "
            "new run)."
        )

    def _check_valid_for(self) -> None:
        self._checked = True
        for report in self.reporters:
            self.facts.update(report())
        want = self.valid_for.get("num_inference_steps")
        if want is not None and self.num_steps is not None and self.num_steps != want:
            raise self.refuse(steps_mismatch(want, self.num_steps, self.scheduled))
        for key, want in self.valid_for.items():
            if key in CHECKED_AT_ACCELERATE or key == "num_inference_steps":
                continue
            if key not in self.facts:
                raise self.refuse(
                    f"the plan is valid for {key}={want!r} but this call does not report {key} "
                    f"(valid_for.{key})"
                )
            if self.facts[key] != want:
                raise self.refuse(outside_valid_for(key, want, self.facts[key]))

    def _new_stats(self) -> Stats:
        return Stats(self.method, self.kind, trace=[] if self.tracing else None)

    def _tick(self) -> None:
        self.stats.wall_s = time.perf_counter() - self._t0
