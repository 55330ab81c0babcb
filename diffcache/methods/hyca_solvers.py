"""HyCa's solver pool: fixed-weight stencils that forecast a value at a step from its values at
earlier steps (the runtime forecasts with them, the calibration scores them)."""

from __future__ import annotations

import math
from collections.abc import Sequence

#: the solver pool: fixed-weight stencils over the cached residuals of full-compute steps. The
#: first four are the original pool; the others were added later (appended, so that the solver
#: index of every recorded error column stays what it was).
SOLVERS = ("reuse", "linear", "quadratic", "ab2", "ab3", "tf2", "tf3", "rk2", "am2", "bdf2")
#: history entries each solver uses (fewer while the history is shorter)
POINTS = {
    "reuse": 1, "linear": 2, "quadratic": 3, "ab2": 3, "ab3": 4, "tf2": 3, "tf3": 4, "rk2": 3,
    "am2": 3, "bdf2": 3,
}  # fmt: skip
#: what a solver becomes while the history holds fewer points than it needs
FALLBACK = {
    "linear": "reuse", "quadratic": "linear", "ab2": "linear", "ab3": "ab2", "tf2": "linear",
    "tf3": "tf2", "rk2": "linear", "am2": "linear", "bdf2": "linear",
}  # fmt: skip
#: the most history entries any solver reads
HISTORY = max(POINTS.values())


def history_length(solvers: Sequence[str]) -> int:
    """History entries a set of solvers needs (the most any of them reads)."""
    return max(POINTS[s] for s in solvers)


def effective_solver(name: str, points: int) -> str:
    """The solver ``name`` runs as with ``points`` history entries (``FALLBACK`` while it has
    fewer than it needs)."""
    while POINTS[name] > points:
        name = FALLBACK[name]
    return name


def _slopes(pts: list[float], n: int) -> list[list[float]]:
    """Backward-difference slopes ``f_j = (F_j - F_(j-1)) / (s_j - s_(j-1))`` of the last
    ``len(pts) - 1`` intervals, each as weights over the ``n`` points ``pts`` (oldest first)."""
    out = []
    for j in range(1, len(pts)):
        w = [0.0] * n
        g = pts[j] - pts[j - 1]
        w[j], w[j - 1] = 1.0 / g, -1.0 / g
        out.append(w)
    return out


def _combine(*terms: tuple[float, list[float]]) -> list[float]:
    n = len(terms[0][1])
    return [sum(c * w[i] for c, w in terms) for i in range(n)]


