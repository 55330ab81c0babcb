"""Pipeline variants: one family's denoisers run by other pipeline classes (img2img, inpaint,
image-to-video, video-to-video ...), and the steps a request denoises where ``strength`` trims
the schedule.

- :func:`variant` makes a variant's adapter from its base family's: the same sites, the base
  family's plans (``Adapter.family``), other pipeline classes and request fields.
- :func:`img2img_steps` and :func:`video_to_video_steps` are diffusers' two roundings of
  ``strength`` (a variant's ``Adapter.steps_run``); :func:`steps_run` applies a family's rule to
  a request's values, so a plan's ``num_inference_steps`` is checked against the steps that run.
- :class:`ScheduleStart` finds where a run starts in a schedule trimmed by ``strength`` and
  counts the steps that run (the scheduler driver asks it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch

from diffcache.adapter import Adapter
from diffcache.request import Field
from diffcache.session import Call, Session


def variant(
    base: Adapter, name: str, pipelines: tuple[str, ...], fields: tuple[Field, ...], **changes: Any
) -> Adapter:
    """``base``'s family run by other pipeline classes taking other request fields (img2img,
    image-to-video ...): same denoisers' sites, same plans; bare denoisers stay matched by
    ``base``. ``changes``: other fields that differ (``steps_run``)."""
    return dataclasses.replace(
        base, name=name, pipelines=pipelines, denoisers=(), fields=fields, **changes
    )


def img2img_steps(steps: int, strength: float) -> int:
    """The steps an img2img / inpaint pipeline runs: the last ``strength`` x ``steps`` of its
    schedule, rounded as diffusers' ``get_timesteps``."""
    return steps - int(max(steps - min(steps * strength, steps), 0))


def video_to_video_steps(steps: int, strength: float) -> int:
    """The steps the Wan / CogVideoX video-to-video pipelines run: the last
    ``int(strength x steps)`` of the schedule."""
    return min(int(steps * strength), steps)


def steps_run(adapter: Adapter | None, values: Mapping[str, Any]) -> int | None:
    """The steps a request with ``values`` denoises on ``adapter``'s family, where its
    ``strength`` trims the schedule (``Adapter.steps_run``); None where the family has no such
    rule or the request sets no ``steps`` or no ``strength``."""
    steps, strength = values.get("steps"), values.get("strength")
    if adapter is None or adapter.steps_run is None or steps is None or strength is None:
        return None
    return adapter.steps_run(steps, strength)


class ScheduleStart:
    """Where a run starts in the scheduler's schedule: ``set_begin_index`` says it for a
    schedule trimmed by ``strength`` (img2img), and so does the first denoiser call's timestep
    for pipelines that slice the timesteps without telling the scheduler (Wan and CogVideoX
    video-to-video). The run's ``num_steps`` becomes the steps that run, and :attr:`updates`
    the scheduler updates it makes."""

    def __init__(self, session: Session) -> None:
        self.session = session
        t = session.target
        self.time_arg, self.time_index = t.adapter.timestep_arg, t.arg_index(t.adapter.timestep_arg)
        self.updates = 0  # scheduler updates this run makes
        self.total = self.steps = self.order = 0  # of the whole schedule set by set_timesteps
        self.started = False  # the run's first denoiser call was seen
        if hasattr(t.scheduler, "set_begin_index"):
            session.attach(t.scheduler, "set_begin_index", "diffcache.run", self._set_begin_index)

    def reset(self, updates: int, order: int, steps: int) -> None:
        """``set_timesteps`` made a schedule of ``updates`` scheduler updates (of ``order``
        each step) and ``steps`` steps: the run makes all of them unless it starts later."""
        self.updates = self.total = updates
        self.order, self.steps, self.started = order, steps, False

    def first_call(self, call: Call) -> None:
        """At a denoiser call: the run's first one finds where its timestep is in the schedule."""
        run = self.session.run
        if not run.active or self.started:
            return
        self.started = True
        t = call.arg(self.time_arg, self.time_index)
        if isinstance(t, torch.Tensor) and t.numel():
            times = self.session.target.scheduler.timesteps
            at = (times.to(t.device, torch.float64) == t.flatten().max().double()).nonzero()
            if len(at) and run.num_steps is not None:  # the last match: a second-order
                self._begin_at(int(at[-1]))  # schedule has each later time twice, and a
                # slice at t_start x 2 starts at the second of them

    def _set_begin_index(self, call: Any, begin_index: int = 0, *args: Any, **kwargs: Any) -> Any:
        out = call(begin_index, *args, **kwargs)
        run = self.session.run
        if run.active and run.num_steps is not None:  # a schedule trimmed by strength
            self._begin_at(begin_index)
        return out

    def _begin_at(self, index: int) -> None:
        """The run starts at scheduler update ``index`` of the schedule (0: all of it)."""
        self.updates = self.total - index
        self.session.run.num_steps = self.steps - math.ceil(index / self.order)
