"""Plan: strict load / validate / save of plan files (schema in DESIGN.md §3).

A plan is one YAML file, plus an optional ``.safetensors`` sidecar beside it holding the
calibration's tensors (read, checked and written by ``diffcache.calibration``). Everything is
validated when a plan is built: keys, types, ranges, the method's options together with
``valid_for``, and the calibration against the method's calibration dataclass.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import torch

from diffcache.calibration import SIDECAR, read_calibration, read_sidecar, write_sidecar
from diffcache.display import format_options
from diffcache.errors import PlanError, did_you_mean
from diffcache.options import coerce, to_plain
from diffcache.profiles import bundled_plan
from diffcache.registry import adapters, get_method
from diffcache.yamlio import dump_yaml, read_yaml

SCHEMA_VERSION = 1
#: valid_for keys every plan may carry; adapters (``Adapter.valid_for``) and methods
#: (``MethodConfig.valid_for_keys``) declare more.
VALID_FOR: dict[str, type] = {"num_inference_steps": int, "fingerprint": str, "weights": str}
#: what plans for a family with a scheduler (every driver but our own pipelines') may carry;
#: ``lora``: the hash of the LoRA adapters on the denoiser (``diffcache.lora``), or ``none``
SCHEDULED: dict[str, type] = {"scheduler": str, "lora": str}


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlanFile:
    """A plan file's top-level keys and their types, in schema order (checked by ``coerce``)."""

    diffcache: int
    model: str
    method: str
    options: Mapping | None = None
    valid_for: Mapping | None = None
    calibration: Mapping | None = None
    kernels: Literal["auto", "torch", "triton"] = "auto"
    provenance: Mapping | None = None

    def __post_init__(self) -> None:
        if self.diffcache != SCHEMA_VERSION:
            raise ValueError(
                f"diffcache: schema version {self.diffcache} is not supported (this diffcache "
                f"reads version {SCHEMA_VERSION})."
            )


