"""HyCa: hybrid feature caching, a solver per cluster of hidden dimensions.

Paper: "Let Features Decide Their Own Solvers: Hybrid Feature Caching for Diffusion
Transformers" (HyCa, arXiv 2510.04188, ICLR 2026). No reference code was public; the rules
follow the paper's main text as collected in ``shared/research/dit.md`` §1.4, and every formula
the paper leaves to its (unavailable) appendix is an explicit choice below.

The offline recorder and the clustering are in ``hyca_calibrate``, the solver stencils in
``hyca_solvers``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from diffcache.adapter import Capabilities
from diffcache.errors import PlanError, RunError
from diffcache.fewstep import StepLimit
from diffcache.methods.base import MethodConfig, option
from diffcache.methods.hyca_solvers import (
    SOLVERS,
    effective_solver,
    history_length,
    solver_weights,
)
from diffcache.registry import register_method
from diffcache.session import Call, Session
from diffcache.sites import Site
from diffcache.streams import BlockStreams


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

    def step_limit(self, steps: int) -> StepLimit | None:
        """Step ``W`` computes (it starts the first interval) and the first forecast is step
        ``W + 1``: ``W + 2`` steps at least (and none with ``interval`` 1, at any count)."""
        least = self.warmup_steps + 2
        if self.interval == 1 or steps >= least:
            return None
        fix = steps - 2 if steps >= 3 else None
        return StepLimit(least, "warmup_steps", self.warmup_steps, fix)


@dataclasses.dataclass
class _History:
    """The full-step residuals of one (block, branch), as many as the plan reads (``keep``).

    Each stream's residuals live in one buffer of ``2 keep`` entries allocated on the first
    store: the ``c``-th is written at ``c % keep`` and ``c % keep + keep``, so the last ``n``
    are always the contiguous slice ending at ``c % keep + keep``, oldest first (no rebuild)."""

    steps: tuple[int, ...] = ()  # the full steps held, oldest first
    buffers: list[torch.Tensor] = dataclasses.field(default_factory=list)  # (2 keep, *shape)
    stored: int = 0  # residuals stored so far
    template: Any = None

    def parts(self, keep: int) -> list[torch.Tensor]:
        """Each stream's history, ``(len(steps), *shape)``, oldest first."""
        end = (self.stored - 1) % keep + keep + 1
        return [b[end - len(self.steps) : end] for b in self.buffers]


class _HyCa:
    """The schedule and the plan's solvers, over one (block, branch)'s history."""

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
        self.solvers = sorted(set(cal.cluster_solvers), key=SOLVERS.index)  # the ones in use
        solver_of = torch.tensor([self.solvers.index(s) for s in cal.cluster_solvers])
        self.dim_solver = solver_of[cal.labels]  # (blocks, D): index into self.solvers
        self.keep = history_length(cal.cluster_solvers)  # history entries the plan reads
        self.cluster_solvers = cal.cluster_solvers
        self.weights: dict[tuple, tuple[torch.Tensor, ...]] = {}  # (steps, k, device) -> (H, D)s
        from diffcache import kernels  # resolved once: a skipped block call is on the hot path

        self.forecast = kernels.forecast
        steps = session.run.valid_for.get("num_inference_steps")
        if steps:  # the blocks' device now (a model without weights: the CPU)
            probe = next(session.target.denoiser.parameters(), torch.empty(0))
            self.prepare(int(steps), probe.device)

    def prepare(self, steps: int, device: torch.device) -> None:
        """Make now, when the session opens, the weights of every forecast a run of ``steps``
        steps makes (each skipped step's history is the schedule's last full steps), so that
        its first generation does not."""
        held: tuple[int, ...] = ()
        for k in range(steps):
            if self.cfg.full(k):
                held = (*held, k)[-self.keep :]
            elif held:
                self.table(held, k, device)

    def weights_for(self, block: int, steps: tuple[int, ...], k: int, dims: int, device) -> Any:
        """``(H, D)``: each of ``block``'s dimensions' solver weights over the history at
        ``steps`` forecasting step ``k``; made for every block at once, once per (steps, k,
        device)."""
        if self.dim_solver.shape[1] != dims:
            raise self.run.fail(
                RunError(
                    f"hyca: the plan clusters {self.dim_solver.shape[1]} hidden dimensions "
                    f"but this block has {dims} ({self.run.where()}); profile this model"
                )
            )
        return self.table(steps, k, device)[block]

    def table(self, steps: tuple[int, ...], k: int, device: Any) -> tuple[torch.Tensor, ...]:
        """Every block's ``(H, D)`` weights forecasting step ``k`` from the history at
        ``steps``, made once per (steps, k, device)."""
        key = (steps, k, device)  # blocks spread over devices keep one table per device
        w = self.weights.get(key)
        if w is None:
            table = torch.tensor([solver_weights(s, steps, k) for s in self.solvers])  # (S, H)
            w = table[self.dim_solver].transpose(1, 2).contiguous().to(device).unbind(0)
            if len(self.weights) > 4096:
                self.weights.clear()
            self.weights[key] = w
        return w

    def decide(self, call: Call, st: _History) -> bool:
        """Whether this call computes: a full step of the schedule, or no history yet."""
        return self.cfg.full(call.step) or not st.steps

    def store(self, call: Call, st: _History, out: Any) -> None:
        """Keep this computed call's residual per stream (the last ``keep`` full steps)."""
        x = self.blocks.inputs(call)
        y = BlockStreams.parts(out)
        if not st.buffers:
            st.buffers = [
                torch.empty((2 * self.keep, *o.shape), dtype=torch.float32, device=o.device)
                for o in y
            ]
        slot = st.stored % self.keep
        for b, i, o in zip(st.buffers, x, y, strict=True):
            newest = b[slot + self.keep]
            torch.sub(o.float(), i.float(), out=newest)
            b[slot].copy_(newest)
        if self.run.tracing:
            call.explain(residual_mean=[float(b[slot].mean()) for b in st.buffers])
        st.stored += 1
        st.steps = (*st.steps[max(0, len(st.steps) - self.keep + 1) :], call.step)
        st.template = out

    def reuse(self, call: Call, st: _History) -> Any:
        """The block's output forecast: its input plus each dimension's solver on the history."""
        x = self.blocks.inputs(call)
        block = self.index[call.site.name]
        w = self.weights_for(block, st.steps, call.step, x[0].shape[-1], x[0].device)
        history = st.parts(self.keep)
        outs = [self.kernel(self.forecast, i, h, w) for i, h in zip(x, history, strict=True)]
        if self.run.tracing:
            self.explain(call, st.steps, x, outs)
        return tuple(outs) if isinstance(st.template, (tuple, list)) else outs[0]

    def __call__(self, call: Call) -> Any:
        st = call.state(_History)
        if not self.decide(call, st):
            return self.reuse(call, st)
        out = call.compute()
        self.store(call, st, out)
        return out

    def explain(self, call: Call, steps: tuple[int, ...], x: list, outs: list) -> None:
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
