"""Few-step limits: a method whose options reuse nothing in a run of few steps says so.

A method's ``MethodConfig.step_limit(steps)`` gives a :class:`StepLimit` (the fewest steps its
options can reuse anything in, and the option value that would act), ``steps_problem`` words it
in one line. A plan that states ``num_inference_steps`` is refused at load and the CLI refuses a
request before the model is built; a run whose plan states no count gets a
:class:`FewStepWarning` at its first model call, once per step count, and computes every step.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from diffcache.errors import strength_runs

if TYPE_CHECKING:
    from diffcache.runstate import RunState


@dataclasses.dataclass(frozen=True)
class StepLimit:
    """Why a method's options reuse nothing in a run of few steps: ``least``, the fewest steps
    in which they can reuse anything; ``option`` and ``value``, the option that sets that limit
    and its value ("" for a rule of the method); ``fix``, the value of that option that would
    let the method act at the asked count (None where none does)."""

    least: int
    option: str = ""
    value: Any = None
    fix: Any = None

    def problem(self, method: str, steps: int) -> str:
        """One line: the method, the option, its smallest step count and the fix."""
        if not self.option:
            return f"{method} reuses nothing in {steps} steps: it needs at least {self.least} steps"
        act = (
            f"{self.option}={self.fix} would act at {steps} steps"
            if self.fix is not None
            else f"no {self.option} acts at {steps} steps"
        )
        return (
            f"options.{self.option}: {method} with {self.option}={self.value} reuses nothing in "
            f"{steps} steps (it needs at least {self.least} steps); {act}"
        )


class FewStepWarning:
    """One of a run's reporters (``RunState.reporters``): where the plan sets no
    ``num_inference_steps``, warns once per step count at which the method reuses nothing
    (``problem(steps)``: the method's ``steps_problem``); the run stays exact. Reports no facts."""

    def __init__(self, problem: Callable[[int], str | None], run: RunState) -> None:
        self.problem, self.run = problem, run
        self.warned: set[int] = set()

    def __call__(self) -> dict[str, Any]:
        """At a run's first model call: warn about its ``num_steps`` steps, of the ``scheduled``
        steps the call set (the message says so where ``strength`` made them fewer)."""
        run, steps = self.run, self.run.num_steps
        if steps is None or "num_inference_steps" in run.valid_for:
            return {}
        problem = self.problem(steps)
        if problem and steps not in self.warned:
            self.warned.add(steps)
            ran = f"this {steps}-step run{strength_runs(steps, run.scheduled)}"
            warnings.warn(
                f"diffcache: {run.owner}: {problem}; {ran} computes every step", stacklevel=2
            )
        return {}
