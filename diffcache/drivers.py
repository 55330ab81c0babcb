"""Drivers: where runs and steps begin and end, for the three kinds of model.

- ``scheduler`` (stock diffusers pipelines): ``set_timesteps`` starts a run of
  ``num_inference_steps`` steps; each ``step`` ends a step, or a sub-step when a second-order
  scheduler is half-way (``state_in_first_order`` is False); the last ``step`` ends the run.
  A schedule trimmed by ``strength`` counts the steps actually run
  (``diffcache.variants.ScheduleStart``).
- ``timestep`` (a bare denoiser): the timestep argument tells steps. Time may run either way;
  the first two distinct values fix the direction. A move against it starts a new run. With a
  step count from the plan, a run that goes past it, or one that ended short of it, is refused.
- ``pipeline`` (our own pipelines): the pipeline calls its own ``begin_run(num_steps, **facts)``,
  ``begin_step()`` and ``end_run()`` event methods; the driver listens there.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from diffcache.errors import RunError, steps_past, steps_short
from diffcache.session import Call, Session
from diffcache.variants import ScheduleStart


class SchedulerDriver:
    """Runs and steps from the pipeline's scheduler."""

    def attach(self, session: Session) -> None:
        self.session = session
        run, scheduler = session.run, session.target.scheduler
        self.done = 0  # scheduler updates made in this run
        self.start = ScheduleStart(session)

        def set_timesteps(call: Any, *args: Any, **kwargs: Any) -> Any:
            out = call(*args, **kwargs)
            session.check_parts()
            updates = len(scheduler.timesteps)
            order = max(int(getattr(scheduler, "order", 1)), 1)
            steps = getattr(scheduler, "num_inference_steps", None) or math.ceil(updates / order)
            run.begin_run(int(steps))
            self.done = 0
            self.start.reset(updates, order, int(steps))
            return out

        def step(call: Any, *args: Any, **kwargs: Any) -> Any:
            out = call(*args, **kwargs)
            if run.active:
                run.end_substep(bool(getattr(scheduler, "state_in_first_order", True)))
                self.done += 1
                if self.done >= self.start.updates:
                    run.end_run()
            return out

        session.attach(scheduler, "set_timesteps", "diffcache.run", set_timesteps)
        session.attach(scheduler, "step", "diffcache.run", step)

    def before_call(self, call: Call) -> None:
        self.session.check_parts()
        self.start.first_call(call)

    def after_call(self) -> None:
        pass


class TimestepDriver:
    """Runs and steps from a bare denoiser's timestep argument."""

    def attach(self, session: Session) -> None:
        self.session = session
        t = session.target
        self.name = t.adapter.timestep_arg
        self.index = t.arg_index(self.name)
        self.expected: int | None = session.run.valid_for.get("num_inference_steps")
        self.last: float | None = None
        self.direction = 0
        self.branches = 0  # calls per step, learned on the first step

    def before_call(self, call: Call) -> None:
        run = self.session.run
        t = call.arg(self.name, self.index)
        if t is None:
            raise run.fail(
                RunError(
                    f"{run.owner} was called without {self.name!r}; diffcache needs it to count "
                    "steps of a bare denoiser."
                )
            )
        value = float(torch.as_tensor(t).flatten()[0])
        if self.last is None:
            self._new_run(value)
            return
        move = 0 if value == self.last else (1 if value > self.last else -1)
        seen, want = run.step + 1, self.expected
        if not run.active:  # the last run ended after its last step
            if move and move == self.direction:
                self.last = None
                raise run.refuse(steps_past(want), after=want or seen)
            self._new_run(value)
            return
        if not move:  # another branch of the same step
            return
        if self.direction in (0, move):  # time goes on the same way
            if want is None or seen < want:
                self.direction, self.last = move, value
                run.end_substep(True)
                return
            if self.direction:
                self.last = None
                raise run.refuse(steps_past(want), after=seen)
        elif want is not None and seen < want:
            self.last = None
            raise run.refuse(steps_short(want, seen))
        run.end_run()
        self._new_run(value)

    def after_call(self) -> None:
        run = self.session.run
        if run.step == 0:
            self.branches = max(self.branches, run.branch + 1)
        elif run.is_last_step() and run.branch + 1 >= self.branches:
            run.end_run()  # the last call of the last step: release the run's state now

    def _new_run(self, value: float) -> None:
        self.session.run.begin_run(self.expected)
        self.last, self.direction, self.branches = value, 0, 0


class PipelineDriver:
    """Runs and steps from our own pipelines' event methods."""

    def attach(self, session: Session) -> None:
        self.session = session
        run, pipe = session.run, session.target.pipe

        def relay(event: Any, call: Any, *args: Any, **kwargs: Any) -> Any:
            session.check_parts()
            event(*args, **kwargs)
            return call(*args, **kwargs)

        for name in ("begin_run", "begin_step", "end_run"):
            hook = functools.partial(relay, getattr(run, name))
            session.attach(pipe, name, "diffcache.run", hook)

    def before_call(self, call: Call) -> None:
        pass

    def after_call(self) -> None:
        pass


DRIVERS = {"scheduler": SchedulerDriver, "timestep": TimestepDriver, "pipeline": PipelineDriver}
