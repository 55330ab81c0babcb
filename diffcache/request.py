"""Generation requests: the fields an adapter declares, and one request's values.

Each adapter lists its :class:`Field` s (name, type, CLI flag, pipeline keyword, bounds). The CLI
builds its flags from the union over all adapters, and ``generate`` / ``eval`` turn a
:class:`Request` into the pipeline's keyword arguments, so adding a field touches one place.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True)
class Field:
    """One request field of a model family.

    Args:
        name: request key; the CLI flag is ``--name-with-dashes``.
        type: ``int``, ``float`` or ``str``.
        help: one line for ``--help``.
        call_arg: the pipeline keyword the value becomes.
        min, max: inclusive bounds for numbers.
        multiple_of: the value must be a multiple of this (image sides), plus ``offset``
            (video frames: ``4k + 1``).
        as_list: passed as a one-element list (``class_labels=[c]``).
        limit: model-dependent maximum, read from the loaded pipeline (number of classes).
        required: a request without it is refused.
        accepts: model-dependent check of a text value with the loaded pipeline,
            ``accepts(pipe, text)`` -> the problem or None (a prompt against a text model's
            tokenizer).
        input: the field ``eval``'s and ``profile``'s inputs fill (prompts, or class ids given
            as text), at most one per family (see ``generate.expand``).
    """

    name: str
    type: type
    help: str
    call_arg: str
    min: float | None = None
    max: float | None = None
    multiple_of: int | None = None
    offset: int = 0
    as_list: bool = False
    limit: Callable[[Any], int] | None = None
    required: bool = False
    accepts: Callable[[Any, str], str | None] | None = None
    input: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def problems(self, value: Any, pipe: Any = None, name: str | None = None) -> list[str]:
        """Why ``value`` is not acceptable (empty if it is); each problem names the value by
        ``name`` (default: the field's flag)."""
        flag = name or self.flag
        if self.type is str:
            if not isinstance(value, str):
                return [f"{flag} must be text, got {value!r}"]
            problem = self.accepts(pipe, value) if self.accepts and pipe is not None else None
            shown = value if len(value) <= 40 else value[:37] + "..."
            return [f"{flag} {shown!r}: {problem}"] if problem else []
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return [f"{flag} must be a number, got {value!r}"]
        if self.type is int and not float(value).is_integer():
            return [f"{flag} must be a whole number, got {value!r}"]
        if not math.isfinite(value):
            return [f"{flag} must be a finite number, got {value!r}"]
        hi = self.max
        if self.limit is not None and pipe is not None:
            hi = self.limit(pipe) if hi is None else min(hi, self.limit(pipe))
        if self.min is not None and value < self.min:
            return [f"{flag} must be >= {self.min:g}, got {value:g}"]
        if hi is not None and value > hi:
            return [f"{flag} must be <= {hi:g} for this model, got {value:g}"]
        if self.multiple_of and (value - self.offset) % self.multiple_of:
            m, o = self.multiple_of, self.offset
            what = f"a multiple of {m}" + (f" plus {o} (e.g. {m + o}, {2 * m + o})" if o else "")
            return [f"{flag} must be {what} for this model, got {value:g}"]
        return []


class Request:
    """What to generate: field values (absent = the pipeline's default) and a seed."""

    def __init__(self, seed: int = 0, **values: Any) -> None:
        self.seed = seed
        self.values = MappingProxyType({k: v for k, v in values.items() if v is not None})

    def get(self, name: str) -> Any:
        return self.values.get(name)

    def replace(self, **changes: Any) -> Request:
        seed = changes.pop("seed", self.seed)
        return Request(seed, **{**self.values, **changes})

    def merged(self, defaults: Mapping[str, Any]) -> Request:
        """This request with ``defaults`` filling the fields it leaves out."""
        values = {k: v for k, v in defaults.items() if k != "seed"}
        return Request(self.seed, **{**values, **self.values})

    def as_dict(self) -> dict[str, Any]:
        return {**self.values, "seed": self.seed}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Request) and self.as_dict() == other.as_dict()

    def __repr__(self) -> str:
        return f"Request({', '.join(f'{k}={v!r}' for k, v in self.as_dict().items())})"
