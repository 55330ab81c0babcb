"""ERTACache's calibration data and what a threshold makes of it: the reused steps, the
rectifier and the time factors (the runtime follows this schedule, the calibration fits the
threshold on it), and the adjusted flow times."""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch

from diffcache.errors import PlanError

TINY = 1e-12


@dataclasses.dataclass(frozen=True)
class ERTACacheCalibration:
    """Sums over the calibration requests of the plain run (``B`` branches, ``T`` steps, ``C``
    latent channels), with ``r_k = v_k - x_k`` the model residual of step ``k``:

    - ``pair_rel[b, c, k]``: ``mean|r_c - r_k| / mean|r_k|`` (the error of reusing step ``c``'s
      residual at step ``k``, relative), ``pair_err[b, c, k]``: ``mean|r_c - r_k|``;
    - ``step_change[b, k]``: ``mean|v_k - v_{k-1}|``; ``out_abs[b, k]``: ``mean|v_k|``;
    - ``moments[b, c, k, ch]``: per channel, the count and sums of ``u``, ``e``, ``u^2``, ``u e``
      with ``u = x_k + r_c`` (the reused output) and ``e = u - v_k`` (its error);
    - ``count[b, k]``: how many requests reached (b, k).
    """

    pair_rel: torch.Tensor
    pair_err: torch.Tensor
    step_change: torch.Tensor
    out_abs: torch.Tensor
    moments: torch.Tensor
    count: torch.Tensor


@dataclasses.dataclass(frozen=True)
class Schedule:
    """What a threshold makes of a calibration: the reused steps, the computed step each one
    reuses, the time factors ``phi`` (1 on computed steps) and the per-(branch, step, channel)
    rectifier ``scale``, ``shift`` (identity on computed steps)."""

    reuse: tuple[int, ...]
    source: tuple[int, ...]  # per step: the computed step whose residual it uses (itself if so)
    phi: tuple[float, ...]
    scale: torch.Tensor
    shift: torch.Tensor

    @property
    def compute_fraction(self) -> float:
        return 1 - len(self.reuse) / len(self.source)


class Options(Protocol):
    """The options a schedule depends on (``ERTACacheConfig`` has them)."""

    threshold: float
    rectify: str
    phi: str


def check_calibration(cal: ERTACacheCalibration) -> tuple[int, int, int]:
    """(branches, steps, channels) of a calibration whose tensors fit together; else a
    PlanError."""
    b, t, t2 = cal.pair_rel.shape
    c = cal.moments.shape[3] if cal.moments.dim() == 5 else -1
    shapes = {
        "pair_err": (b, t, t),
        "step_change": (b, t),
        "out_abs": (b, t),
        "moments": (b, t, t, c, 5),
        "count": (b, t),
    }
    bad = [
        f"{k} {tuple(getattr(cal, k).shape)} (want {v})"
        for k, v in shapes.items()
        if tuple(getattr(cal, k).shape) != v
    ]
    if t != t2 or c < 1 or bad or t < 2:
        raise PlanError(
            f"ertacache calibration: tensors do not fit together (pair_rel "
            f"{tuple(cal.pair_rel.shape)}; {'; '.join(bad) or 'no steps'}); re-run diffcache "
            "profile"
        )
    if (cal.count <= 0).any():
        raise PlanError("ertacache calibration: a (branch, step) was never seen; re-profile")
    return b, t, c


def reuse_steps(rel: torch.Tensor, threshold: float) -> tuple[int, ...]:
    """The reused steps for ``threshold`` given the averaged relative errors ``rel[c, k]``:
    steps 0 and T-1 compute; step k reuses iff ``rel[c, k] < threshold`` for the last
    computed step c."""
    t = rel.shape[0]
    reused, c = [], 0
    for k in range(1, t - 1):
        if float(rel[c, k]) < threshold:
            reused.append(k)
        else:
            c = k
    return tuple(reused)


def mean_relative_error(cal: ERTACacheCalibration) -> torch.Tensor:
    """``rel[c, k]``: the relative error of reusing step ``c`` at step ``k``, averaged over
    requests and branches."""
    return cal.pair_rel.sum(0) / cal.count.sum(0)


def schedule(cal: ERTACacheCalibration, cfg: Options) -> Schedule:
    """The reused steps, sources, ``phi`` and rectifier of ``cfg`` on this calibration."""
    b, t, channels = check_calibration(cal)
    count = cal.count.sum(0)
    reuse = reuse_steps(mean_relative_error(cal), cfg.threshold)
    source, last = [], 0
    for k in range(t):
        last = last if k in reuse else k
        source.append(last)
    phi = [1.0] * t
    scale = torch.ones(b, t, channels, dtype=torch.float64)
    shift = torch.zeros(b, t, channels, dtype=torch.float64)
    for k in reuse:
        c = source[k]
        err = float(cal.pair_err[:, c, k].sum() / count[k])
        den = cal.step_change if cfg.phi == "step_change" else cal.out_abs
        d = float(den[:, k].sum() / count[k])
        phi[k] = min(max(1 - err / d, 0.0), 1.0) if d > 0 else float(err == 0)
        if cfg.rectify == "none":
            continue
        m = cal.moments[:, c, k]  # (B, C, 5)
        if cfg.rectify == "step":
            m = m.sum(1, keepdim=True)
        n, su, se, suu, sue = m.unbind(-1)
        var = suu / n - (su / n) ** 2
        cov = sue / n - (su / n) * (se / n)
        a = torch.where(var > TINY, cov / var.clamp_min(TINY), torch.zeros_like(var))
        intercept = se / n - a * su / n
        scale[:, k] = (1 - a).expand(b, channels)
        shift[:, k] = (-intercept).expand(b, channels)
    return Schedule(reuse, tuple(source), tuple(phi), scale.float(), shift.float())


def adjusted_sigmas(sigmas: torch.Tensor, phi: tuple[float, ...]) -> torch.Tensor:
    """Flow times ``s'`` (T + 1 values) for step factors ``phi`` (T values): every step takes its
    nominal share ``1 - s_{k+1} / s_k`` of the time left, scaled by ``phi_k``."""
    s = sigmas.double().cpu()
    out = s.clone()
    for k, f in enumerate(phi):
        share = 1 - s[k + 1] / s[k] if s[k] > 0 else torch.tensor(1.0, dtype=torch.float64)
        out[k + 1] = out[k] * (1 - f * share)
    return out