def solver_weights(name: str, steps: Sequence[int], k: int) -> list[float]:
    """Weights over history values at ``steps`` (oldest first) that forecast step ``k``.

    The step variable is the step index; ``F_j`` are the cached values at ``s_j`` (the last
    ``n`` full steps, ``s_n`` the latest), ``h = k - s_n``, and ``f_j = (F_j - F_(j-1)) /
    (s_j - s_(j-1))`` the backward-difference slope ending at ``s_j``.

    - ``reuse``: ``F_n``.
    - ``linear`` / ``quadratic``: the polynomial through the last 2 / 3 points, evaluated at
      ``k`` (exact for linear / quadratic trajectories, at any spacing). ``linear`` is also
      Taylor and Adams-Bashforth of order 1.
    - ``ab2`` / ``ab3``: Adams-Bashforth 2 / 3 on the slopes, ``F_n + h (3/2 f_n - 1/2
      f_(n-1))`` / ``F_n + h (23/12 f_n - 16/12 f_(n-1) + 5/12 f_(n-2))`` (the textbook
      equal-step coefficients, with the forecast distance ``h`` as the step; exact for linear
      trajectories).
    - ``tf2`` / ``tf3``: the Taylor formula of order 2 / 3 on TaylorSeer's difference ladder:
      ``D0_j = F_j``, ``D(m+1)_j = (Dm_j - Dm_(j-1)) / (s_j - s_(j-1))``, forecast
      ``sum_m Dm_n h^m / m!`` (exact for linear trajectories; the ladder's slopes are backward
      differences, so not for quadratic ones).
    - ``rk2``: the "second-order RK predictor" ``3/2 F_n - 1/2 F_(n-2)`` the paper note quotes
      for an even grid one step ahead (dit.md 1.4.3), at any spacing: ``F_n + h (F_n -
      F_(n-2)) / (s_n - s_(n-2))``, the latest value advanced along the secant over the last
      three points (exact for linear trajectories).
    - ``am2``: Adams-Moulton 2 (trapezoidal rule) as one predict-evaluate-correct pass, the
      slope at ``k`` taken from the ab2 prediction ``P``: ``F_n + h/2 (f_n + (P - F_n) / h)``
      = ``F_n + h (5/4 f_n - 1/4 f_(n-1))`` (exact for linear trajectories; iterating the
      corrector to its fixed point would give ``linear``).
    - ``bdf2``: variable-step BDF2, ``F_k = (1+w)^2/(1+2w) F_n - w^2/(1+2w) F_(n-1) + h
      (1+w)/(1+2w) f_k`` with ``w = h / (s_n - s_(n-1))``, its implicit slope ``f_k``
      extrapolated linearly from ``f_(n-1)`` (at ``s_(n-1)``) and ``f_n`` (at ``s_n``); even
      grid, one step ahead: ``8/3 F_n - 7/3 F_(n-1) + 2/3 F_(n-2)`` (exact for linear
      trajectories; with the exact slope it would be exact for quadratic ones).

    A solver with fewer points than it needs uses ``FALLBACK`` (ab3 -> ab2 -> linear -> reuse,
    tf3 -> tf2 -> linear, quadratic / rk2 / am2 / bdf2 -> linear).
    """
    if name not in POINTS:
        raise ValueError(f"unknown solver {name!r}; choose from {list(SOLVERS)}")
    if len(steps) < POINTS[name]:
        if len(steps) == 0:
            raise ValueError("solver_weights: empty history")
        return solver_weights(effective_solver(name, len(steps)), steps, k)
    n = POINTS[name]
    pts = [float(s) for s in steps[-n:]]
    h = k - pts[-1]
    last = [0.0] * (n - 1) + [1.0]
    if name in ("reuse", "linear", "quadratic"):
        w = [
            math.prod((k - pts[m]) / (pts[j] - pts[m]) for m in range(n) if m != j)
            for j in range(n)
        ]
    elif name == "ab2":  # written out as before the pool grew: the same weights, bit for bit
        s0, s1, s2 = pts
        a, b = 1.5 * (k - s2) / (s2 - s1), 0.5 * (k - s2) / (s1 - s0)
        w = [b, -a - b, 1 + a]
    elif name in ("ab3", "am2"):
        coef = {"ab3": (5 / 12, -16 / 12, 23 / 12), "am2": (-0.25, 1.25)}
        f = _slopes(pts, n)
        w = _combine((1.0, last), *((h * c, fj) for c, fj in zip(coef[name], f, strict=True)))
    elif name in ("tf2", "tf3"):
        ladder = [[1.0 if i == j else 0.0 for i in range(n)] for j in range(n)]  # D0_j
        w = list(ladder[-1])
        for m in range(1, n):  # Dm_j (defined for j >= m) from D(m-1)_j and D(m-1)_(j-1)
            ladder = [
                [
                    (a - b) / (pts[j] - pts[j - 1])
                    for a, b in zip(ladder[j], ladder[j - 1], strict=True)
                ]
                if j >= m
                else ladder[j]
                for j in range(n)
            ]
            w = _combine((1.0, w), (h**m / math.factorial(m), ladder[-1]))
    elif name == "rk2":
        span = [0.0] * n
        span[-1], span[0] = 1.0 / (pts[-1] - pts[0]), -1.0 / (pts[-1] - pts[0])
        w = _combine((1.0, last), (h, span))
    else:  # bdf2
        f1, f2 = _slopes(pts, n)
        g = pts[2] - pts[1]
        fk = _combine((1.0 + h / g, f2), (-h / g, f1))  # f at s_n, advanced along its trend
        om = h / g
        w = _combine(
            ((1 + om) ** 2 / (1 + 2 * om), last),
            (-(om**2) / (1 + 2 * om), [0.0, 1.0, 0.0]),
            (h * (1 + om) / (1 + 2 * om), fk),
        )
    return [0.0] * (len(steps) - n) + [float(x) for x in w]
