"""A run against the baseline request by request: the samples it lost and won on a per-sample
score, and the exact sign test of that split.

Two runs with one mean score can differ in which samples they get right, and on 16 samples one
flipped sample moves the mean by 0.06: the lost / won counts and the sign test's p say whether a
gap in task score is more than that (a small p: the run scores differently from the baseline).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

BASELINE = "baseline"


def per_request(report: Mapping[str, Any], key: str) -> dict[str, dict[int, float]]:
    """``{run: {request: value}}`` of one per-sample field of a report's records (records
    without a value of it are left out)."""
    out: dict[str, dict[int, float]] = {}
    for rec in report.get("records") or []:
        if rec.get(key) is not None:
            out.setdefault(rec["run"], {})[rec["request"]] = rec[key]
    return out


def lost_won(base: Mapping[int, float], run: Mapping[int, float]) -> tuple[int, int]:
    """Requests the run scores worse / better on than the baseline (paired, same request)."""
    lost = sum(base[i] > v for i, v in run.items() if i in base)
    won = sum(base[i] < v for i, v in run.items() if i in base)
    return lost, won


def sign_test(lost: int, won: int) -> float:
    """Two-sided exact sign test of ``lost`` against ``won`` (ties left out): how likely a split
    at least this uneven is when losing and winning are equally likely. The same value as scipy's
    ``binomtest(lost, lost + won, 0.5).pvalue``, without importing scipy.stats; 1 for no flips."""
    n = lost + won
    tail = sum(math.comb(n, k) for k in range(min(lost, won) + 1)) / 2**n
    return min(1.0, 2 * tail)


def flips(report: Mapping[str, Any], key: str) -> dict[str, tuple[int, int, float]]:
    """``{run: (lost, won, p)}`` of every run with per-sample ``key`` values, against the
    baseline's on the same requests; {} when the baseline has none."""
    scores = per_request(report, key)
    base = scores.pop(BASELINE, None)
    if not base:
        return {}
    out = {}
    for run, values in scores.items():
        lost, won = lost_won(base, values)
        out[run] = (lost, won, sign_test(lost, won))
    return out


def describe(lost: int, won: int, p: float) -> str:
    """``lost 1 / won 0, p 1``: a flip count as the report and the CLI show it."""
    return f"lost {lost} / won {won}, p {p:.2g}"
