"""``diffcache.variants`` on its own: what :func:`~diffcache.variants.variant` keeps of its base
family, and where :class:`~diffcache.variants.ScheduleStart` starts a run in a schedule trimmed
by ``strength``, on toy loops written the way diffusers pipelines run them (a second-order
schedule, a timestep passed by position, the video-to-video slicing that tells the scheduler
nothing)."""

from __future__ import annotations

import dataclasses

import torch
from diffusers import HeunDiscreteScheduler

import diffcache
from diffcache.adapter import Adapter
from diffcache.api import session_of
from diffcache.registry import adapters
from diffcache.request import Field
from diffcache.testing.toys import Img2ImgScheduler, ToyPipeline
from diffcache.variants import img2img_steps, variant

#: every step is reused once two are computed: the Stats show which steps ran
PLAN = {"diffcache": 1, "model": "toy", "method": "easycache"}
PLAN |= {"options": {"threshold": 1e6, "warmup_steps": 1}}


def test_variant_keeps_the_base_family_but_its_pipelines_fields_and_denoisers() -> None:
    """A variant is its base adapter with another name, pipeline classes and fields, the
    changes asked for, and no bare denoiser classes (those stay matched by the base); all else
    (sites, experts, family: the plans it takes) is the base's."""
    base = adapters()["flux"]
    assert base.denoisers and base.steps_run is None  # so that dropping either shows
    fields = (Field("strength", float, "how much of the schedule runs", "strength"),)
    made = variant(base, "flux-test", ("TestPipeline",), fields, steps_run=img2img_steps)
    changed = {
        "name": "flux-test",
        "pipelines": ("TestPipeline",),
        "denoisers": (),
        "fields": fields,
        "steps_run": img2img_steps,
    }
    for f in dataclasses.fields(Adapter):
        want = changed.get(f.name, getattr(base, f.name))
        assert getattr(made, f.name) == want, f.name
    assert made.family == "flux"


def _loop(pipe: ToyPipeline, timesteps: torch.Tensor, as_float: bool = False) -> None:
    """A denoising loop over ``timesteps``, the timestep passed by position (a Python float
    with ``as_float``)."""
    x = torch.ones(1, 2)
    for t in timesteps:
        v = pipe.transformer(x, float(t) if as_float else t, torch.tensor([1.0])).sample
        x = pipe.scheduler.step(v, t, x)[0]


def _accelerated(scheduler: object, steps: int) -> ToyPipeline:
    pipe = ToyPipeline(cfg="none")
    pipe.scheduler = scheduler
    diffcache.accelerate(pipe, {**PLAN, "valid_for": {"num_inference_steps": steps}})
    return pipe


def test_a_second_order_schedule_trimmed_by_strength_counts_whole_steps() -> None:
    """Heun, 6 steps: 11 scheduler updates (t0, then each later time twice). img2img at
    t_start 2 begins at update 2 x order = 4 and runs the 7 updates left: 4 steps (3 of two
    updates, the last of one), 7 model calls; the run ends after the last of them."""
    scheduler = HeunDiscreteScheduler()
    pipe = _accelerated(scheduler, 4)
    scheduler.set_timesteps(6)
    assert len(scheduler.timesteps) == 11 and scheduler.order == 2
    scheduler.set_begin_index(2 * scheduler.order)
    _loop(pipe, scheduler.timesteps[4:])
    s = diffcache.stats(pipe)
    assert (s.steps, s.model_calls) == (4, 7)
    assert [step for step, _, _ in s.calls] == [0, 0, 1, 1, 2, 2, 3]
    assert not session_of(pipe).run.active, "the run ends after the last update run"
    diffcache.remove(pipe)


class _SlicedHeun:
    """diffusers' Heun scheduler as a video-to-video pipeline uses it: without
    ``set_begin_index``, so only the first call's timestep tells where the run starts."""

    def __init__(self) -> None:
        self.heun = HeunDiscreteScheduler()

    def __getattr__(self, name: str) -> object:
        if name == "set_begin_index":
            raise AttributeError(name)
        return getattr(self.heun, name)


def test_a_second_order_schedule_sliced_without_telling_the_scheduler() -> None:
    """The same 6 Heun steps sliced at t_start x order = 4 (the second of t2's two updates;
    Heun finds its own place from the timestep, the second of two equal ones): 7 updates, 4
    steps, and the run ends after the last update."""
    scheduler = _SlicedHeun()
    pipe = _accelerated(scheduler, 4)
    scheduler.set_timesteps(6)
    assert scheduler.timesteps[3] == scheduler.timesteps[4]  # t2, twice
    _loop(pipe, scheduler.timesteps[4:])
    s = diffcache.stats(pipe)
    assert (s.steps, s.model_calls) == (4, 7)
    assert not session_of(pipe).run.active, "the run ends after the last update run"
    diffcache.remove(pipe)


def test_set_begin_index_without_an_index_runs_the_whole_schedule() -> None:
    """``set_begin_index()`` with no argument is the scheduler's own default, 0: the hook
    passes the call on as it came, and the run counts all its steps."""
    scheduler = Img2ImgScheduler()
    pipe = _accelerated(scheduler, 6)
    scheduler.set_timesteps(6)
    scheduler.set_begin_index()
    assert scheduler.begin_index == 0
    _loop(pipe, scheduler.timesteps)
    assert diffcache.stats(pipe).steps == 6 and not session_of(pipe).run.active
    diffcache.remove(pipe)


def test_a_schedule_sliced_without_telling_the_scheduler_starts_at_the_first_timestep() -> None:
    """Video-to-video pipelines slice the timesteps and tell the scheduler nothing: the first
    call's timestep (here passed by position, as the toy denoiser takes it) is update 3 of 8,
    so 5 steps run and the run ends after the fifth."""
    pipe = ToyPipeline(cfg="none")  # its ToyScheduler has no set_begin_index
    diffcache.accelerate(pipe, {**PLAN, "valid_for": {"num_inference_steps": 5}})
    pipe.scheduler.set_timesteps(8)
    _loop(pipe, pipe.scheduler.timesteps[3:])
    s = diffcache.stats(pipe)
    assert s.steps == 5 and s.per_step() == [1.0, 1.0, 0.0, 0.0, 1.0], s.per_step()
    assert not session_of(pipe).run.active
    diffcache.remove(pipe)


def test_a_timestep_that_is_not_a_tensor_is_not_looked_up() -> None:
    """A denoiser called with a Python float timestep: nothing to find in the schedule, and
    the whole schedule runs."""
    pipe = ToyPipeline(cfg="none")
    diffcache.accelerate(pipe, {**PLAN, "valid_for": {"num_inference_steps": 4}})
    pipe.scheduler.set_timesteps(4)
    _loop(pipe, pipe.scheduler.timesteps, as_float=True)
    assert diffcache.stats(pipe).steps == 4 and not session_of(pipe).run.active
    diffcache.remove(pipe)
