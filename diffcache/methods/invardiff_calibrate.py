"""InvarDiff's offline side: the change-rate recorder, the books from quantiles of its scores
(with the re-sampling correction and the quantile for a compute target), and the reference
code's JSON books turned into a plan."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from diffcache.calibration import register_calibrator
from diffcache.errors import DiffCacheError, PlanError, TargetUnreachable, did_you_mean
from diffcache.methods.base import Calibrated
from diffcache.methods.invardiff import InvarDiffCalibration, InvarDiffConfig
from diffcache.session import Call
from diffcache.sites import Site

_EPS = 1e-8


@register_calibrator(InvarDiffConfig)
def calibrate(cfg: InvarDiffConfig, profiling: Any) -> Calibrated:
    """Score the plain run, make the books (fitting the quantile to a compute target), and
    with ``correction`` score again against them and make the final books."""
    target = profiling.target
    sites = target.sites("module")
    if not sites:
        raise DiffCacheError("invardiff: this model declares no module sites")
    steps = profiling.valid_for["num_inference_steps"]
    first = scores_of(profiling.record(_Recorder(target, None)), steps, len(sites))
    config = cfg
    if profiling.target_compute is not None:
        config = _fit_quantile(cfg, first, sites, steps, profiling.target_compute)
    step_book, module_book = books(config, *first, sites)
    scores = first
    if config.correction:
        second = _Recorder(target, (step_book, module_book))
        scores = scores_of(profiling.record(second), steps, len(sites))
        if profiling.target_compute is not None:  # the final books meet the target too
            config = _fit_quantile(cfg, scores, sites, steps, profiling.target_compute)
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


def reference_keys(family: str, given: str = "") -> dict[tuple[str, str], tuple[str, str]]:
    """The reference books' (section, key) -> (stack, module) of ``family``'s models (a
    pipeline variant's base family), or a DiffCacheError (naming ``given``, the model as the
    user gave it) when the reference has none."""
    if family not in REFERENCE_KEYS:
        raise DiffCacheError(
            f"invardiff: no reference book layout for {family} models"
            f"{f' ({given})' if given else ''}; known: {', '.join(REFERENCE_KEYS)}"
        )
    return REFERENCE_KEYS[family]


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
    from diffcache.plan import Plan
    from diffcache.registry import find_adapter

    target = Target.resolve(find_adapter(pipe), pipe)
    family = target.adapter.family  # a pipeline variant's books are its base family's
    keys = reference_keys(family)
    step, data = read_reference_books(path, family)
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
    plan = InvarDiffConfig().as_plan(target, cal, valid_for)
    plan = dataclasses.replace(plan, provenance={"imported_from": Path(path).name})
    return Plan.load(plan.save(out)) if out is not None else plan
