"""InvarDiff: a deterministic two-level reuse plan from quantiles of feature change rates.

Paper: InvarDiff (arXiv 2512.05134); reference code zihaowu25/InvarDiff (FLUX.1-dev,
DiT-XL/2, Wan2.1). The rules below follow the reference code as read for
``shared/research/dit.md`` §1.3; where we differ it is said.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar

import torch

from diffcache.errors import DiffCacheError, PlanError, TargetUnreachable
from diffcache.methods.base import Calibrated, MethodConfig, option
from diffcache.registry import did_you_mean, register_method
from diffcache.session import Call, Session
from diffcache.sites import BlockStreams, Site

_EPS = 1e-8
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
      block's own arithmetic (bit for bit in float32), for the block classes the adapter
      describes (``Stack.gated``: Wan, FLUX and HunyuanVideo dual-stream, Qwen-Image,
      CogVideoX, DiT); FLUX's and HunyuanVideo's single-stream blocks gate ``proj_out`` of
      their concatenated module outputs, so they keep running. Such blocks count as skipped
      block calls; module work is unchanged.

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

    @classmethod
    def identity(cls) -> InvarDiffConfig:
        return cls(step_quantile=0.0, module_quantiles=dict.fromkeys(ROLE_DEFAULTS, 0.0))

    @classmethod
    def aggressive(cls) -> InvarDiffConfig:
        return cls(
            nonskip_rate=0.0, step_quantile=1.0, module_quantiles=dict.fromkeys(ROLE_DEFAULTS, 1.0)
        )

    def quantile_for(self, site: Site) -> float:
        keys = (f"{site.stack.attr}.{site.role}", site.role)
        return float(
            next((self.module_quantiles[k] for k in keys if k in self.module_quantiles), 0.0)
        )

    def calibrate(self, profiling: Any) -> Calibrated:
        target = profiling.target
        sites = target.sites("module")
        if not sites:
            raise DiffCacheError("invardiff: this model declares no module sites")
        steps = profiling.valid_for["num_inference_steps"]
        first = scores_of(profiling.record(_Recorder(target, None)), steps, len(sites))
        config = self
        if profiling.target_compute is not None:
            config = _fit_quantile(self, first, sites, steps, profiling.target_compute)
        step_book, module_book = books(config, *first, sites)
        scores = first
        if config.correction:
            second = _Recorder(target, (step_book, module_book))
            scores = scores_of(profiling.record(second), steps, len(sites))
            if profiling.target_compute is not None:  # the final books meet the target too
                config = _fit_quantile(self, scores, sites, steps, profiling.target_compute)
            step_book, module_book = books(config, *scores, sites)
        cal = InvarDiffCalibration(
            tuple(s.name for s in sites),
            step_book,
            module_book,
            scores[0].float(),
            scores[1].float(),
        )
        measured = {
            "compute_fraction": round(1 - float(module_book.float().mean()), 6),
            "reused_steps": [int(t) for t in step_book.nonzero().flatten()],
        }
        return Calibrated(config, cal, measured=measured)


def _quantile_mask(values: torch.Tensor, q: float) -> torch.Tensor:
    if values.numel() == 0:
        return torch.zeros_like(values, dtype=torch.bool)
    return values < torch.quantile(values.double(), q).to(values.dtype)


def books(
    cfg: InvarDiffConfig,
    step_scores: torch.Tensor,
    module_scores: torch.Tensor,
    sites: Sequence[Site],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The step book (T,) and module book (T, M) of these scores, step-first merged."""
    t = step_scores.shape[0]
    keep = max(1, int(cfg.nonskip_rate * t))
    step = torch.zeros(t, dtype=torch.bool)
    step[1:-1] = _quantile_mask(step_scores[1:-1], cfg.step_quantile)
    step[:keep] = False
    step[-1] = False
    module = torch.zeros(t, len(sites), dtype=torch.bool)
    families: dict[tuple, list[int]] = defaultdict(list)
    for m, s in enumerate(sites):
        families[(s.expert, s.stack.attr, s.role)].append(m)
    for cols in families.values():
        q = cfg.quantile_for(sites[cols[0]])
        block = module_scores[1:-1][:, cols]
        module[1:-1, cols] = _quantile_mask(block.reshape(-1), q).reshape(block.shape)
    module[:keep] = False
    module[-1] = False
    return step, step_first(step, module)


