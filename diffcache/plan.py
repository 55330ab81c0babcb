"""Plan: strict load / validate / save of plan files (schema in DESIGN.md §3)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from diffcache.errors import PlanError
from diffcache.registry import did_you_mean, get_method

SCHEMA_VERSION = 1
KEYS = (
    "diffcache",
    "model",
    "method",
    "options",
    "valid_for",
    "calibration",
    "kernels",
    "provenance",
)
REQUIRED = ("diffcache", "model", "method")
VALID_FOR = {"num_inference_steps": int, "scheduler": str}
KERNEL_CHOICES = ("auto", "torch", "triton")


def bundled_plans() -> dict[str, Path]:
    """Plan files shipped in ``diffcache.profiles`` (name -> path); ``models.yaml`` is no plan."""
    root = resources.files("diffcache.profiles")
    return {
        p.name: Path(str(p))
        for p in sorted(root.iterdir(), key=lambda p: p.name)
        if p.name.endswith(".yaml") and p.name != "models.yaml"
    }


@dataclasses.dataclass(frozen=True)
class Plan:
    """One validated plan. Build it with ``Plan.load`` (path, bundled name, dict or Plan)."""

    model: str
    method: str
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    valid_for: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    calibration: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    kernels: str = "auto"
    provenance: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    source: str = dataclasses.field(default="<dict>", compare=False)

    def __post_init__(self) -> None:
        for name in ("options", "valid_for", "calibration", "provenance"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))
        self.config  # validate options now, so a Plan is always usable  # noqa: B018

    @functools.cached_property
    def config(self) -> Any:
        """The method's MethodConfig built from ``options`` (defaults for absent keys)."""
        cls, _ = get_method(self.method, f"{self.source}: method")
        return cls.from_options(self.options, f"{self.source}: options")

    @property
    def name(self) -> str:
        return Path(self.source).name if self.source != "<dict>" else f"{self.model}-{self.method}"

    @classmethod
    def load(cls, plan: str | Path | Mapping[str, Any] | Plan) -> Plan:
        """Load from a Plan, a dict, a file path, or the name of a bundled plan."""
        if isinstance(plan, Plan):
            return plan
        if isinstance(plan, Mapping):
            return cls.from_dict(plan)
        if not isinstance(plan, (str, Path)):
            raise PlanError(
                f"plan must be a path, a bundled plan name, a dict or a Plan, got "
                f"{type(plan).__name__}"
            )
        path = Path(plan)
        if not path.is_file():
            bundled = bundled_plans()
            if path.name in bundled and path.name == str(plan):
                path = bundled[path.name]
            else:
                raise PlanError(
                    f"{plan}: no such plan file{did_you_mean(path.name, bundled)}; bundled plans: "
                    f"{', '.join(bundled)} (see `diffcache plans list`)."
                )
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise PlanError(f"{path}: not valid YAML: {e}") from e
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> Plan:
        if not isinstance(data, Mapping):
            raise PlanError(f"{source}: a plan is a mapping of {', '.join(KEYS)}")
        problems = [
            f"{source}: {key}: unknown key{did_you_mean(str(key), KEYS)}; "
            f"allowed: {', '.join(KEYS)}"
            for key in data
            if key not in KEYS
        ]
        problems += [
            f"{source}: {key}: required key is missing" for key in REQUIRED if key not in data
        ]
        if problems:
            raise PlanError("\n".join(problems))
        version = data["diffcache"]
        if version != SCHEMA_VERSION or isinstance(version, bool):
            raise PlanError(
                f"{source}: diffcache: schema version {version!r} is not supported "
                f"(this diffcache reads version {SCHEMA_VERSION})."
            )
        for key in ("model", "method"):
            if not isinstance(data[key], str) or not data[key]:
                raise PlanError(f"{source}: {key}: expected a non-empty string, got {data[key]!r}")
        for key in ("options", "valid_for", "calibration", "provenance"):
            if not isinstance(data.get(key, {}) or {}, Mapping):
                raise PlanError(f"{source}: {key}: expected a mapping, got {data[key]!r}")
        kernels = data.get("kernels", "auto")
        if kernels not in KERNEL_CHOICES:
            raise PlanError(
                f"{source}: kernels: {kernels!r} is not one of {', '.join(KERNEL_CHOICES)}"
                f"{did_you_mean(str(kernels), KERNEL_CHOICES)}"
            )
        valid_for = dict(data.get("valid_for") or {})
        _check_valid_for(valid_for, source)
        config_cls, _ = get_method(data["method"], f"{source}: method")
        calibration = dict(data.get("calibration") or {})
        config_cls.check_calibration(calibration, f"{source}: calibration")
        return cls(
            model=data["model"],
            method=data["method"],
            options=dict(data.get("options") or {}),
            valid_for=valid_for,
            calibration=calibration,
            kernels=kernels,
            provenance=dict(data.get("provenance") or {}),
            source=source,
        )

    def to_dict(self) -> dict[str, Any]:
        """The plan as plain data, in schema order; empty optional sections are left out."""
        out: dict[str, Any] = {
            "diffcache": SCHEMA_VERSION,
            "model": self.model,
            "method": self.method,
        }
        for key in ("options", "valid_for", "calibration"):
            if getattr(self, key):
                out[key] = _plain(getattr(self, key))
        out["kernels"] = self.kernels
        if self.provenance:
            out["provenance"] = _plain(self.provenance)
        return out

    def dumps(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False, width=100)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.dumps())
        return path

    def sidecar(self) -> dict[str, Any]:
        """Tensors of the calibration sidecar (``calibration.sidecar``: a .safetensors file named
        relative to the plan file)."""
        name = self.calibration.get("sidecar")
        if not name:
            raise PlanError(f"{self.source}: calibration.sidecar: the plan names no sidecar file")
        path = Path(self.source).parent / name
        if not path.is_file():
            raise PlanError(
                f"{self.source}: calibration.sidecar: {path} does not exist; re-run "
                "the profile command that wrote this plan."
            )
        from safetensors.torch import load_file

        return load_file(str(path))


def steps_mismatch(expected: int, actual: int) -> PlanError:
    """The error for a call outside the plan's ``valid_for.num_inference_steps``."""
    return PlanError(
        f"plan is valid for num_inference_steps={expected} but this call runs {actual} steps; "
        f"run with {expected} steps or use a plan made for {actual} "
        "(valid_for.num_inference_steps)."
    )


def _check_valid_for(valid_for: dict[str, Any], source: str) -> None:
    problems = []
    for key, value in valid_for.items():
        if key not in VALID_FOR:
            problems.append(
                f"{source}: valid_for.{key}: unknown key{did_you_mean(str(key), VALID_FOR)}"
                f"; allowed: {', '.join(VALID_FOR)}"
            )
        elif not isinstance(value, VALID_FOR[key]) or isinstance(value, bool):
            problems.append(
                f"{source}: valid_for.{key}: expected {VALID_FOR[key].__name__}, got {value!r}"
            )
        elif key == "num_inference_steps" and value < 1:
            problems.append(f"{source}: valid_for.num_inference_steps: must be >= 1, got {value}")
    if problems:
        raise PlanError("\n".join(problems))


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
