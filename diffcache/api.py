"""The public entry points: accelerate(), remove(), stats(), is_accelerated()."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from diffcache.adapter import Target
from diffcache.calibration import check_fingerprint
from diffcache.drivers import DRIVERS
from diffcache.errors import (
    AlreadyAcceleratedError,
    DiffCacheError,
    PlanError,
    UnsupportedModelError,
)
from diffcache.fewstep import FewStepWarning
from diffcache.hooks import layers
from diffcache.kernels import plan_backend
from diffcache.lora import LoraWatch, check_lora
from diffcache.plan import Plan
from diffcache.registry import find_adapter, get_method
from diffcache.runstate import RunState, Stats
from diffcache.session import Session
from diffcache.weights import WeightsWatch, check_weights

logger = logging.getLogger(__name__)
SESSION_ATTR = "_diffcache"


def accelerate(
    model: Any, plan: str | Path | Mapping[str, Any] | Plan, *, trace: bool = False
) -> Any:
    """Apply ``plan`` to ``model`` (a diffusers pipeline, a bare denoiser or one of our own
    pipelines) in place; returns ``model``. ``trace``: keep every decision of each call in
    ``diffcache.stats(model).trace`` (for debugging a plan; it costs time and memory).

    All or nothing: the plan, the model family, ``valid_for``, the method's requirements and the
    kernel backend are checked before anything is attached, and a failure while attaching
    detaches everything.
    """
    if session_of(model) is not None:
        raise AlreadyAcceleratedError(
            f"{type(model).__name__} is already accelerated; call diffcache.remove() first."
        )
    plan = Plan.load(plan)
    target = resolve(model, plan)
    config = plan.config
    config.check_supported(target, type(model).__name__)
    # an empty tensor on the denoiser's device, in its dtype (a model without weights: CPU float32)
    probe = next(target.denoiser.parameters(), torch.empty(0, dtype=torch.float32)).new_empty(0)
    kernels = plan_backend(plan.kernels, plan.source, config.name, config.kernels, probe)
    run = RunState(
        config.name,
        kind=config.work_kind(),
        valid_for=plan.valid_for,
        kernels=kernels,
        on_error=lambda: remove(model),
        owner=type(model).__name__,
        tracing=trace,
    )
    run.reporters.append(WeightsWatch(target.experts, plan, run).facts)
    run.reporters.append(LoraWatch(target.experts, plan, run, target.pipe).facts)
    run.reporters.append(FewStepWarning(config.steps_problem, run))
    _, apply = get_method(plan.method)
    open_session(model, Session(target, plan, run, plan.calibration_data), apply, config)
    logger.info(
        "diffcache: %s on %s (%s), kernels=%s",
        config.name,
        type(model).__name__,
        target.adapter.name,
        kernels,
    )
    return model


def open_session(model: Any, session: Session, attach: Callable[..., None], *args: Any) -> Session:
    """Attach through ``attach(session, *args)`` (a method's ``apply``, or profiling's probes),
    install the target's driver and keep the session on ``model``: the one way diffcache
    attaches to a model. All or nothing: a failure detaches everything."""
    try:
        attach(session, *args)
        session.install(DRIVERS[session.target.driver]())
        model.__dict__[SESSION_ATTR] = session
    except BaseException:
        session.close()
        raise
    return session


def resolve(model: Any, plan: Plan) -> Target:
    """The model's Target for ``plan``, with every check that needs no attaching."""
    adapter = find_adapter(model)
    plan.check_family(adapter.family, type(model).__name__)
    target = Target.resolve(adapter, model)
    target.valid_for = plan.valid_for
    for obj in (target.root, *target.experts, target.scheduler):
        if layers(obj):
            raise AlreadyAcceleratedError(
                f"{type(obj).__name__} is already accelerated through another object sharing it; "
                "call diffcache.remove() on that one first."
            )
    want = plan.valid_for.get("scheduler")
    if want is not None and target.scheduler is not None:
        have = type(target.scheduler).__name__
        if have != want:
            raise PlanError(
                f"{plan.source}: valid_for.scheduler: the plan is valid for {want} but the "
                f"pipeline uses {have}; set pipe.scheduler to a {want} or use a plan made for "
                f"{have}."
            )
    check_fingerprint(plan, target.experts)
    check_weights(plan, target.experts)
    check_lora(plan, target.experts, target.pipe)
    if target.driver == "timestep" and target.adapter.driver != "scheduler":
        raise UnsupportedModelError(
            f"{type(model).__name__}: pass the whole pipeline; its {target.adapter.driver} "
            "driver tells diffcache where runs and steps begin."
        )
    return target


def remove(model: Any) -> Any:
    """Detach everything diffcache attached; outputs are then bit-identical to never-accelerated.
    Idempotent, and a no-op on anything that is not accelerated."""
    session = session_of(model)
    if session is not None:
        session.close()
        del model.__dict__[SESSION_ATTR]
    return model


def stats(model: Any) -> Stats:
    """Stats of the last call of an accelerated model (a copy)."""
    session = session_of(model)
    if session is None:
        raise DiffCacheError(
            f"{type(model).__name__} is not accelerated; call "
            "diffcache.accelerate(model, plan) first."
        )
    return session.run.stats.copy()


def is_accelerated(model: Any) -> bool:
    return session_of(model) is not None


def session_of(model: Any) -> Session | None:
    """The session ``accelerate`` opened on ``model``, if any."""
    return getattr(model, "__dict__", {}).get(SESSION_ATTR)