def step_first(step: torch.Tensor, module: torch.Tensor) -> torch.Tensor:
    """A reused step reuses every module; the step after it computes every module."""
    module = module.clone()
    for k in range(len(step)):
        if step[k]:
            module[k] = True
            if k + 1 < len(step):
                module[k + 1] = False
    return module


def _fit_quantile(
    cfg: InvarDiffConfig, scores: tuple, sites: Sequence[Site], steps: int, target: float
) -> InvarDiffConfig:
    def make(q: float) -> InvarDiffConfig:
        return dataclasses.replace(
            cfg,
            step_quantile=q,
            module_quantiles=dict.fromkeys(cfg.module_quantiles, q),
        )

    def fraction(q: float) -> float:
        return 1 - float(books(make(q), *scores, sites)[1].float().mean())

    if fraction(1.0) > target:
        raise TargetUnreachable(
            f"invardiff: even at quantile 1 the plan computes {fraction(1.0):.3f} of the module "
            f"calls, above the target {target:.3f}; lower nonskip_rate or ask for less",
            fraction(1.0),
        )
    lo, hi = 0.0, 1.0
    for _ in range(20):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if fraction(mid) <= target else (mid, hi)
    chosen = books(make(hi), *scores, sites)
    for digits in (2, 3, 4):  # a readable quantile where it gives the same books (hi <= 1: so is q)
        q = math.ceil(hi * 10**digits) / 10**digits
        if all(map(torch.equal, books(make(q), *scores, sites), chosen)):
            return make(q)
    return make(hi)


def scores_of(data: Mapping[str, torch.Tensor], steps: int, modules: int) -> tuple:
    """(step scores (T,), module scores (T, M)) from recorded rate sums; rows 0 and T-1 are 1."""
    if not data:
        raise DiffCacheError(
            f"invardiff: no change rate was recorded over {steps} steps (rates need at least 3 "
            "steps and module sites that run)"
        )
    count = data["count"].clamp_min(1)
    step = torch.ones(steps, dtype=torch.float64)
    module = torch.ones(steps, modules, dtype=torch.float64)
    step[1:-1] = data["step"][1 : steps - 1] / count[1 : steps - 1]
    module[1:-1] = data["module"][1 : steps - 1] / count[1 : steps - 1, None]
    return step, module


