"""HyCa's offline side ("One-Time Choosing"): the recorder of the plain run's block residuals,
the interval for a compute target, and the clustering that picks a solver per cluster."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

from diffcache.calibration import register_calibrator
from diffcache.errors import DiffCacheError, TargetUnreachable
from diffcache.methods.base import Calibrated
from diffcache.methods.hyca import HyCaCalibration, HyCaConfig
from diffcache.methods.hyca_solvers import HISTORY, SOLVERS, solver_weights
from diffcache.session import Call
from diffcache.sites import Site
from diffcache.streams import BlockStreams

_EPS = 1e-12


@register_calibrator(HyCaConfig)
def calibrate(cfg: HyCaConfig, profiling: Any) -> Calibrated:
    """Pick the interval for a compute target, record the trace for that schedule, cluster the
    dimensions and choose a solver per cluster."""
    steps = profiling.valid_for["num_inference_steps"]
    config = cfg
    if profiling.target_compute is not None:
        config = _fit_interval(cfg, steps, profiling.target_compute)
    sites = profiling.target.sites("block")
    data = profiling.record(_Recorder(config, sites))
    if not data:
        raise DiffCacheError("hyca: no block call was recorded; does the model have blocks?")
    cal = choose(config, data["errors"], data["energy"])
    measured = {
        "compute_fraction": round(config.compute_fraction(steps), 6),
        "cluster_sizes": torch.bincount(cal.labels.flatten(), minlength=config.clusters).tolist(),
        "cluster_solvers": list(cal.cluster_solvers),
    }
    return Calibrated(config, cal, measured=measured)


def _fit_interval(cfg: HyCaConfig, steps: int, target: float) -> HyCaConfig:
    for n in range(1, steps + 1):
        candidate = dataclasses.replace(cfg, interval=n)
        if candidate.compute_fraction(steps) <= target:
            return candidate
    best = dataclasses.replace(cfg, interval=steps).compute_fraction(steps)
    raise TargetUnreachable(
        f"hyca: with warm-up {cfg.warmup_steps} the schedule computes at least {best:.3f} of the "
        f"block calls at {steps} steps, above the target {target:.3f}; lower --option "
        "warmup_steps or ask for less",
        best,
    )


def choose(cfg: HyCaConfig, errors: torch.Tensor, energy: torch.Tensor) -> HyCaCalibration:
    """Cluster (block, dimension) pairs by their indicators; the best pool solver per cluster."""
    from sklearn.cluster import KMeans

    b, d, _ = errors.shape
    e = energy.double() + _EPS
    indicators = torch.stack(
        [
            (e[..., 1] / e[..., 0]).log(),
            (e[..., 2] / e[..., 1]).log(),
            (e[..., 3] / e[..., 2]).log(),
        ],
        -1,
    )
    flat = indicators.reshape(-1, 3)
    z = (flat - flat.mean(0)) / flat.std(0).clamp_min(_EPS)
    k = min(cfg.clusters, len(z))
    labels = KMeans(k, n_init=10, random_state=cfg.seed).fit_predict(z.numpy())
    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(b, d)
    pool = [SOLVERS.index(s) for s in cfg.solvers]
    solvers = []
    for c in range(k):
        mean = errors[labels == c][:, pool].mean(0)  # (pool,)
        solvers.append(cfg.solvers[int(mean.argmin())])
    return HyCaCalibration(tuple(solvers), labels, errors.float(), indicators.float())


# ---------------------------------------------------------------------------------------------
# block inputs and outputs


class _Recorder:
    """Profiling observer: per (block, branch), the residual's consecutive-step differences
    (indicators) and each solver's error on this schedule's skipped steps."""

    kinds = ("block",)

    def __init__(self, cfg: HyCaConfig, sites: Sequence[Site]) -> None:
        self.cfg, self.blocks = cfg, BlockStreams(sites)
        self.index = {s.name: i for i, s in enumerate(sites)}
        self.recent: dict[tuple, list[torch.Tensor]] = defaultdict(list)  # last 3 steps
        self.full: dict[tuple, list[tuple[int, torch.Tensor]]] = defaultdict(list)
        self.errors: dict[int, torch.Tensor] = {}
        self.energy: dict[int, torch.Tensor] = {}

    def see(self, call: Call, output: Any) -> None:
        x, y = self.blocks.inputs(call), BlockStreams.parts(output)
        r = torch.cat(
            [(o.float() - i.float()).reshape(-1, o.shape[-1]) for i, o in zip(x, y, strict=True)]
        )
        key = (call.site.name, call.site.expert, call.branch)
        b, k = self.index[call.site.name], call.step
        dims = r.shape[1]
        if b not in self.errors:
            self.errors[b] = torch.zeros(dims, len(SOLVERS), dtype=torch.float64)
            self.energy[b] = torch.zeros(dims, 4, dtype=torch.float64)
        recent = self.recent[key]
        level = [*recent, r]  # consecutive steps; differences of orders 0-3 ending at step k
        for order in range(len(level)):
            self.energy[b][:, order] += (level[-1].double() ** 2).sum(0).cpu()
            level = [level[i + 1] - level[i] for i in range(len(level) - 1)]
        recent.append(r)
        del recent[:-3]
        history = self.full[key]
        if self.cfg.full(k) or not history:  # as the runtime: no history yet (an expert's
            # first step after the Wan2.2 boundary) computes
            history.append((k, r))
            del history[:-HISTORY]
            return
        steps = [s for s, _ in history]
        stacked = torch.stack([h for _, h in history])
        for j, name in enumerate(SOLVERS):
            w = torch.tensor(solver_weights(name, steps, k)).view(-1, 1, 1)
            pred = (w * stacked).sum(0)
            self.errors[b][:, j] += ((pred - r).double() ** 2).sum(0).cpu()

    def end_request(self) -> None:
        self.recent.clear()
        self.full.clear()

    def result(self) -> dict[str, torch.Tensor]:
        if not self.errors:
            return {}
        order = sorted(self.errors)
        dims = {self.errors[b].shape[0] for b in order}
        if len(dims) != 1 or order != list(range(len(self.index))):
            raise DiffCacheError(
                f"hyca: block sites differ in hidden size ({sorted(dims)}) or were not all "
                "called; one dimension clustering needs one hidden size"
            )
        return {
            "errors": torch.stack([self.errors[b] for b in order]),
            "energy": torch.stack([self.energy[b] for b in order]),
        }
