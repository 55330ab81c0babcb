"""ERTACache's offline side (rule a): the recorder of the plain run's residual statistics, and
the threshold for a compute target."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any

import torch

from diffcache.calibration import register_calibrator, round_to
from diffcache.errors import DiffCacheError, TargetUnreachable
from diffcache.methods.base import Calibrated
from diffcache.methods.ertacache import ERTACacheConfig
from diffcache.methods.ertacache_schedule import (
    TINY,
    ERTACacheCalibration,
    check_calibration,
    mean_relative_error,
    reuse_steps,
    schedule,
)
from diffcache.output import sample_of
from diffcache.session import Call


def _channels_first(t: torch.Tensor, dim: int) -> torch.Tensor:
    return t.detach().float().movedim(dim, 0).reshape(t.shape[dim], -1)


class _Recorder:
    """The profiling observer: keeps this request's residuals per branch and adds every
    (computed step, later step) pair's statistics to running sums."""

    kinds = ("step",)

    def __init__(self, target: Any) -> None:
        self.cdim = target.adapter.channel_dim
        self.latent_arg = target.adapter.latent_arg
        self.latent_pos = target.arg_index(self.latent_arg)
        self.residuals: dict[int, list[torch.Tensor]] = defaultdict(list)
        self.prev_v: dict[int, torch.Tensor] = {}
        self.sums: dict[tuple, Any] = defaultdict(float)
        self.channels = 0

    def see(self, call: Call, output: Any) -> None:
        step, branch = call.step, call.branch
        x, v = call.arg(self.latent_arg, self.latent_pos), sample_of(output)
        n = min(x.shape[self.cdim], v.shape[self.cdim])
        x = _channels_first(x.narrow(self.cdim, 0, n), self.cdim)
        v = _channels_first(v.narrow(self.cdim, 0, n), self.cdim)
        self.channels = n
        history = self.residuals[branch]
        if len(history) != step:
            raise DiffCacheError(
                f"ertacache profiling: step {step} of branch {branch} came after "
                f"{len(history)} steps; ERTACache needs one denoiser call per step and branch"
            )
        r = v - x
        r_abs = r.abs().mean().item()
        for c, rc in enumerate(history):
            u = x + rc
            e = rc - r  # = u - v
            e_abs = e.abs().mean().item()
            self.sums["pair_rel", branch, c, step] += e_abs / max(r_abs, TINY)
            self.sums["pair_err", branch, c, step] += e_abs
            moments = torch.stack(
                [
                    torch.full((n,), float(u.shape[1]), dtype=torch.float64),
                    u.sum(1, dtype=torch.float64).cpu(),
                    e.sum(1, dtype=torch.float64).cpu(),
                    (u * u).sum(1, dtype=torch.float64).cpu(),
                    (u * e).sum(1, dtype=torch.float64).cpu(),
                ],
                1,
            )
            self.sums["moments", branch, c, step] = self.sums["moments", branch, c, step] + moments
        if branch in self.prev_v:
            self.sums["step_change", branch, step] += (v - self.prev_v[branch]).abs().mean().item()
        self.sums["out_abs", branch, step] += v.abs().mean().item()
        self.sums["count", branch, step] += 1.0
        self.prev_v[branch] = v
        history.append(r)

    def end_request(self) -> None:
        self.residuals.clear()
        self.prev_v.clear()

    def result(self) -> dict[str, torch.Tensor]:
        keys = [k for k in self.sums if k[0] == "count"]
        if not keys:
            return {}
        b = 1 + max(k[1] for k in keys)
        t = 1 + max(k[2] for k in keys)
        out = {
            "pair_rel": torch.zeros(b, t, t, dtype=torch.float64),
            "pair_err": torch.zeros(b, t, t, dtype=torch.float64),
            "step_change": torch.zeros(b, t, dtype=torch.float64),
            "out_abs": torch.zeros(b, t, dtype=torch.float64),
            "moments": torch.zeros(b, t, t, self.channels, 5, dtype=torch.float64),
            "count": torch.zeros(b, t, dtype=torch.float64),
        }
        for (name, *index), value in self.sums.items():
            out[name][tuple(index)] = value
        return out


def observer(cfg: ERTACacheConfig, target: Any) -> _Recorder:
    """What ERTACache records while the profiler runs the plain pipeline."""
    return _Recorder(target)


@register_calibrator(ERTACacheConfig, observer=observer)
def calibrate(cfg: ERTACacheConfig, profiling: Any) -> Calibrated:
    """The profiled sums as calibration; with a compute target, the smallest threshold whose
    schedule computes at most that fraction."""
    cal = ERTACacheCalibration(**profiling.trace.observed)
    config = cfg
    if profiling.target_compute is not None:
        config = dataclasses.replace(cfg, threshold=fit_threshold(cal, profiling.target_compute))
    sched = schedule(cal, config)
    measured = {
        "compute_fraction": round(sched.compute_fraction, 6),
        "reuse_steps": list(sched.reuse),
        "phi": [round(sched.phi[k], 4) for k in sched.reuse],
    }
    return Calibrated(config, cal, measured=measured)


def fit_threshold(cal: ERTACacheCalibration, target: float) -> float:
    """The smallest threshold whose schedule computes at most ``target`` of the steps."""
    check_calibration(cal)
    rel = mean_relative_error(cal)
    t = rel.shape[0]
    values = sorted({float(v) for v in torch.triu(rel, 1)[torch.triu(torch.ones_like(rel), 1) > 0]})
    for v in [0.0, *values]:
        threshold = float(torch.nextafter(torch.tensor(v), torch.tensor(float("inf"))))
        steps = reuse_steps(rel, threshold)
        if 1 - len(steps) / t <= target:  # a readable value where it gives the same schedule
            readable = (round_to(threshold, d) for d in (2, 3, 6))
            return next((r for r in readable if reuse_steps(rel, r) == steps), threshold)
    raise TargetUnreachable(
        f"ertacache: even reusing every step it can, the schedule computes {2 / t:.3f} of the "
        f"{t} steps (the first and last always compute), above the target {target:.3f}",
        2 / t,
    )
