"""argparse types of the benchmark scripts: a bad value is one usage line (exit 2), never a
traceback or a silently different run."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any


def _number(text: str, kind: type) -> float:
    try:
        value = kind(text)
    except ValueError:
        what = "whole number" if kind is int else "number"
        raise argparse.ArgumentTypeError(f"not a {what}: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def at_least(low: float, kind: type = int) -> Callable[[str], float]:
    """A number (``kind``) no smaller than ``low``."""

    def parse(text: str) -> float:
        value = _number(text, kind)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low:g}, got {text}")
        return value

    return parse


positive = at_least(1)
non_negative = at_least(0)
non_negative_float = at_least(0, float)


def positive_seconds(text: str) -> float:
    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text}")
    return value


def fraction(text: str) -> float:
    """A compute fraction in (0, 1]."""
    value = _number(text, float)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def listed(item: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    """A comma-separated list of ``item`` values ('' for none)."""

    def parse(text: str) -> list[Any]:
        return [item(part.strip()) for part in text.split(",") if part.strip()]

    return parse


def names(text: str) -> list[str]:
    """A comma-separated list of names ('' for none)."""
    return [part.strip() for part in text.split(",") if part.strip()]


def among(choices: list[str] | tuple[str, ...]) -> Callable[[str], list[str]]:
    """A comma-separated list of names, each one of ``choices``."""

    def parse(text: str) -> list[str]:
        given = names(text)
        unknown = [g for g in given if g not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {', '.join(choices)}")
        return given

    return parse
