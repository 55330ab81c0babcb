"""RunState: run / step / CFG-branch bookkeeping, per-branch method state, and Stats.

A run is one generation call. For diffusers pipelines it starts when the pipeline calls
``scheduler.set_timesteps`` and a step ends at ``scheduler.step``; the CFG branch is the index of
the denoiser call within the step (separate CFG: 0 = cond, 1 = uncond; batched CFG and no CFG: 0).
Our own pipelines (DLMs, VAR) call ``begin_run`` / ``begin_call`` / ``record`` / ``end_step``
directly. State is kept per branch and reset at the start of every run.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

from diffcache.errors import DiffCacheError
from diffcache.plan import steps_mismatch


@dataclasses.dataclass
class Stats:
    """What the last call did. ``compute_fraction`` = computed work / work of the same call
    without acceleration, in the method's units (see its docstring)."""

    method: str
    steps: int = 0
    model_calls: int = 0
    computed: float = 0.0
    skipped: float = 0.0
    kv_bytes_peak: int | None = None
    wall_s: float | None = None
    calls: list[tuple[int, int, float]] = dataclasses.field(default_factory=list)
    kernels: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def compute_fraction(self) -> float | None:
        total = self.computed + self.skipped
        return self.computed / total if total else None

    def per_step(self) -> list[float]:
        """Fraction of work computed at each step (all branches of a step together)."""
        done: dict[int, list[float]] = {}
        for step, _, frac in self.calls:
            done.setdefault(step, []).append(frac)
        return [sum(v) / len(v) for _, v in sorted(done.items())]

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "steps": self.steps,
            "model_calls": self.model_calls,
            "computed": self.computed,
            "skipped": self.skipped,
            "compute_fraction": self.compute_fraction,
            "kv_bytes_peak": self.kv_bytes_peak,
            "wall_s": self.wall_s,
            "per_step_compute": self.per_step(),
            "kernels": dict(self.kernels),
        }


class RunState:
    """Bookkeeping of one accelerated model. ``on_error`` cleans the model before a mid-run
    error propagates (set by ``accelerate``)."""

    def __init__(
        self,
        method: str,
        expected_steps: int | None = None,
        kernels: str = "auto",
        on_error: Callable[[], None] | None = None,
    ) -> None:
        self.method = method
        self.expected_steps = expected_steps
        self.kernels = kernels  # kernel backend for the method's ops: auto | torch | triton
        self.on_error = on_error or (lambda: None)
        self.guard: Callable[[], None] | None = None  # before each call; raises if model changed
        self.num_steps: int | None = None
        self.step = 0
        self.branch = -1
        self.active = False
        self._states: dict[int, Any] = {}
        self._t0 = 0.0
        self.stats = Stats(method)

    # -- drivers --------------------------------------------------------------------------
    def begin_run(self, num_steps: int | None) -> None:
        """Start a generation of ``num_steps`` steps (None when unknown); resets all state."""
        if (
            self.expected_steps is not None
            and num_steps is not None
            and num_steps != self.expected_steps
        ):
            raise self.fail(steps_mismatch(self.expected_steps, num_steps))
        self.num_steps = num_steps
        self.step, self.branch, self.active = 0, -1, True
        self._states.clear()
        self.stats = Stats(self.method)
        self._t0 = time.perf_counter()

    def begin_call(self) -> tuple[int, int]:
        """A denoiser call: returns (step, branch). Starts a run if none is active."""
        if self.guard is not None:
            self.guard()
        if not self.active:
            self.begin_run(self.expected_steps)
        self.branch += 1
        self.stats.model_calls += 1
        self.stats.steps = max(self.stats.steps, self.step + 1)
        return self.step, self.branch

    def record(self, computed: float, total: float = 1.0) -> None:
        """Work done by the current call, in the method's units (``computed`` of ``total``)."""
        self.stats.computed += computed
        self.stats.skipped += total - computed
        self.stats.calls.append((self.step, self.branch, computed / total if total else 1.0))
        self.stats.wall_s = time.perf_counter() - self._t0

    def end_step(self) -> None:
        if not self.active:
            return
        self.step += 1
        self.branch = -1
        self.stats.wall_s = time.perf_counter() - self._t0

    # -- queries ----------------------------------------------------------------------------
    def is_last_step(self) -> bool:
        return self.num_steps is not None and self.step >= self.num_steps - 1

    def state(self, factory: Callable[[], Any], branch: int | None = None) -> Any:
        """The method state of ``branch`` (default: the current one), made by ``factory``."""
        slot = self.branch if branch is None else branch
        if slot not in self._states:
            self._states[slot] = factory()
        return self._states[slot]

    def where(self) -> str:
        return f"step {self.step}, branch {self.branch}, method {self.method!r}"

    def fail(self, error: DiffCacheError) -> DiffCacheError:
        """Clean the model (remove every hook), then hand back ``error`` for the caller to raise."""
        self.active = False
        self.on_error()
        return error
