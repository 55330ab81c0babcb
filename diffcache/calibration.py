"""Calibration: the offline side of the methods, and the calibration data of a plan.

A method that calibrates keeps its offline side in ``methods/<name>_calibrate.py`` and registers
it with :func:`register_calibrator`; the profiler and ``MethodConfig`` find it with
:func:`calibrator`, and :func:`round_to` makes a fitted knob readable. A calibration dataclass
goes into a plan as plain fields plus tensors (:func:`split_calibration`), the tensors in a
``.safetensors`` sidecar beside the plan file whose sha256 the plan records
(:func:`write_sidecar`); loading a plan reads and checks them back (:func:`read_sidecar`,
:func:`read_calibration`). A calibration is valid for the model it was measured on: its
:func:`fingerprint` (``valid_for.fingerprint``, checked by :func:`check_fingerprint`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from diffcache.compiled import unwrap
from diffcache.errors import PlanError, did_you_mean
from diffcache.options import coerce, to_plain
from diffcache.registry import methods

#: the key of a plan's ``calibration`` that names its sidecar: ``{file, sha256}``
SIDECAR = "sidecar"

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


def read_calibration(
    config_cls: Any, data: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], source: str
) -> Any:
    where = f"{source}: calibration"
    schema = config_cls.calibration
    if schema is None:
        if data or tensors:
            raise PlanError(f"{where}: method {config_cls.name!r} takes no calibration; remove it.")
        return None
    if not data and not tensors:
        hint = config_cls.profile_hint()
        if source != "<dict>":  # a template: start from its options
            hint = hint.replace(f"--method {config_cls.name}", f"--from {Path(source).name}")
        raise PlanError(
            f"{where}: method {config_cls.name!r} needs calibration data and the plan has none; "
            f"make it with: {hint}"
        )
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    wanted = {n for n in fields if hints[n] is torch.Tensor}
    problems = [
        f"{where}.{k}: unknown field{did_you_mean(str(k), fields)}; known: {', '.join(fields)}"
        for k in data
        if k not in fields or k in wanted
    ]
    problems += [f"{where}.{SIDECAR}: missing tensor {n!r}" for n in sorted(wanted - set(tensors))]
    problems += [
        f"{where}.{SIDECAR}: unexpected tensor {n!r}" for n in sorted(set(tensors) - wanted)
    ]
    values: dict[str, Any] = {n: tensors[n] for n in wanted & set(tensors)}
    for name, f in fields.items():
        if name in wanted:
            continue
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                problems.append(f"{where}.{name}: required key is missing")
            continue
        try:
            values[name] = coerce(data[name], hints[name], f"{where}.{name}", f.metadata)
        except PlanError as e:
            problems.append(str(e))
    if problems:
        raise PlanError("\n".join(problems))
    return schema(**values)


def write_sidecar(tensors: Mapping[str, torch.Tensor], path: Path) -> dict[str, str]:
    """Write ``tensors`` to the sidecar of the plan file ``path`` (``<stem>.safetensors`` beside
    it); the ``{file, sha256}`` the plan records."""
    from safetensors.torch import save

    blob = save({k: v.contiguous() for k, v in sorted(tensors.items())})
    side = path.with_suffix(".safetensors")
    side.write_bytes(blob)
    return {"file": side.name, "sha256": hashlib.sha256(blob).hexdigest()}


def read_sidecar(info: Any, source: str) -> dict[str, torch.Tensor]:
    """The tensors of the sidecar a plan's ``calibration.sidecar`` names (``info``), refused
    unless it lies beside the plan ``source`` and has the recorded sha256."""
    where = f"{source}: calibration.{SIDECAR}"
    if not isinstance(info, Mapping) or set(info) != {"file", "sha256"}:
        raise PlanError(f"{where}: expected {{file: NAME.safetensors, sha256: HEX}}, got {info!r}")
    path = _sidecar_path(str(info["file"]), source, where)
    if not path.is_file():
        raise PlanError(
            f"{where}: {path} does not exist; keep the sidecar beside the plan file or re-run the "
            "profile command that wrote this plan."
        )
    blob = path.read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != info["sha256"]:
        raise PlanError(
            f"{where}: {path.name} has sha256 {digest[:12]}… but the plan records "
            f"{str(info['sha256'])[:12]}…; the sidecar was changed or belongs to another plan."
        )
    from safetensors.torch import load

    try:
        return load(blob)
    except Exception as e:  # a corrupt file with the recorded hash: written by something else
        raise PlanError(f"{where}: {path.name} is not a safetensors file ({e})") from e


def _sidecar_path(name: str, source: str, where: str) -> Path:
    """The sidecar file ``name`` of the plan ``source``, refused unless it lies inside the
    plan's folder (no absolute path, no ``..`` or symlink out of it), before anything is read."""
    folder = Path(source).parent.resolve()
    path = (folder / name).resolve()
    if Path(name).is_absolute() or not path.is_relative_to(folder):
        raise PlanError(
            f"{where}: file {name!r} is outside the plan's folder {folder}; a sidecar is named "
            "relative to the plan and kept beside it"
        )
    return path


def fingerprint(experts: Sequence[torch.nn.Module]) -> str:
    """Denoiser class(es) + a hash of their configuration: what calibration is valid for."""
    parts = []
    for module in map(unwrap, experts):
        config = getattr(module, "config", None)
        if isinstance(config, Mapping):  # "_" keys are bookkeeping, and diffusers'
            # _use_default_values comes from a set: its order differs between processes
            data = {k: v for k, v in config.items() if not str(k).startswith("_")}
            data.pop("quantization_config", None)  # the weights' storage: valid_for.weights
        else:
            data = {k: list(v.shape) for k, v in module.state_dict().items()}
        blob = json.dumps(data, sort_keys=True, default=str).encode()
        parts.append(f"{type(module).__name__}:{hashlib.sha256(blob).hexdigest()[:12]}")
    return "+".join(parts)


def check_fingerprint(plan: Any, experts: Sequence[torch.nn.Module]) -> None:
    """Refuse ``plan`` (PlanError) if its calibration was made for another model than
    ``experts`` (``valid_for.fingerprint``)."""
    want = plan.valid_for.get("fingerprint")
    if want is not None and want != fingerprint(experts):
        raise PlanError(
            f"{plan.source}: valid_for.fingerprint: the plan's calibration was made for {want} but "
            f"this model is {fingerprint(experts)}; profile this model "
            f"({type(plan.config).profile_hint()})."
        )
