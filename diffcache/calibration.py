"""Calibration: what the offline side of the methods shares with the profiler.

A method that calibrates keeps its offline side in ``methods/<name>_calibrate.py`` and registers
it with :func:`register_calibrator`; the profiler and ``MethodConfig`` find it with
:func:`calibrator`. :func:`make_plan` turns a calibration into a plan and :func:`round_to` makes a
fitted knob readable. ``accelerate`` needs none of this.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from diffcache.options import to_plain
from diffcache.plan import Plan
from diffcache.registry import methods

if TYPE_CHECKING:
    from diffcache.adapter import Target

_CALIBRATORS: dict[str, Calibrator] = {}


@dataclasses.dataclass(frozen=True)
class Calibrator:
    """A method's offline side, kept in its ``<name>_calibrate`` module (the runtime never
    imports it): ``calibrate(config, profiling)`` makes the plan's config and calibration, and
    ``observer(config, target)``, if given, records during the profiler's plain trace run."""

    calibrate: Callable
    observer: Callable | None = None


def register_calibrator(config_cls: type, observer: Callable | None = None) -> Callable:
    """Bind ``calibrate(config, profiling)`` (and ``observer``) to a registered method."""

    def decorator(calibrate: Callable) -> Callable:
        name = config_cls.name
        if methods().get(name) is not config_cls:
            raise ValueError(f"method {name!r}: register the method before its calibrator")
        if name in _CALIBRATORS:
            raise ValueError(f"method {name!r}: calibrator registered twice")
        _CALIBRATORS[name] = Calibrator(calibrate, observer)
        return calibrate

    return decorator


def calibrator(name: str) -> Calibrator | None:
    """The registered calibrator of method ``name`` (None: it has no calibration module)."""
    return _CALIBRATORS.get(name)


def make_plan(target: Target, config: Any, calibration: Any, valid_for: Mapping[str, Any]) -> Plan:
    """A plan for ``target`` with these options and calibration (fingerprinted if calibrated)."""
    plain, tensors = split_calibration(calibration)
    valid = dict(valid_for)
    if calibration is not None:
        valid["fingerprint"] = target.fingerprint()
    return Plan(
        model=target.adapter.name,
        method=config.name,
        options=config.to_options(),
        valid_for=valid,
        calibration=plain,
        tensors=tensors,
    )


def split_calibration(calibration: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A calibration dataclass as (plain fields, tensors for the sidecar)."""
    if calibration is None:
        return {}, {}
    hints = typing.get_type_hints(type(calibration))
    plain, tensors = {}, {}
    for f in dataclasses.fields(calibration):
        value = getattr(calibration, f.name)
        if hints[f.name] is torch.Tensor:
            tensors[f.name] = value.detach().cpu().contiguous()
        else:
            plain[f.name] = to_plain(value)
    return plain, tensors


def round_to(x: float, digits: int = 3, down: bool = False) -> float:
    """``x`` rounded up (or ``down``) to ``digits`` significant digits."""
    unit = 10 ** (math.floor(math.log10(x)) - digits + 1)
    whole = math.floor(x / unit) if down else math.ceil(x / unit)
    return float(f"{whole * unit:.{digits}g}")
