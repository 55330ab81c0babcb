"""HyCa: hybrid feature caching, a solver per cluster of hidden dimensions.

Paper: "Let Features Decide Their Own Solvers: Hybrid Feature Caching for Diffusion
Transformers" (HyCa, arXiv 2510.04188, ICLR 2026). No reference code was public; the rules
follow the paper's main text as collected in ``shared/research/dit.md`` §1.4, and every formula
the paper leaves to its (unavailable) appendix is an explicit choice below.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from diffcache.adapter import Capabilities
from diffcache.errors import DiffCacheError, PlanError, RunError, TargetUnreachable
from diffcache.methods.base import Calibrated, MethodConfig, option
from diffcache.registry import register_method
from diffcache.session import Call, Session
from diffcache.sites import BlockStreams, Site

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
_EPS = 1e-12


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


@dataclasses.dataclass(frozen=True)
class HyCaCalibration:
    """``labels[b, d]``: the cluster of hidden dimension ``d`` of block site ``b`` (sites in the
    adapter's order); ``cluster_solvers[c]``: the solver of cluster ``c``; ``errors[b, d, s]``
    (``s`` indexes ``SOLVERS``; plans profiled before the pool grew hold its first four columns) and
    ``indicators[b, d, :]``: what the choice was made from (kept for inspection)."""

    cluster_solvers: tuple[str, ...] = option(("reuse",), "the solver of each cluster")
    labels: torch.Tensor = dataclasses.field(default=None)  # type: ignore[assignment]
    errors: torch.Tensor = dataclasses.field(default=None)  # type: ignore[assignment]
    indicators: torch.Tensor = dataclasses.field(default=None)  # type: ignore[assignment]


@dataclasses.dataclass(frozen=True)
class HyCaConfig(MethodConfig):
    """HyCa (arXiv 2510.04188): every block's residual ``block(h) - h`` is computed on full
    steps and forecast on the others, each hidden dimension by the solver of its cluster.

    Rules:

    - Schedule ("All-Time Solving"): steps ``k < warmup_steps`` and every ``interval``-th step
      after them (``(k - warmup_steps) % interval == 0``) compute every block; the other steps
      compute no block: each returns its input plus the forecast residual (per stream for
      dual-stream blocks). ``compute_fraction`` = computed block calls / block calls.
    - Offline ("One-Time Choosing", ``diffcache profile``): the plain model runs the calibration
      prompts; for every block and hidden dimension it records (a) dynamics indicators of the
      residual over consecutive steps and (b) the squared error of every solver of ``solvers``
      forecasting each skipped step of this schedule from the residuals of its full steps. The
      dimensions of all blocks are clustered by (a) with k-means (``clusters``, scikit-learn,
      ``seed``); each cluster takes the solver with the lowest mean error over its dimensions
      (the paper's Eq. 4, over the whole schedule rather than one step).
    - ``diffcache profile --target-compute F`` picks the smallest ``interval`` whose schedule
      computes at most ``F`` of the block calls (a ``--target-speedup`` becomes such an F).

    Published settings (dit.md §1.4.4, inferred from the paper's FLOPs columns): FLUX.1-dev 50
    steps ``interval`` 5-7 with warm-up 3, or 4 with warm-up 1; Qwen-Image 50 steps ``interval``
    3/6/8, warm-up 3; HunyuanVideo 50 steps ``interval`` 6, warm-up 1. Two clusters in every
    figure of the paper.

    Choices where the paper defers to its appendix (ours, named):

    - Solvers (``SOLVERS``; exact stencils in :func:`solver_weights`): every family the paper
      names (Runge-Kutta, Adams-Bashforth, Taylor formula, BDF, Adams-Moulton) as a fixed-weight
      stencil on the cached history, since no solver may evaluate the model: plain reuse;
      linear and quadratic extrapolation (polynomials through the last 2 / 3 full-step
      residuals; linear is also Taylor / Adams-Bashforth of order 1); Adams-Bashforth 2 and 3
      on backward-difference slopes (``ab2``, ``ab3``); Taylor formula of order 2 and 3 on
      TaylorSeer's difference ladder (``tf2``, ``tf3``); the paper note's "second-order RK
      predictor" ``3/2 F_n - 1/2 F_(n-2)`` generalised to uneven spacing (``rk2``);
      Adams-Moulton 2 as one predict-evaluate-correct pass over the ab2 prediction (``am2``);
      variable-step BDF2 with its implicit slope extrapolated from the last two slopes
      (``bdf2``). The appendix with the paper's own formulas (A.2.2) was not available: these
      are our readings (dit.md 1.4.3, 1.4.7), recorded by name in the plan. The step variable
      is the step index; the history holds full-step residuals only (never forecasts), as many
      as the chosen solvers read (at most 4). The first four were the whole pool once: plans
      profiled then name them in ``options.solvers`` and run unchanged.
    - Indicators per (block, dimension), summed over tokens, steps, branches and prompts: the
      log energy ratios of the first to zeroth, second to first and third to second
      consecutive-step differences of the residual (change rate, curvature ratio, jerk ratio),
      standardised before k-means. One clustering for all blocks' dimensions.
    - CFG branches keep their own histories and share the plan.
    """

    name: ClassVar[str] = "hyca"
    granularity: ClassVar[str] = "block"
    needs: ClassVar[Capabilities] = Capabilities(("block",), denoiser="latent")
    kernels: ClassVar[tuple[str, ...]] = ("forecast",)
    calibration: ClassVar[type] = HyCaCalibration

    interval: int = option(5, "N: one full step every N steps after the warm-up", min=1)
    warmup_steps: int = option(3, "W: the first W steps compute every block", min=1)
    clusters: int = option(2, "C: clusters of hidden dimensions (k-means)", min=1)
    solvers: tuple[str, ...] = option(SOLVERS, "the solver pool")
    seed: int = option(0, "k-means seed", min=0)

    def __post_init__(self) -> None:
        unknown = [s for s in self.solvers if s not in SOLVERS]
        if unknown or not self.solvers:
            raise PlanError(f"options.solvers: {unknown or '[]'}; choose from {list(SOLVERS)}")

    @classmethod
    def identity(cls) -> HyCaConfig:
        return cls(interval=1)

    @classmethod
    def aggressive(cls) -> HyCaConfig:
        return cls(interval=1000, warmup_steps=1)

    def full(self, step: int) -> bool:
        return step < self.warmup_steps or (step - self.warmup_steps) % self.interval == 0

    def compute_fraction(self, steps: int) -> float:
        return sum(self.full(k) for k in range(steps)) / steps

    def plan_problems(self, valid_for: Any) -> list[str]:
        steps = valid_for.get("num_inference_steps")
        if steps is not None and self.warmup_steps >= steps:
            return [
                f"options.warmup_steps: {self.warmup_steps} warm-up steps cover all {steps} "
                "steps, so nothing is forecast; use fewer"
            ]
        return []

    def calibrate(self, profiling: Any) -> Calibrated:
        """Pick the interval for a compute target, record the trace for that schedule,
        cluster the dimensions and choose a solver per cluster."""
        steps = profiling.valid_for["num_inference_steps"]
        config = self
        if profiling.target_compute is not None:
            config = _fit_interval(self, steps, profiling.target_compute)
        sites = profiling.target.sites("block")
        data = profiling.record(_Recorder(config, sites))
        if not data:
            raise DiffCacheError("hyca: no block call was recorded; does the model have blocks?")
        cal = choose(config, data["errors"], data["energy"])
        measured = {
            "compute_fraction": round(config.compute_fraction(steps), 6),
            "cluster_sizes": torch.bincount(
                cal.labels.flatten(), minlength=config.clusters
            ).tolist(),
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
        if self.cfg.full(k):
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


# ---------------------------------------------------------------------------------------------
# runtime


@dataclasses.dataclass
class _History:
    steps: list[int] = dataclasses.field(default_factory=list)
    parts: list[torch.Tensor] = dataclasses.field(default_factory=list)  # (H, *part shape) each
    template: Any = None


class _HyCa:
    def __init__(self, session: Session, cfg: HyCaConfig, sites: Sequence[Site]) -> None:
        cal: HyCaCalibration = session.calibration
        if cal.labels.dim() != 2 or cal.labels.shape[0] != len(sites):
            raise PlanError(
                f"hyca: the plan's dimension map has shape {tuple(cal.labels.shape)} but this "
                f"model has {len(sites)} blocks; profile this model"
            )
        unknown = [s for s in cal.cluster_solvers if s not in SOLVERS]
        if unknown:
            raise PlanError(f"hyca: calibration.cluster_solvers {unknown} not in {list(SOLVERS)}")
        if len(cal.cluster_solvers) != int(cal.labels.max()) + 1:
            raise PlanError(
                f"hyca: the plan names {len(cal.cluster_solvers)} cluster solvers for "
                f"{int(cal.labels.max()) + 1} clusters"
            )
        self.cfg, self.run, self.kernel = cfg, session.run, session.kernel
        self.blocks = BlockStreams(sites)
        self.index = {s.name: i for i, s in enumerate(sites)}
        solver_of = torch.tensor([SOLVERS.index(s) for s in cal.cluster_solvers])
        self.dim_solver = solver_of[cal.labels]  # (blocks, D) solver index per dimension
        self.keep = history_length(cal.cluster_solvers)  # history entries the plan reads
        self.cluster_solvers = cal.cluster_solvers
        self.weights: dict[tuple, torch.Tensor] = {}

    def weights_for(self, block: int, steps: tuple[int, ...], k: int, dims: int, device) -> Any:
        key = (block, steps, k)
        w = self.weights.get(key)
        if w is None:
            if self.dim_solver.shape[1] != dims:
                raise self.run.fail(
                    RunError(
                        f"hyca: the plan clusters {self.dim_solver.shape[1]} hidden dimensions "
                        f"but this block has {dims} ({self.run.where()}); profile this model"
                    )
                )
            table = torch.tensor([solver_weights(s, steps, k) for s in SOLVERS])  # (S, H)
            w = table[self.dim_solver[block]].T.contiguous().to(device)  # (H, D)
            if len(self.weights) > 4096:
                self.weights.clear()
            self.weights[key] = w
        return w

    def __call__(self, call: Call) -> Any:
        st = call.state(_History)
        if self.cfg.full(call.step) or not st.steps:
            out = call.compute()
            x = self.blocks.inputs(call)
            y = BlockStreams.parts(out)
            residuals = [(o.float() - i.float()) for i, o in zip(x, y, strict=True)]
            if self.run.tracing:
                call.explain(residual_mean=[float(r.mean()) for r in residuals])
            if not st.parts:
                st.parts = [r.unsqueeze(0) for r in residuals]
            else:
                st.parts = [
                    torch.cat([p[max(0, len(p) - self.keep + 1) :], r.unsqueeze(0)])
                    for p, r in zip(st.parts, residuals, strict=True)
                ]
            st.steps = [*st.steps[max(0, len(st.steps) - self.keep + 1) :], call.step]
            st.template = out
            return out
        from diffcache import kernels

        x = self.blocks.inputs(call)
        block = self.index[call.site.name]
        w = self.weights_for(block, tuple(st.steps), call.step, x[0].shape[-1], x[0].device)
        outs = [self.kernel(kernels.forecast, i, h, w) for i, h in zip(x, st.parts, strict=True)]
        if self.run.tracing:
            self.explain(call, st.steps, x, outs)
        return tuple(outs) if isinstance(st.template, (tuple, list)) else outs[0]

    def explain(self, call: Call, steps: list[int], x: list, outs: list) -> None:
        """The trace of a forecast: the full steps it extrapolates from, each cluster's solver
        (as run on this history) with its weights over them, and per stream the mean of the
        forecast residual (computed calls trace their residual's mean too)."""
        used = [effective_solver(s, len(steps)) for s in self.cluster_solvers]
        call.explain(
            "forecast",
            history=list(steps),
            solvers=used,
            weights=[solver_weights(s, steps, call.step) for s in used],
            residual_mean=[
                float((o.float() - i.float()).mean()) for i, o in zip(x, outs, strict=True)
            ],
        )


@register_method(HyCaConfig)
def apply(session: Session, cfg: HyCaConfig) -> None:
    """Forecast every block on the skipped steps of the schedule."""
    sites = session.target.sites("block")
    session.on_sites(sites, _HyCa(session, cfg, sites), "hyca")
