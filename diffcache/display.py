"""How diffcache shows numbers and plan options to people (the CLI's tables, plan and report
names) and rounds the floats of golden files; plan files keep every digit."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def rounded(value: Any, digits: int = 4) -> Any:
    """``value`` with every float in it rounded to ``digits`` significant digits, for display
    (a profiled threshold of 0.10211610431000394 shows as 0.1021; files keep every digit)."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, (list, tuple)):
        return type(value)(rounded(v, digits) for v in value)
    if isinstance(value, Mapping):
        return {k: rounded(v, digits) for k, v in value.items()}
    return value


def format_options(options: Mapping[str, Any], sep: str = ", ") -> str:
    """``key=value`` items of plan options as the CLI and report names show them (floats to 4
    significant digits)."""
    return sep.join(f"{k}={rounded(v)}" for k, v in options.items())
