"""InvarDiff: a deterministic two-level reuse plan from quantiles of feature change rates.

Paper: InvarDiff (arXiv 2512.05134); reference code zihaowu25/InvarDiff (FLUX.1-dev,
DiT-XL/2, Wan2.1). The rules below follow the reference code as read for
``shared/research/dit.md`` §1.3; where we differ it is said.

The change-rate recorder, the books and the reference books' import are in
``invardiff_calibrate``.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, ClassVar

import torch

from diffcache.adapter import Capabilities
from diffcache.errors import PlanError
from diffcache.fewstep import StepLimit
from diffcache.methods.base import MethodConfig, option
from diffcache.registry import register_method
from diffcache.session import Call, Session
from diffcache.sites import Site
from diffcache.streams import BlockStreams

ROLE_DEFAULTS = MappingProxyType(
    {"self_attn": 0.5, "cross_attn": 0.5, "ff": 0.5, "context_ff": 0.5}
)


@dataclasses.dataclass(frozen=True)
class InvarDiffCalibration:
    """The plan: ``step_book[t]`` (reuse the whole block stack at step t) and
    ``module_book[t, m]`` (reuse module site ``m``'s raw output at step t), module sites in the
    adapter's order and named in ``sites``; the change-rate ``scores`` they came from."""

    sites: tuple[str, ...] = option((), "module site names, in order")
    step_book: torch.Tensor = dataclasses.field(default=None)  # type: ignore[assignment]
    module_book: torch.Tensor = dataclasses.field(default=None)  # type: ignore[assignment]
    step_scores: torch.Tensor = dataclasses.field(default=None)  # type: ignore[assignment]
    module_scores: torch.Tensor = dataclasses.field(default=None)  # type: ignore[assignment]


@dataclasses.dataclass(frozen=True)
class InvarDiffConfig(MethodConfig):
    """InvarDiff (arXiv 2512.05134): reuse, as planned offline, whole steps (the pre-head hidden
    state) and single modules' raw outputs (before the AdaLN gates, which are recomputed).

    Rules, as the reference code implements them:

    - Score of a feature stream ``F`` (each module site's output; the last block's hidden
      output for the step gate): ``n_t = |F_t - F_(t-1)|_1``, ``r_t = n_(t+1) / n_t``, averaged
      over the calibration prompts (cond branch only); ``r_0 = r_(T-1) = 1``.
    - Books: a step / (step, module) entry is reused iff its score is below the
      ``step_quantile`` / its role's ``module_quantiles`` quantile of the scores of rows
      ``1..T-2`` (per module family: one stack's sites of one role, all steps and layers
      pooled); the first ``max(1, int(nonskip_rate T))`` steps and the last step compute.
      Step first: a reused step reuses every module, and the step after it computes every
      module (their caches were not refreshed).
    - Re-sampling correction (``correction``): a second calibration pass scores again, with the
      reference feature frozen through runs of consecutive planned reuses (refreshed once at
      the first reuse of a run), and the final books come from those scores.
    - Runtime: a reused step runs the embedders and the output head as usual, returns each
      block's input unchanged and the last block's cached output; a reused module returns its
      cached raw output. CFG branches keep their own caches and share the plan.
      ``compute_fraction`` = computed module calls / module calls.
    - Block skip (ours, exact): at a step where every module of a block is reused, the block
      is not run; its output is its input plus each cached module output times its AdaLN gate
      (recomputed from the block's modulation and the current conditioning, as the block
      does), in one fused pass (``kernels.gated_apply``; ``diffcache.gated``). This is the
      block's own arithmetic (bit for bit in float32), for the block classes described with
      ``diffcache.gated.describe`` (Wan, FLUX and HunyuanVideo dual-stream, Qwen-Image,
      CogVideoX, DiT); FLUX's and HunyuanVideo's single-stream blocks gate ``proj_out`` of
      their concatenated module outputs, so they keep running. Such blocks count as skipped
      block calls; module work is unchanged. ``fuse_blocks: false`` runs them instead (the
      same output; for comparing the two).

    ``diffcache profile --target-compute F`` sets one quantile ``q`` for the step gate and
    every module family: the smallest ``q`` whose first-pass books compute at most ``F`` makes
    the provisional books of the correction pass, and ``q`` is fitted again on the corrected
    scores so that the final books compute at most ``F`` too. ``import_reference_books``
    turns the reference code's JSON books (Wan2.1 and FLUX layouts) into a plan.

    Reference defaults: Wan2.1 ``nonskip_rate 0.1``, quantiles 0.5; FLUX.1-dev fast
    ``0.1 / 0.7 / 0.68``; DiT-XL/2 fast ``0 / 0.63 / 0.22`` (dit.md §1.3.5).

    Deliberate differences: the step gate reuses the last block's output through the block
    sites (embedders still run; no forward override), and is corrected as in the Wan code (the
    FLUX code corrects modules only). ``n_t`` adds ``1e-8`` per element, as the reference does.
    Per-role quantiles apply to the sites of that role in every stack (FLUX's double and single
    blocks alike); a ``"<stack>.<role>"`` key sets one stack apart.
    """

    name: ClassVar[str] = "invardiff"
    granularity: ClassVar[str] = "module"
    needs: ClassVar[Capabilities] = Capabilities(("block", "module"), denoiser="latent")
    kernels: ClassVar[tuple[str, ...]] = ("gated_apply",)
    calibration: ClassVar[type] = InvarDiffCalibration
    probe_kinds: ClassVar[tuple[str, ...]] = ()

    nonskip_rate: float = option(0.1, "share of the first steps that always compute", min=0, max=1)
    step_quantile: float = option(
        0.5, "quantile of step scores below which a step is reused", min=0, max=1
    )
    module_quantiles: Mapping[str, float] = option(
        default_factory=lambda: dict(ROLE_DEFAULTS),
        min=0.0,
        max=1.0,
        doc="per module role (or '<stack>.<role>'): quantile for reuse",
    )
    correction: bool = option(True, "re-score with frozen references (second pass)")
    fuse_blocks: bool = option(
        True, "skip a block whose every module is reused (one fused pass, exact); false runs it"
    )

    @classmethod
    def identity(cls) -> InvarDiffConfig:
        return cls(step_quantile=0.0, module_quantiles=dict.fromkeys(ROLE_DEFAULTS, 0.0))

    @classmethod
    def aggressive(cls) -> InvarDiffConfig:
        return cls(
            nonskip_rate=0.0, step_quantile=1.0, module_quantiles=dict.fromkeys(ROLE_DEFAULTS, 1.0)
        )

    def step_limit(self, steps: int) -> StepLimit | None:
        """The first ``max(1, int(nonskip_rate T))`` steps and the last one compute; a rate of 1
        reuses nothing at any step count."""
        if self.nonskip_rate >= 1 or self._acts(steps):
            return None
        least = next(t for t in itertools.count(3) if self._acts(t))
        fix = float(f"{(steps - 2) / steps:.3g}") if steps >= 3 else None
        return StepLimit(least, "nonskip_rate", self.nonskip_rate, fix)

    def _acts(self, steps: int) -> bool:
        return max(1, int(self.nonskip_rate * steps)) <= steps - 2

    def quantile_for(self, site: Site) -> float:
        keys = (f"{site.stack.attr}.{site.role}", site.role)
        return float(
            next((self.module_quantiles[k] for k in keys if k in self.module_quantiles), 0.0)
        )


@dataclasses.dataclass
class _Slot:
    output: Any = None


def _check(cal: InvarDiffCalibration, sites: Sequence[Site], steps: int | None) -> None:
    names = tuple(s.name for s in sites)
    t = cal.step_book.shape[0] if cal.step_book is not None else -1
    problems = []
    if cal.sites != names:
        i = next(
            (i for i, (a, b) in enumerate(zip(cal.sites, names, strict=False)) if a != b), None
        )
        where = f"site {i}: {cal.sites[i]} vs {names[i]}" if i is not None else "count"
        problems.append(
            f"the plan's {len(cal.sites)} module sites are not this model's {len(names)} ({where})"
        )
    if cal.step_book.dim() != 1 or tuple(cal.module_book.shape) != (t, len(names)):
        problems.append(
            f"books have shapes {tuple(cal.step_book.shape)} and {tuple(cal.module_book.shape)}; "
            f"want (T,) and (T, {len(names)})"
        )
    if t > 0 and bool(cal.step_book[0]):
        problems.append("step 0 cannot be a reused step (nothing is cached yet)")
    if steps is not None and t != steps:
        problems.append(f"the books have {t} steps but the plan is valid for {steps}")
    if problems:
        raise PlanError("invardiff: " + "; ".join(problems) + "; profile this model")


class _InvarDiff:
    """The books followed exactly: a module site answers from its cache where the module book
    says so; a block site passes its input through on a reused step (the last block returns its
    cached output), or, where every module of the block is reused, is skipped in one fused pass
    (``fuse_blocks``)."""

    def __init__(
        self, session: Session, cfg: InvarDiffConfig, modules: list[Site], blocks: list[Site]
    ) -> None:
        from diffcache.gated import BlockSkipper

        cal: InvarDiffCalibration = session.calibration
        _check(cal, modules, session.run.valid_for.get("num_inference_steps"))
        self.kernel = session.kernel
        self.step_book = cal.step_book.tolist()
        self.module_book = cal.module_book.tolist()
        self.column = {s.name: m for m, s in enumerate(modules)}
        self.last = {b.expert: b for b in blocks}  # each expert's last block (Wan2.2: two)
        self.streams = BlockStreams(blocks)
        self.skipper = BlockSkipper(blocks, modules) if cfg.fuse_blocks else None
        self.fusable: dict[str, list[bool]] = {}  # block -> steps where all its modules reuse
        for b in blocks:
            owned = self.skipper.modules(b.name) if self.skipper else []
            if cols := [self.column[m.name] for m in owned]:
                self.fusable[b.name] = [all(row[c] for c in cols) for row in self.module_book]
        tracing = session.run.tracing
        self.step_scores = (
            cal.step_scores.tolist() if tracing and cal.step_scores is not None else None
        )
        self.module_scores = (
            cal.module_scores.tolist() if tracing and cal.module_scores is not None else None
        )

    def explain(self, call: Call, book: list, scores: list | None, *index: int) -> None:
        """The book entry that decided ``call`` and the calibration score it came from."""
        if call.run.tracing:
            entry = book[call.step]
            score = scores[call.step] if scores is not None else None
            for i in index:
                entry, score = entry[i], None if score is None else score[i]
            call.explain(book=bool(entry), score=score)

    def module(self, call: Call) -> Any:
        """A module site: its cached raw output where the book reuses it, else computed."""
        slot = call.state(_Slot)
        column = self.column[call.site.name]
        self.explain(call, self.module_book, self.module_scores, column)
        if self.module_book[call.step][column] and slot.output is not None:
            return slot.output
        slot.output = call.compute()
        return slot.output

    def cached(self, call: Call, site: Site) -> Any:
        """``site``'s cached output for ``call``'s branch (None before its first compute)."""
        return call.run.slot((site.name, site.expert, call.branch), _Slot).output

    def block(self, call: Call) -> Any:
        """A block site: passed through (or the cached last output) on a reused step, skipped
        where all its modules are reused, else computed (the last block's output kept)."""
        slot = call.state(_Slot)
        name, last = call.site.name, self.last[call.site.expert]
        self.explain(call, self.step_book, self.step_scores)
        # a reused step returns the stack output this expert cached (none yet: all compute)
        if self.step_book[call.step] and self.cached(call, last) is not None:
            if name == last.name:
                return slot.output
            parts = self.streams.inputs(call)
            return parts if len(parts) > 1 else parts[0]
        out = None
        if self.fusable.get(name, ())[call.step : call.step + 1] == [True]:
            out = self.skipper(call, functools.partial(self.cached, call), self.kernel)
            call.explain(fused=out is not None)  # every module reused: the block not run
        if out is None:
            out = call.compute()
        if name == last.name:
            slot.output = out
        return out


@register_method(InvarDiffConfig)
def apply(session: Session, cfg: InvarDiffConfig) -> None:
    """Reuse modules and whole steps exactly as the books say."""
    modules, blocks = session.target.sites("module"), session.target.sites("block")
    handler = _InvarDiff(session, cfg, modules, blocks)
    session.on_sites(modules, handler.module, "invardiff")
    fusable = handler.fusable
    hooked = (
        blocks if any(handler.step_book) else [b for b in blocks if any(fusable.get(b.name, ()))]
    )
    if hooked:
        session.on_sites(hooked, handler.block, "invardiff_step")