class _Recorder:
    """Change-rate sums of the cond branch: every module site's output and the last block's
    hidden output; with ``plan`` (provisional books) the references freeze through reuse runs."""

    kinds = ("block", "module")

    def __init__(self, target: Any, plan: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        self.modules = {s.name: m for m, s in enumerate(target.sites("module"))}
        blocks = target.sites("block")
        self.last = blocks[-1] if blocks else None
        self.plan = plan
        self.state: dict[Any, list] = {}  # stream -> [ref, prev_norm, frozen]
        self.sums: dict[tuple, float] = defaultdict(float)
        self.steps = 0

    def _feature(self, call: Call, output: Any) -> tuple[Any, torch.Tensor] | None:
        if call.branch != 0:
            return None
        if call.site.kind == "module":
            parts = output if isinstance(output, (tuple, list)) else (output,)
            flat = torch.cat([p.detach().float().flatten() for p in parts if p is not None])
            return self.modules[call.site.name], flat
        if self.last is not None and call.site.name == self.last.name:
            parts = output if isinstance(output, (tuple, list)) else (output,)
            return "step", parts[call.site.returns.index("hidden")].detach().float().flatten()
        return None

    def _cached(self, stream: Any, t: int) -> bool:
        if self.plan is None or t < 0:
            return False
        step_book, module_book = self.plan
        return bool(step_book[t]) if stream == "step" else bool(module_book[t, stream])

    def see(self, call: Call, output: Any) -> None:
        found = self._feature(call, output)
        if found is None:
            return
        stream, f = found
        t = call.step
        self.steps = max(self.steps, t + 1)
        st = self.state.get(stream)
        if st is None:
            self.state[stream] = [f, None, False]
            return
        ref, prev_norm, frozen = st
        norm = float((f - ref).abs().sum()) + _EPS * f.numel()
        if prev_norm is not None:
            self.sums[stream, t - 1] += norm / prev_norm
            if stream == "step":
                self.sums["count", t - 1] += 1.0
        if not self._cached(stream, t - 1):
            self.state[stream] = [f, norm, False]
        elif not frozen:
            self.state[stream] = [f, norm, True]

    def end_request(self) -> None:
        self.state.clear()

    def result(self) -> dict[str, torch.Tensor]:
        if not self.sums:
            return {}
        t = self.steps
        out = {
            "step": torch.zeros(t, dtype=torch.float64),
            "module": torch.zeros(t, len(self.modules), dtype=torch.float64),
            "count": torch.zeros(t, dtype=torch.float64),
        }
        for (stream, k), v in self.sums.items():
            if stream == "step":
                out["step"][k] += v
            elif stream == "count":
                out["count"][k] += v
            else:
                out["module"][k, stream] += v
        return out


# ---------------------------------------------------------------------------------------------
# runtime


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


#: skip a block whose every module is planned reused (input + gated cached outputs, one fused
#: pass) where the adapter describes the block; False runs such blocks (tests compare the two)
FUSE_BLOCKS = True


@register_method(InvarDiffConfig)
def apply(session: Session, cfg: InvarDiffConfig) -> None:
    """Reuse modules and whole steps exactly as the books say."""
    from diffcache.gated import BlockSkipper

    cal: InvarDiffCalibration = session.calibration
    target = session.target
    modules, blocks = target.sites("module"), target.sites("block")
    _check(cal, modules, session.run.valid_for.get("num_inference_steps"))
    step_book = cal.step_book.tolist()
    module_book = cal.module_book.tolist()
    column = {s.name: m for m, s in enumerate(modules)}
    last = blocks[-1].name if blocks else None
    streams = BlockStreams(blocks)
    skipper = BlockSkipper(blocks, modules) if FUSE_BLOCKS else None
    fusable: dict[str, list[bool]] = {}  # block -> steps where every module of it is reused
    for b in blocks:
        cols = [column[m.name] for m in (skipper.modules(b.name) if skipper else [])]
        if cols:
            fusable[b.name] = [all(row[c] for c in cols) for row in module_book]

    tracing = session.run.tracing
    step_scores = cal.step_scores.tolist() if tracing and cal.step_scores is not None else None
    module_scores = (
        cal.module_scores.tolist() if tracing and cal.module_scores is not None else None
    )

    def explain(call: Call, book: list, scores: list | None, *index: int) -> None:
        """The book entry that decided ``call`` and the calibration score it came from."""
        if call.run.tracing:
            entry = book[call.step]
            score = scores[call.step] if scores is not None else None
            for i in index:
                entry, score = entry[i], None if score is None else score[i]
            call.explain(book=bool(entry), score=score)

    def module(call: Call) -> Any:
        slot = call.state(_Slot)
        explain(call, module_book, module_scores, column[call.site.name])
        if module_book[call.step][column[call.site.name]] and slot.output is not None:
            return slot.output
        slot.output = call.compute()
        return slot.output

    def cached(site: Site, call: Call) -> Any:
        return call.run.slot((site.name, site.expert, call.branch), _Slot).output

    def block(call: Call) -> Any:
        slot = call.state(_Slot)
        name = call.site.name
        explain(call, step_book, step_scores)
        if step_book[call.step] and not (name == last and slot.output is None):
            if name == last:
                return slot.output
            parts = streams.inputs(call)
            return parts if len(parts) > 1 else parts[0]
        out = None
        if fusable.get(name, ())[call.step : call.step + 1] == [True]:
            out = skipper(call, lambda site: cached(site, call), session.kernels)
            call.explain(fused=out is not None)  # every module reused: the block not run
        if out is None:
            out = call.compute()
        if name == last:
            slot.output = out
        return out

    session.on_sites(modules, module, "invardiff")
    hooked = blocks if any(step_book) else [b for b in blocks if any(fusable.get(b.name, ()))]
    if hooked:
        session.on_sites(hooked, block, "invardiff_step")


# ---------------------------------------------------------------------------------------------
# the reference code's JSON books

#: reference JSON (section, module key) -> (our stack attribute, our module attribute)
REFERENCE_KEYS = {
    "wan2.1": {("module_cache_book", "self_attn"): ("blocks", "attn1"),
               ("module_cache_book", "cross_attn"): ("blocks", "attn2"),
               ("module_cache_book", "ffn"): ("blocks", "ffn")},
    "flux": {("transformer_cache_book", "attn"): ("transformer_blocks", "attn"),
             ("transformer_cache_book", "ff"): ("transformer_blocks", "ff"),
             ("transformer_cache_book", "context_ff"): ("transformer_blocks", "ff_context"),
             ("single_transformer_cache_book", "attn"): ("single_transformer_blocks", "attn"),
             ("single_transformer_cache_book", "mlp"): ("single_transformer_blocks", "proj_mlp")},
}  # fmt: skip


#: reference keys with no site of their own: FLUX's ``context_attn`` narrows ``attn`` (see
#: ``import_reference_books``) and ``ip_attn`` is IP-adapter attention, which we do not hook
UNMAPPED_KEYS = {"flux": {("transformer_cache_book", "context_attn"),
                          ("transformer_cache_book", "ip_attn")}}  # fmt: skip
#: top-level keys that are no module book: the step book (Wan2.1's name, FLUX's) and the
#: metadata later reference releases write beside the books (not read)
STEP_KEYS = ("step_cache_bool", "step_cache_book")
METADATA_KEYS = ("cache_version", "rate_method", "config", "release")


def book_layout(family: str | None = None) -> dict[str, list[str]]:
    """Section -> the module keys the reference writes in it, for ``family``'s books (None: any
    family's)."""
    layout: dict[str, list[str]] = {}
    for fam, keys in REFERENCE_KEYS.items():
        if family in (None, fam):
            for section, key in [*keys, *sorted(UNMAPPED_KEYS.get(fam, ()))]:
                layout.setdefault(section, []).append(key)
    return layout


def _flags(row: Any) -> bool:
    return isinstance(row, list) and all(isinstance(v, (bool, int)) and v in (0, 1) for v in row)


def read_reference_books(
    path: str | Path, family: str | None = None
) -> tuple[list[Any], dict[str, dict[str, Any]]]:
    """The step book and the module books (section -> key -> one 0/1 row per step, one flag
    per layer) of a reference book file for ``family`` (None: any family's layout), checked
    for shape; unknown sections and keys are refused (with "did you mean"). A PlanError
    naming what is wrong."""

    def bad(why: str) -> PlanError:
        return PlanError(f"{path}: not an InvarDiff book file ({why})")

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise bad(f"{type(e).__name__}: {e}") from e
    if not isinstance(data, dict):
        raise bad("the top level is not an object")
    layout = book_layout(family)
    whose = f"{family} " if family else ""
    known = [*STEP_KEYS, *layout]
    for key in data:
        if key not in known and key not in METADATA_KEYS:
            raise bad(
                f"unknown section {key!r}{did_you_mean(key, known)}; {whose}books have "
                f"{', '.join(known)}"
            )
    step = data.get("step_cache_bool", data.get("step_cache_book"))
    if not _flags(step) or not step:
        raise bad("step_cache_bool / step_cache_book is not a non-empty list of 0/1 flags")
    books = {}
    for section in sorted(set(layout) & set(data)):
        book = data[section]
        if not isinstance(book, dict) or not all(
            isinstance(rows, list)
            and len(rows) == len(step)
            and all(map(_flags, rows))
            and len({len(r) for r in rows}) == 1
            for rows in book.values()
        ):
            raise bad(
                f"{section} is not an object of 0/1 lists per layer, one list per step "
                f"({len(step)} steps)"
            )
        for key in book:
            if key not in layout[section]:
                raise bad(
                    f"{section}.{key}: unknown module{did_you_mean(key, layout[section])}; "
                    f"{whose}{section} has {', '.join(layout[section])}"
                )
        books[section] = book
    return step, books


def import_reference_books(path: str | Path, pipe: Any, out: str | Path | None = None) -> Any:
    """A plan for ``pipe`` from the reference code's JSON books (Wan2.1: ``step_cache_bool`` +
    ``module_cache_book``; FLUX: ``step_cache_book`` + ``transformer_cache_book`` +
    ``single_transformer_cache_book``, where ``attn`` is reused only where ``context_attn`` is
    too, and ``ip_attn`` has no site here)."""
    from diffcache.adapter import Target
    from diffcache.plan import Plan, make_plan
    from diffcache.registry import find_adapter

    target = Target.resolve(find_adapter(pipe), pipe)
    keys = REFERENCE_KEYS.get(target.adapter.name)
    if keys is None:
        raise DiffCacheError(
            f"invardiff: no reference book layout for {target.adapter.name} models; "
            f"known: {', '.join(REFERENCE_KEYS)}"
        )
    step, data = read_reference_books(path, target.adapter.name)
    t = len(step)
    sites = target.sites("module")
    module = torch.zeros(t, len(sites), dtype=torch.bool)
    layers: dict[str, int] = defaultdict(int)  # stack attribute -> its blocks
    for s in target.sites("block"):
        layers[s.stack.attr] = max(layers[s.stack.attr], s.index + 1)
    stacks = {section: stack for (section, _), (stack, _) in keys.items()}
    for section, book in data.items():
        for key, rows in book.items():
            if len(rows[0]) != layers[stacks[section]]:
                raise PlanError(
                    f"{path}: {section}.{key} has books for {len(rows[0])} layers but the "
                    f"model has {layers[stacks[section]]} {stacks[section]}; import books made "
                    "for this model"
                )

    def column(section: str, key: str, layer: int) -> torch.Tensor:
        return torch.tensor([bool(r[layer]) for r in data[section][key]])

    for m, s in enumerate(sites):
        attr = s.name.rsplit(".", 1)[1]
        found = [k for k, v in keys.items() if v == (s.stack.attr, attr)]
        if not found or found[0][1] not in data.get(found[0][0], {}):
            continue  # a module the book does not plan: always computed
        section, key = found[0]
        module[:, m] = column(section, key, s.index)
        if (section, key) == ("transformer_cache_book", "attn") and "context_attn" in data[section]:
            module[:, m] &= column(section, "context_attn", s.index)
    step_book = torch.tensor([bool(v) for v in step])
    step_book[0] = False  # nothing is cached before the first step
    cal = InvarDiffCalibration(
        tuple(s.name for s in sites), step_book, step_first(step_book, module),
        torch.ones(t, dtype=torch.float32), torch.ones(t, len(sites), dtype=torch.float32),
    )  # fmt: skip
    valid_for: dict[str, Any] = {"num_inference_steps": t}
    if target.scheduler is not None:
        valid_for["scheduler"] = type(target.scheduler).__name__
    plan = make_plan(target, InvarDiffConfig(), cal, valid_for)
    plan = dataclasses.replace(plan, provenance={"imported_from": Path(path).name})
    return Plan.load(plan.save(out)) if out is not None else plan
