"""The public entry points: accelerate(), remove(), stats()."""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from diffcache import hooks
from diffcache.adapter import Target
from diffcache.errors import (
    AlreadyAcceleratedError,
    DiffCacheError,
    KernelUnavailableError,
    PlanError,
    RunError,
    UnsupportedModelError,
)
from diffcache.plan import Plan
from diffcache.registry import find_adapter, get_method
from diffcache.runstate import RunState, Stats

logger = logging.getLogger(__name__)
SESSION_ATTR = "_diffcache"
RUN_HOOK = "diffcache.run"


@dataclasses.dataclass
class _Session:
    target: Target
    plan: Plan
    run: RunState


def accelerate(model: Any, plan: str | Path | Mapping[str, Any] | Plan) -> Any:
    """Apply ``plan`` to ``model`` (a diffusers pipeline or denoiser) in place; returns ``model``.

    All or nothing: the plan, the model family, the method's requirements and the kernel backend
    are validated before anything is attached, and a failure while attaching detaches everything.
    """
    if getattr(model, SESSION_ATTR, None) is not None:
        raise AlreadyAcceleratedError(
            f"{type(model).__name__} is already accelerated; call diffcache.remove() first."
        )
    plan = Plan.load(plan)
    adapter = find_adapter(model)
    if plan.model != adapter.name:
        raise PlanError(
            f"{plan.source}: model: the plan is for {plan.model!r} but {type(model).__name__} is a "
            f"{adapter.name!r} model; use a plan made for {adapter.name} (`diffcache plans list`)."
        )
    target = Target.resolve(adapter, model)
    target.num_steps_hint = plan.valid_for.get("num_inference_steps")
    for obj in _parts(target):
        if any(n.split(":", 1)[1].startswith("diffcache.") for n in hooks.hook_names(obj)):
            raise AlreadyAcceleratedError(
                f"{type(obj).__name__} is already accelerated through another object sharing it; "
                "call diffcache.remove() on that one first."
            )
    _check_valid_for(plan, target)
    config = plan.config
    reasons = config.not_supported_reasons(target)
    if reasons:
        raise UnsupportedModelError(
            f"method {config.name!r} cannot run on {type(model).__name__}:\n  - "
            + "\n  - ".join(reasons)
        )
    _check_kernels(plan, config, target)

    run = RunState(
        config.name,
        expected_steps=plan.valid_for.get("num_inference_steps"),
        kernels=plan.kernels,
        on_error=lambda: remove(model),
    )
    _, apply = get_method(plan.method)
    try:
        apply(target, config, run)
        _attach_driver(target, run)
        setattr(model, SESSION_ATTR, _Session(target, plan, run))
    except BaseException:
        _detach(target)
        raise
    logger.info(
        "diffcache: %s on %s (%s), kernels=%s",
        config.name,
        type(model).__name__,
        adapter.name,
        plan.kernels,
    )
    return model


def remove(model: Any) -> Any:
    """Detach everything diffcache attached; outputs are then bit-identical to never-accelerated.
    Idempotent."""
    session = model.__dict__.get(SESSION_ATTR)
    if session is not None:
        _detach(session.target)
        delattr(model, SESSION_ATTR)
    return model


def stats(model: Any) -> Stats:
    """Stats of the last call of an accelerated model."""
    session = getattr(model, SESSION_ATTR, None)
    if session is None:
        raise DiffCacheError(
            f"{type(model).__name__} is not accelerated; call "
            "diffcache.accelerate(model, plan) first."
        )
    s = session.run.stats
    return dataclasses.replace(s, calls=list(s.calls), kernels=dict(s.kernels))


def is_accelerated(model: Any) -> bool:
    return getattr(model, SESSION_ATTR, None) is not None


def _parts(target: Target) -> list[Any]:
    return [target.denoiser] + ([target.scheduler] if target.scheduler is not None else [])


def _detach(target: Target) -> None:
    for obj in _parts(target):
        hooks.detach_all(obj)


def _check_valid_for(plan: Plan, target: Target) -> None:
    want = plan.valid_for.get("scheduler")
    if want is None or target.scheduler is None:
        return
    have = type(target.scheduler).__name__
    if have != want:
        raise PlanError(
            f"{plan.source}: valid_for.scheduler: the plan is valid for {want} but the pipeline "
            f"uses {have}; set pipe.scheduler to a {want} or use a plan made for {have}."
        )


def _check_kernels(plan: Plan, config: Any, target: Target) -> None:
    if plan.kernels != "triton" or not config.kernels:
        return
    from diffcache import kernels

    param = next(target.denoiser.parameters(), None)
    probe = torch.empty(
        0,
        device=param.device if param is not None else "cpu",
        dtype=param.dtype if param is not None else torch.float32,
    )
    specs = {op.name: op for op in kernels.ops()}
    reasons = [
        f"{name}: {r}" for name in config.kernels for r in specs[name].not_supported_reasons(probe)
    ]
    if reasons:
        raise KernelUnavailableError(
            f"{plan.source}: kernels: triton cannot run the ops of {config.name!r} on "
            f"{probe.device} {probe.dtype}:\n  - "
            + "\n  - ".join(reasons)
            + "\nUse kernels: auto (falls back to torch) or kernels: torch."
        )


def _attach_driver(target: Target, run: RunState) -> None:
    """Feed run / step boundaries to ``run``: from the scheduler when there is one, else from the
    denoiser's timestep argument (a new step when it changes, a new run when it goes up)."""
    scheduler = target.scheduler
    if scheduler is not None:

        def set_timesteps(call: Any, *args: Any, **kwargs: Any) -> Any:
            out = call(*args, **kwargs)
            run.begin_run(len(scheduler.timesteps))
            return out

        def step(call: Any, *args: Any, **kwargs: Any) -> Any:
            out = call(*args, **kwargs)
            run.end_step()
            return out

        def guard() -> None:
            if getattr(target.pipe, "scheduler", scheduler) is not scheduler:
                raise run.fail(
                    RunError(
                        f"the pipeline's scheduler was replaced after accelerate ({run.where()}); "
                        "call diffcache.remove() and accelerate() again."
                    )
                )

        hooks.attach(scheduler, "set_timesteps", RUN_HOOK, set_timesteps)
        hooks.attach(scheduler, "step", RUN_HOOK, step)
        run.guard = guard
        return

    name = target.adapter.timestep_arg
    params = list(inspect.signature(target.denoiser.forward).parameters)
    pos = params.index(name) if name in params else None
    last: list[float] = []

    def track(call: Any, *args: Any, **kwargs: Any) -> Any:
        t = kwargs.get(name, args[pos] if pos is not None and pos < len(args) else None)
        if t is None:
            raise run.fail(
                RunError(
                    f"{type(target.denoiser).__name__} was called without "
                    f"{name!r}; diffcache needs it to count steps."
                )
            )
        value = float(torch.as_tensor(t).flatten()[0])
        if not run.active or not last or value > last[0]:
            run.begin_run(target.num_steps_hint)
        elif value != last[0]:
            run.end_step()
        last[:] = [value]
        return call(*args, **kwargs)

    hooks.attach(target.denoiser, "forward", RUN_HOOK, track)
