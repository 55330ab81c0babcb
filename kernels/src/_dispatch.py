"""Backend selection for the fused kernels.

Every op has a torch reference and, where Triton can run, a Triton kernel. Callers pass
``backend="auto" | "torch" | "triton"``:

* ``torch`` always runs the reference.
* ``triton`` runs the kernel or raises :class:`KernelUnavailableError` listing every reason.
* ``auto`` runs the kernel only on CUDA tensors it supports (never the interpreter), else the
  reference; the reasons are logged once per op at INFO.

Each op also takes ``record``: a mapping where it writes ``record[op name] = "torch" | "triton"``,
the backend that ran (an accelerated model passes its run's ``Stats.kernels``). Nothing about a
call is kept in this module.

The environment variable ``DIFFCACHE_KERNELS`` (``torch`` | ``triton`` | ``auto``) overrides
``auto`` calls. It is a debugging and CI knob, not a configuration surface.

``TRITON_INTERPRET`` is read once, when this module is imported: ``@triton.jit`` reads it when
it decorates, so the kernels are interpreted exactly when it was set at import time.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

import torch

from diffcache.errors import KernelUnavailableError

try:  # the one guarded import of Triton; kernel modules take ``triton`` / ``tl`` from here
    import triton
    import triton.language as tl
except Exception as _exc:  # ImportError, or a broken install failing on import
    triton = None
    tl = None
    _TRITON_IMPORT_ERROR: str | None = f"{type(_exc).__name__}: {_exc}"
else:
    _TRITON_IMPORT_ERROR = None

logger = logging.getLogger(__name__)

ENV_OVERRIDE = "DIFFCACHE_KERNELS"

# Dtypes the Triton interpreter can run on CPU: it has no bf16 arithmetic.
INTERPRETER_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16)


class Backend(str, Enum):
    """Which implementation of an op runs."""

    AUTO = "auto"
    TORCH = "torch"
    TRITON = "triton"


def _read_interpret_env() -> bool:
    """Return whether ``TRITON_INTERPRET`` is on, as Triton itself reads it."""
    if triton is not None:
        try:
            return bool(triton.knobs.runtime.interpret)
        except Exception:  # older Triton without knobs
            pass
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


_INTERPRET_AT_IMPORT = _read_interpret_env()


def _triton_import_error() -> str | None:
    """Return why ``import triton`` failed, or None when it imported."""
    return _TRITON_IMPORT_ERROR


def _interpret_enabled() -> bool:
    """Return whether the kernels were defined under the Triton interpreter."""
    return _INTERPRET_AT_IMPORT


def _cuda_available() -> bool:
    """Return whether torch sees a CUDA device."""
    return torch.cuda.is_available()


def triton_status() -> list[str]:
    """List the reasons Triton cannot run at all on this machine (empty when it can).

    Returns:
        Human-readable reasons: Triton not importable; no CUDA device and no interpreter.
    """
    reasons = []
    err = _triton_import_error()
    if err is not None:
        reasons.append(f"triton is not importable ({err})")
    if not _cuda_available() and not _interpret_enabled():
        reasons.append("no CUDA device is available and TRITON_INTERPRET is not 1")
    return reasons


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _describe_tensor(t: torch.Tensor) -> str:
    return f"shape={tuple(t.shape)} dtype={_dtype_name(t.dtype)} device={t.device}"


#: the floating dtypes every fused kernel here takes
FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class OpSpec:
    """What a fused op's Triton kernel supports.

    Attributes:
        name: Op name, the key in the registry and in an op's ``record``.
        description: One line for ``diffcache info``.
        dtypes: Torch dtypes the Triton kernel accepts (for every input without its own rule).
        input_dtypes: Per-input rules by position, overriding ``dtypes`` for that input (an
            index tensor: ``{1: (torch.int64,)}``). Integer inputs also run in the interpreter.
    """

    name: str
    description: str
    dtypes: tuple[torch.dtype, ...] = field(default=())
    input_dtypes: Mapping[int, tuple[torch.dtype, ...]] = field(default_factory=dict)

    def _reasons_for(self, inputs: Sequence[tuple[str, str, torch.dtype, bool]]) -> list[str]:
        """Reasons for abstract inputs given as (label, device, dtype, needs grad)."""
        reasons = list(triton_status())
        interpret = _interpret_enabled()
        devices: list[str] = []
        for i, (label, device, dtype, needs_grad) in enumerate(inputs):
            allowed = self.input_dtypes.get(i, self.dtypes)
            if device not in devices:
                devices.append(device)
            dev = torch.device(device).type
            if dev == "cuda":
                if not _cuda_available() and interpret:  # else triton_status said so
                    reasons.append(f"{label} is on cuda but torch sees no CUDA device")
            elif dev == "cpu":
                if not interpret:
                    reasons.append(
                        f"{label} is on cpu; the Triton kernel needs a CUDA tensor "
                        "(cpu runs only under TRITON_INTERPRET=1)"
                    )
                elif dtype.is_floating_point and dtype not in INTERPRETER_DTYPES:
                    reasons.append(
                        f"{label} has dtype {_dtype_name(dtype)}, which the Triton interpreter "
                        "cannot run on cpu (it supports float32, float16)"
                    )
            else:
                reasons.append(f"{label} is on {dev}; the Triton kernel needs a CUDA tensor")
            if dtype not in allowed:
                supported = ", ".join(_dtype_name(d) for d in allowed)
                reasons.append(
                    f"{label} has dtype {_dtype_name(dtype)}; the kernel supports {supported}"
                )
            if needs_grad:
                reasons.append(f"{label} requires grad; the Triton kernel has no backward")
        if len(devices) > 1:
            reasons.append(f"inputs are on different devices ({', '.join(devices)})")
        return reasons

    def out_dtype_reasons(self, dtype: torch.dtype, device: torch.device) -> list[str]:
        """Why the Triton kernel cannot write ``dtype`` on ``device`` (empty when it can)."""
        if dtype not in self.dtypes:
            supported = ", ".join(_dtype_name(d) for d in self.dtypes)
            return [
                f"out_dtype {_dtype_name(dtype)} is not supported; the kernel writes {supported}"
            ]
        if device.type == "cpu" and dtype is torch.bfloat16:
            return ["out_dtype bfloat16 cannot be written by the Triton interpreter on cpu"]
        return []

    def not_supported_reasons(self, *tensors: torch.Tensor) -> list[str]:
        """List every reason the Triton kernel cannot run on these tensors.

        Args:
            *tensors: The op's tensor inputs.

        Returns:
            Human-readable reasons; empty when the kernel can run.
        """
        grad = torch.is_grad_enabled()
        return self._reasons_for(
            [
                (f"input {i}", str(t.device), t.dtype, grad and t.requires_grad)
                for i, t in enumerate(tensors)
            ]
        )


_REGISTRY: dict[str, OpSpec] = {}

_LOGGED: set[str] = set()


def register_op(spec: OpSpec) -> OpSpec:
    """Add an op to the registry (replacing one of the same name) and return it."""
    _REGISTRY[spec.name] = spec
    return spec


def ops() -> list[OpSpec]:
    """Return the registered ops, in registration order."""
    return list(_REGISTRY.values())


def _record(spec: OpSpec, backend: Backend, record: MutableMapping[str, str] | None) -> None:
    """Note in ``record`` (when given) which backend ran for ``spec``."""
    if record is not None:
        record[spec.name] = backend.value


_BY_VALUE = {b.value: b for b in Backend}


def _as_backend(value: str | Backend, source: str) -> Backend:
    if isinstance(value, Backend):
        return value
    exact = _BY_VALUE.get(value)  # type: ignore[arg-type]
    if exact is not None:  # the hot path: a plain lower-case name
        return exact
    try:
        return Backend(str(value).strip().lower())
    except ValueError:
        choices = ", ".join(repr(b.value) for b in Backend)
        msg = f"{source}={value!r} is not a kernel backend; use one of {choices}"
        raise ValueError(msg) from None


def resolve_backend(plan_value: str | Backend) -> str:
    """The backend a plan's ``kernels:`` value means here: ``DIFFCACHE_KERNELS`` overrides
    ``auto``. A bad value in either raises now (at ``accelerate``), not mid-run."""
    from diffcache.errors import DiffCacheError

    try:
        choice = _as_backend(plan_value, "kernels")
        env = os.environ.get(ENV_OVERRIDE, "").strip()
        if choice is Backend.AUTO and env:
            choice = _as_backend(env, ENV_OVERRIDE)
    except ValueError as e:
        raise DiffCacheError(str(e)) from None
    return choice.value


def plan_backend(
    plan_value: str | Backend, source: str, method: str, names: Sequence[str], probe: torch.Tensor
) -> str:
    """The backend a plan's ``kernels:`` value means here (:func:`resolve_backend`) for the
    method ``method``, whose ops are ``names``. An explicit ``triton`` that cannot run one of
    them on ``probe``'s device and dtype raises :class:`KernelUnavailableError` now, before
    anything is attached, listing every reason (``source``: the plan, for the message)."""
    backend = resolve_backend(plan_value)
    if backend != Backend.TRITON.value:
        return backend
    reasons = [f"{n}: {r}" for n in names for r in _REGISTRY[n].not_supported_reasons(probe)]
    if reasons:
        raise KernelUnavailableError(
            f"{source}: kernels: triton cannot run the ops of {method!r} on "
            f"{probe.device} {probe.dtype}:\n  - "
            + "\n  - ".join(reasons)
            + "\nUse kernels: auto (falls back to torch) or kernels: torch."
        )
    return backend


def pick(
    spec: OpSpec,
    backend: str | Backend,
    *tensors: torch.Tensor,
    extra_reasons: Sequence[str] = (),
) -> Backend:
    """Choose the backend that runs ``spec`` on ``tensors``.

    Args:
        spec: The op.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (or a :class:`Backend`).
        *tensors: The op's tensor inputs.
        extra_reasons: Op-specific reasons the kernel cannot run (e.g. an output dtype).

    Returns:
        ``Backend.TORCH`` or ``Backend.TRITON``.

    Raises:
        KernelUnavailableError: ``triton`` was asked for and cannot run on these inputs.
        ValueError: ``backend`` or ``DIFFCACHE_KERNELS`` is not a backend name.
    """
    choice = _as_backend(backend, "backend")
    if choice is Backend.AUTO:
        env = os.environ.get(ENV_OVERRIDE, "").strip()
        if env:
            choice = _as_backend(env, ENV_OVERRIDE)
    if choice is Backend.TORCH:
        return Backend.TORCH
    if choice is Backend.AUTO and spec.name in _LOGGED and not all(t.is_cuda for t in tensors):
        return Backend.TORCH  # the hot path on CPU: the reasons were logged on the first call

    reasons = spec.not_supported_reasons(*tensors) + list(extra_reasons)
    if choice is Backend.TRITON:
        if reasons:
            inputs = "\n".join(f"  input {i}: {_describe_tensor(t)}" for i, t in enumerate(tensors))
            why = "\n".join(f"  - {r}" for r in reasons)
            raise KernelUnavailableError(
                f"kernel {spec.name!r}: the Triton backend cannot run on these inputs.\n"
                f"Inputs:\n{inputs}\nReasons:\n{why}\n"
                "Remedy: use backend='auto' (falls back to torch) or backend='torch'."
            )
        return Backend.TRITON

    # AUTO: only real CUDA kernels, never the interpreter.
    if not reasons:
        if not tensors or any(t.device.type != "cuda" for t in tensors):
            reasons = ["inputs are not CUDA tensors (auto never picks the interpreter)"]
        elif _interpret_enabled():
            reasons = ["TRITON_INTERPRET=1 (auto never picks the interpreter)"]
    if not reasons:
        return Backend.TRITON
    if spec.name not in _LOGGED:
        _LOGGED.add(spec.name)
        logger.info("kernel %r: using torch backend; %s", spec.name, "; ".join(reasons))
    return Backend.TORCH


def describe() -> list[dict]:
    """Summarise each registered op for ``diffcache info``.

    Returns:
        One dict per op: ``name``, ``description``, ``dtypes``, ``auto_on_cuda`` ("triton" or
        "torch"), ``auto_on_cuda_reasons`` (why not triton, for a CUDA float16 input on this
        machine), ``cpu`` (the backend auto uses on cpu, always "torch") and ``interpreter``
        (whether explicit ``backend="triton"`` on cpu runs under the Triton interpreter).
    """
    rows = []
    for spec in ops():
        reasons = spec._reasons_for([("a float16 input", "cuda", torch.float16, False)])
        if not reasons and _interpret_enabled():
            reasons = ["TRITON_INTERPRET=1 (auto never picks the interpreter)"]
        rows.append(
            {
                "name": spec.name,
                "description": spec.description,
                "dtypes": [_dtype_name(d) for d in spec.dtypes],
                "auto_on_cuda": "torch" if reasons else "triton",
                "auto_on_cuda_reasons": reasons,
                "cpu": "torch",
                "interpreter": _interpret_enabled() and _triton_import_error() is None,
            }
        )
    return rows
