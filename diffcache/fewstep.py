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
from typing import Any

from diffcache.errors import strength_runs


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
    """Warns once per step count at which the method reuses nothing (``problem(steps)``: the
    method's ``steps_problem``); the run stays exact. ``owner``: the model, for the message."""

    def __init__(self, problem: Callable[[int], str | None], owner: str) -> None:
        self.problem, self.owner = problem, owner
        self.warned: set[int] = set()

    def __call__(self, steps: int, scheduled: int | None = None) -> None:
        """Warn about a run of ``steps`` steps, of the ``scheduled`` steps the call set (the
        message says so where ``strength`` made them fewer)."""
        problem = self.problem(steps)
        if problem and steps not in self.warned:
            self.warned.add(steps)
            ran = f"this {steps}-step run{strength_runs(steps, scheduled)}"
            warnings.warn(
                f"diffcache: {self.owner}: {problem}; {ran} computes every step", stacklevel=2
            )