@dataclasses.dataclass(frozen=True)
class Plan:
    """One validated plan. Build it with ``Plan.load`` (path, bundled name, dict or Plan).

    ``calibration`` holds the plain calibration fields, ``tensors`` the sidecar's tensors and
    ``sidecar`` the sidecar's ``{file, sha256}`` once it exists on disk.
    """

    model: str
    method: str
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    valid_for: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    calibration: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    kernels: str = "auto"
    provenance: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    tensors: Mapping[str, torch.Tensor] = dataclasses.field(default_factory=dict, compare=False)
    sidecar: Mapping[str, str] = dataclasses.field(default_factory=dict, compare=False)
    source: str = dataclasses.field(default="<dict>", compare=False)
    template: bool = dataclasses.field(default=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("options", "valid_for", "calibration", "provenance", "tensors", "sidecar"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))
        problems = self.config.plan_problems(self.valid_for)
        if problems:
            raise PlanError("\n".join(f"{self.source}: {p}" for p in problems))
        if not self.is_template:
            self.calibration_data  # validate now, so a Plan is always usable  # noqa: B018

    @property
    def is_template(self) -> bool:
        """Loaded with ``template=True`` and lacking the calibration its method needs: published
        options to start ``diffcache profile --from`` with, not a plan to run."""
        return (
            self.template
            and self.config.calibration is not None
            and not (self.calibration or self.tensors)
        )

    @functools.cached_property
    def config(self) -> Any:
        """The method's MethodConfig built from ``options`` (defaults for absent keys)."""
        cls, _ = get_method(self.method, f"{self.source}: method")
        return cls.from_options(self.options, f"{self.source}: options")

    @functools.cached_property
    def calibration_data(self) -> Any:
        """The method's calibration dataclass (plain fields + sidecar tensors), or None."""
        return read_calibration(type(self.config), self.calibration, self.tensors, self.source)

    def check_family(self, family: str, what: str) -> None:
        """PlanError unless the plan is for ``family`` (``what``: the model, for the message)."""
        if self.model != family:
            raise PlanError(
                f"{self.source}: model: the plan is for {self.model!r} but {what} is a {family!r} "
                f"model; use a plan made for {family} (`diffcache plans list`)."
            )

    @property
    def name(self) -> str:
        """The file name, or for a plan made in memory its family, method and options."""
        if self.source != "<dict>":
            return Path(self.source).name
        options = format_options(self.options, ",")
        return f"{self.model}-{self.method}" + (f"({options})" if options else "")

    @classmethod
    def load(cls, plan: str | Path | Mapping[str, Any] | Plan, template: bool = False) -> Plan:
        """Load from a Plan, a dict, a file path, or the name of a bundled plan; with
        ``template`` a calibrated method's plan may lack its calibration (see ``is_template``)."""
        if isinstance(plan, Plan):
            return plan
        if isinstance(plan, Mapping):
            return cls.from_dict(plan, template=template)
        if not isinstance(plan, (str, Path)):
            raise PlanError(
                f"plan must be a path, a bundled plan name, a dict or a Plan, got "
                f"{type(plan).__name__}"
            )
        path = Path(plan)
        if not path.exists():
            path = bundled_plan(str(plan))
        return cls.from_dict(read_yaml(path), source=str(path), template=template)

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>", template: bool = False) -> Plan:
        """Validate plain plan data (as read from YAML); every problem names ``source``."""
        if not isinstance(data, Mapping):
            keys = ", ".join(f.name for f in dataclasses.fields(PlanFile))
            raise PlanError(f"{source}: a plan is a mapping of {keys}")
        try:
            top = coerce(data, PlanFile, "")
        except PlanError as e:
            raise PlanError("\n".join(f"{source}: {p}" for p in str(e).splitlines())) from None
        if top.model not in adapters():
            raise PlanError(
                f"{source}: model: unknown model family {top.model!r}"
                f"{did_you_mean(top.model, adapters())}; known: {', '.join(adapters())}."
            )
        config_cls, _ = get_method(top.method, f"{source}: method")
        valid_for = dict(top.valid_for or {})
        _check_valid_for(valid_for, top.model, config_cls, source)
        calibration = dict(top.calibration or {})
        sidecar = calibration.pop(SIDECAR, None)
        tensors = read_sidecar(sidecar, source) if sidecar is not None else {}
        return cls(
            model=top.model,
            method=top.method,
            options=dict(top.options or {}),
            valid_for=valid_for,
            calibration=calibration,
            kernels=top.kernels,
            provenance=dict(top.provenance or {}),
            tensors=tensors,
            sidecar=dict(sidecar or {}),
            source=source,
            template=template,
        )

    def to_dict(self) -> dict[str, Any]:
        """The plan as plain data, in schema order; empty optional sections are left out."""
        out: dict[str, Any] = {
            "diffcache": SCHEMA_VERSION,
            "model": self.model,
            "method": self.method,
        }
        for key in ("options", "valid_for"):
            if getattr(self, key):
                out[key] = to_plain(getattr(self, key))
        if self.calibration or self.tensors:
            out["calibration"] = to_plain(self.calibration)
            if self.tensors:
                out["calibration"][SIDECAR] = dict(self.sidecar) or {"file": "(not saved yet)"}
        out["kernels"] = self.kernels
        if self.provenance:
            out["provenance"] = to_plain(self.provenance)
        return out

    def dumps(self) -> str:
        return dump_yaml(self.to_dict())

    def save(self, path: str | Path) -> Path:
        """Write the plan (and its sidecar ``<stem>.safetensors`` beside it, if it has tensors)."""
        path = Path(path)
        plan = self
        if self.tensors:
            info = write_sidecar(self.tensors, path)
            plan = dataclasses.replace(self, sidecar=info, source=str(path))
        path.write_text(plan.dumps())
        return path


def _check_valid_for(valid_for: dict[str, Any], family: str, config_cls: Any, source: str) -> None:
    """Refuse every ``valid_for`` key a plan for ``family`` with this method cannot carry (it
    may carry the core's, ``SCHEDULED`` where the family has a scheduler, and those the adapter
    and method add) and every value of the wrong type, under 1 or empty."""
    adapter = adapters()[family]
    scheduled = SCHEDULED if adapter.driver != "pipeline" else {}
    allowed = {**VALID_FOR, **scheduled, **adapter.valid_for, **config_cls.valid_for_keys}
    problems = []
    for key, value in valid_for.items():
        where = f"{source}: valid_for.{key}"
        if key not in allowed:
            problems.append(
                f"{where}: {family} plans have no such key{did_you_mean(str(key), allowed)}; "
                f"allowed: {', '.join(allowed)}"
            )
        elif not isinstance(value, allowed[key]) or isinstance(value, bool):
            problems.append(f"{where}: expected {allowed[key].__name__}, got {value!r}")
        elif isinstance(value, int) and value < 1:
            problems.append(f"{where}: must be >= 1, got {value}")
        elif isinstance(value, str) and not value.strip():
            problems.append(f"{where}: must not be empty")
    if problems:
        raise PlanError("\n".join(problems))
