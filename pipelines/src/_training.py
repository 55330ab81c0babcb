"""What the reference models' training scripts share: their command line and their summary."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def training_parser(
    doc: str,
    out: Path,
    threads: int,
    steps_help: str = "scale every step count",
    steps: int | None = None,
) -> argparse.ArgumentParser:
    """A script's parser (its docstring's first line as description) with ``--out`` (default
    ``out``), ``--steps-scale`` (or, given ``steps``, ``--steps N`` with that default) and
    ``--threads`` (default ``threads``)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--out", default=str(out))
    if steps is None:
        p.add_argument("--steps-scale", type=float, default=1.0, help=steps_help)
    else:
        p.add_argument("--steps", type=int, default=steps, help="training steps")
    p.add_argument("--threads", type=int, default=threads)
    return p


def mean_last(values: Sequence[float], n: int) -> float:
    """The mean of the last ``n`` values (a run's final loss), to 5 decimals."""
    return round(sum(values[-n:]) / len(values[-n:]), 5)


def write_summary(
    out: Path, summary: Mapping[str, Any], shown: Mapping[str, Any] | None = None
) -> None:
    """Write ``out/training.json`` and print it (``shown``: what to print instead)."""
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary if shown is None else shown, indent=2))
