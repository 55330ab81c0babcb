"""The error hierarchy. Every message names the subject, the problem and the remedy (a
mistyped name: the close one, :func:`did_you_mean`)."""

from __future__ import annotations

import difflib
from typing import Any


class DiffCacheError(Exception):
    """Base class of every error diffcache raises on purpose."""


class PlanError(DiffCacheError, ValueError):
    """A plan file or plan dict is malformed, or does not fit the model or the call."""


class UnsupportedModelError(DiffCacheError, TypeError):
    """No adapter matches the model, or the method cannot run on it."""


class TargetUnreachable(DiffCacheError):
    """A compute target below the least that a method's fixed options allow (``least``)."""

    def __init__(self, message: str, least: float) -> None:
        super().__init__(message)
        self.least = least


class KernelUnavailableError(DiffCacheError, NotImplementedError):
    """An explicitly requested kernel backend cannot run on the given inputs."""


class AlreadyAcceleratedError(DiffCacheError, RuntimeError):
    """``accelerate`` on a model (or a shared component) that is already accelerated."""


class RunError(DiffCacheError, RuntimeError):
    """A mid-run inconsistency (NaN in a cached tensor, a shape change between steps).

    The accelerated model is cleaned (all hooks removed) before this is raised.
    """


def did_you_mean(word: str, choices: Any) -> str:
    """`` (did you mean 'x'?)`` when a close match exists, else ``''``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def outside_valid_for(key: str, want: Any, given: Any) -> str:
    """The problem of a call whose ``key`` is ``given`` where the plan's ``valid_for`` says
    ``want``."""
    if key == "num_inference_steps":
        return steps_mismatch(want, given)
    return (
        f"the plan is valid for {key}={want!r} but this call has {key}={given!r} (valid_for.{key})"
    )


def strength_runs(actual: int, scheduled: int | None) -> str:
    """`` (strength runs A of its num_inference_steps=S)`` where ``strength`` made the call run
    fewer steps than it scheduled (img2img, video-to-video), else ""."""
    if scheduled is None or scheduled == actual:
        return ""
    return f" (strength runs {actual} of its num_inference_steps={scheduled})"


def steps_mismatch(expected: int, actual: int, scheduled: int | None = None) -> str:
    """The problem of a call outside the plan's ``valid_for.num_inference_steps``: it runs
    ``actual`` steps, of the ``scheduled`` steps it set (:func:`strength_runs`)."""
    fix = f"use a plan made for {actual} (valid_for.num_inference_steps)"
    if strength := strength_runs(actual, scheduled):
        return (
            f"the plan is valid for num_inference_steps={expected} but this call runs {actual} "
            f"steps{strength}; set "
            f"num_inference_steps and strength so that they run {expected}, or {fix}"
        )
    return (
        f"the plan is valid for num_inference_steps={expected} but this call runs {actual} steps; "
        f"run with {expected} steps or {fix}"
    )


def steps_past(expected: int | None) -> str:
    """The problem of a bare denoiser's run that goes on past the plan's step count."""
    return (
        f"the plan is valid for num_inference_steps={expected} but this run goes on past step "
        f"{expected} (valid_for.num_inference_steps)"
    )


def steps_short(expected: int, ran: int) -> str:
    """The problem of a bare denoiser's run that stopped before the plan's step count."""
    return (
        f"the plan is valid for num_inference_steps={expected} but the last run stopped after "
        f"{ran} steps (valid_for.num_inference_steps)"
    )
