"""What an evaluation compares with the baseline: our plans, and diffusers' built-in caches.

A comparison is named by a plan (file, bundled name, dict or Plan) or by a spec string
``diffusers:<cache>[:key=value,key=value]`` for one of diffusers' ``enable_cache`` configs:

- ``diffusers:fbcache:threshold=0.1`` — ``FirstBlockCacheConfig``;
- ``diffusers:taylorseer:cache_interval=2,disable_cache_before_step=4,max_order=1`` —
  ``TaylorSeerCacheConfig``, with ``cache_identifiers`` defaulting to the attention modules of
  every block (diffusers' own default patterns miss Wan's and CogVideoX's ``attn1`` / ``attn2``);
- ``diffusers:pab`` — ``PyramidAttentionBroadcastConfig`` (its ``current_timestep_callback``
  reads the pipeline's current timestep);
- ``diffusers:magcache:num_inference_steps=20,mag_ratios=[1.0, 1.02, ...]`` —
  ``MagCacheConfig``. Its magnitude ratios belong to one checkpoint and schedule:
  :func:`magcache` measures them on the model with diffusers' own calibration mode and returns
  the comparison ready to evaluate (``bench/dit_methods.py`` does this).

Values are YAML (a list in brackets may hold commas); each key's type and range are checked
(``OPTIONS``) when the spec is parsed. diffusers' caches report no computed
work, so their ``compute_fraction`` is null; the ``macs_fraction`` the runner counts compares
them with ours. ``evaluate`` also takes a :class:`Comparison`
itself.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

from diffcache.errors import DiffCacheError, PlanError, did_you_mean
from diffcache.options import coerce
from diffcache.plan import Plan

PREFIX = "diffusers:"
#: PyramidAttentionBroadcastConfig's skip ranges; without any, diffusers uses the first at 2
PAB_RANGES = (
    "spatial_attention_block_skip_range",
    "temporal_attention_block_skip_range",
    "cross_attention_block_skip_range",
)
logger = logging.getLogger(__name__)
#: re.fullmatch patterns of the attention modules of every block, across the families we adapt.
ATTENTION_PATTERNS = [
    rf"^{blocks}.*attn\d*"
    for blocks in ("blocks", "transformer_blocks", "single_transformer_blocks")
]
PAB_KINDS = ("spatial", "temporal", "cross")

#: the options a spec may set, per cache: type and bounds (inclusive), as diffusers' config
#: dataclasses and the hooks that read them use each one (the config itself checks nothing)
_AT_LEAST_0, _AT_LEAST_1 = {"min": 0}, {"min": 1}
_SKIP_RANGE = (int | None, _AT_LEAST_1)  # PAB: attention is computed once every N calls
_TIMESTEPS = (tuple[int, int], _AT_LEAST_0)  # PAB: the timesteps where it may skip
_PATTERNS = (tuple[str, ...], {})
OPTIONS: dict[str, dict[str, tuple[Any, dict[str, float]]]] = {
    "fbcache": {"threshold": (float, _AT_LEAST_0)},
    "taylorseer": {
        "cache_interval": (int, _AT_LEAST_1),  # one full step every N
        "disable_cache_before_step": (int, _AT_LEAST_1),  # a forecast needs a computed step
        "disable_cache_after_step": (int | None, _AT_LEAST_0),
        "max_order": (int, _AT_LEAST_0),  # 0: reuse the last output
        "skip_predict_identifiers": (list[str] | None, {}),
        "cache_identifiers": (list[str] | None, {}),
        "use_lite_mode": (bool, {}),
    },
    "pab": {
        **{f"{kind}_attention_block_skip_range": _SKIP_RANGE for kind in PAB_KINDS},
        **{f"{kind}_attention_timestep_skip_range": _TIMESTEPS for kind in PAB_KINDS},
        **{f"{kind}_attention_block_identifiers": _PATTERNS for kind in PAB_KINDS},
    },
    "magcache": {
        "threshold": (float, _AT_LEAST_0),
        "max_skip_steps": (int, _AT_LEAST_0),
        "retention_ratio": (float, {"min": 0, "max": 1}),
        "num_inference_steps": (int, _AT_LEAST_1),
        "mag_ratios": (list[float] | None, _AT_LEAST_0),
        "calibrate": (bool, {}),
    },
}


@dataclasses.dataclass
class Comparison:
    """One configuration compared with the baseline: how to set it up and tear it down."""

    name: str
    method: str
    setup: Callable[[Any], None]
    teardown: Callable[[Any], None]
    plan: Plan | None = None  # ours: diffcache.stats() describes its runs

    def check_family(self, adapter: Any, model: str) -> None:
        """Refuse a comparison made for another model family (before the model is built)."""
        if self.plan is not None:
            self.plan.check_family(adapter.family, model)
            self.plan.config.check_needs(adapter, f"--plan {self.name}")
        elif adapter.media == "text":
            raise DiffCacheError(
                f"--plan {self.name}: diffusers caches attach to a diffusers transformer, and "
                f"{model} is a {adapter.name} text model; compare diffcache plans on it"
            )
        elif not cache_capable(adapter):
            raise DiffCacheError(
                f"--plan {self.name}: diffusers caches attach to a transformer with "
                f"enable_cache, and {' / '.join(adapter.denoisers)} ({model}) has none; compare "
                "diffcache plans on it"
            )

    def check(self, pipe: Any) -> None:
        """Attach and detach once: refuses a comparison that does not fit the model, before any
        generation runs."""
        self.setup(pipe)
        self.teardown(pipe)


def cache_capable(adapter: Any) -> bool:
    """Whether a family's denoiser takes diffusers' ``enable_cache`` (DiT's does not): read from
    the diffusers classes it names, so nothing is built (a family naming none that diffusers has
    is left to the attach check)."""
    import diffusers

    known = [cls for name in adapter.denoisers if (cls := getattr(diffusers, name, None))]
    return not known or any(hasattr(cls, "enable_cache") for cls in known)


def comparison(spec: Any) -> Comparison:
    """A comparison from a plan or a ``diffusers:...`` spec (validated, nothing attached), or
    the comparison itself."""
    if isinstance(spec, Comparison):
        return spec
    if isinstance(spec, str) and spec.startswith(PREFIX):
        return _diffusers(spec)
    import diffcache

    plan = Plan.load(spec)
    return Comparison(
        plan.name,
        plan.method,
        lambda pipe: diffcache.accelerate(pipe, plan),
        diffcache.remove,
        plan,
    )


def _configs() -> dict[str, Callable[..., Any]]:
    from diffusers import (
        FirstBlockCacheConfig,
        MagCacheConfig,
        PyramidAttentionBroadcastConfig,
        TaylorSeerCacheConfig,
    )

    def taylorseer(**kw: Any) -> Any:
        return TaylorSeerCacheConfig(**{"cache_identifiers": ATTENTION_PATTERNS, **kw})

    return {
        "fbcache": FirstBlockCacheConfig,
        "taylorseer": taylorseer,
        "pab": PyramidAttentionBroadcastConfig,
        "magcache": MagCacheConfig,
    }


def _split(params: str) -> list[str]:
    """``key=value`` items separated by commas outside brackets."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(params):
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0:
            items.append(params[start:i])
            start = i + 1
    items.append(params[start:])
    return [item for item in items if item.strip()]


def _diffusers(spec: str) -> Comparison:
    from diffcache.yamlio import loads_yaml

    name, _, params = spec[len(PREFIX) :].partition(":")
    configs = _configs()
    if name not in configs:
        raise DiffCacheError(
            f"--plan {spec}: unknown diffusers cache {name!r}{did_you_mean(name, configs)}; "
            f"known: {', '.join(configs)}"
        )
    kwargs: dict[str, Any] = {}
    for item in _split(params):
        key, sep, text = item.partition("=")
        if not sep:
            raise DiffCacheError(f"--plan {spec}: expected key=value, got {item!r}")
        kwargs[key.strip()] = loads_yaml(text, f"--plan {spec}")
    return _diffusers_comparison(spec, name, kwargs)


def _diffusers_comparison(spec: str, name: str, kwargs: dict[str, Any]) -> Comparison:
    configs = _configs()
    if name == "magcache" and kwargs.get("mag_ratios") is None and not kwargs.get("calibrate"):
        raise DiffCacheError(
            f"--plan {spec}: MagCache needs mag_ratios=[...] and num_inference_steps=N, "
            "measured on this model and schedule; diffcache.eval.baselines.magcache(pipe, "
            "inputs, request) runs diffusers' calibration and returns the comparison"
        )
    kwargs = _options(spec, name, kwargs)
    if name == "pab" and not any(kwargs.get(k) is not None for k in PAB_RANGES):
        # diffusers warns of its default each time the cache is attached (once per request)
        logger.warning(
            "--plan %s: no attention skip range given; using diffusers' default "
            "spatial_attention_block_skip_range=2 (set one of %s to choose)",
            spec,
            ", ".join(PAB_RANGES),
        )
        kwargs = {**kwargs, PAB_RANGES[0]: 2}
    try:
        configs[name](**kwargs)
    except (TypeError, ValueError) as e:
        raise DiffCacheError(f"--plan {spec}: {e}") from e

    def setup(pipe: Any) -> None:
        transformer = getattr(pipe, "transformer", None)
        if not hasattr(transformer, "enable_cache"):
            what = (
                "no transformer"
                if transformer is None
                else f"a {type(transformer).__name__} without one"
            )
            raise DiffCacheError(
                f"--plan {spec}: diffusers caches attach to a transformer with enable_cache; "
                f"{type(pipe).__name__} has {what}"
            )
        config = configs[name](**kwargs)
        if name == "pab":
            config.current_timestep_callback = lambda: pipe.current_timestep
        transformer.enable_cache(config)

    def teardown(pipe: Any) -> None:
        if getattr(getattr(pipe, "transformer", None), "is_cache_enabled", False):
            pipe.transformer.disable_cache()

    return Comparison(spec, f"diffusers:{name}", setup, teardown)


def _options(spec: str, name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` checked against ``OPTIONS[name]`` (known keys, types, bounds), every problem
    in one DiffCacheError naming the key and the value."""
    known, problems, out = OPTIONS[name], [], {}
    for key, value in kwargs.items():
        if key not in known:
            problems.append(
                f"{key}: {name} has no such option{did_you_mean(key, known)}; options: "
                f"{', '.join(known)}"
            )
            continue
        hint, bounds = known[key]
        try:
            out[key] = coerce(value, hint, key, bounds)
        except PlanError as e:
            problems.append(str(e))
    if problems:
        raise DiffCacheError(f"--plan {spec}: {'; '.join(problems)}")
    return out


def magcache_ratios(pipe: Any, inputs: Sequence[str], request: Any) -> list[float]:
    """MagCache's magnitude ratios for ``pipe`` at ``request``'s steps, measured by diffusers'
    own calibration mode (``MagCacheConfig(calibrate=True)``: nothing is skipped and, per cache
    context, the mean over tokens of ``|r_t| / |r_(t-1)|`` of the block stack's residual is
    logged when the last step ends) on each input at ``request``'s first seed. The ratios are
    the mean over inputs and CFG contexts (cond and uncond each log a list; diffusers applies one
    list to both)."""
    import ast
    import contextlib
    import io
    import logging

    from diffusers import MagCacheConfig

    from diffcache.generate import expand, generate
    from diffcache.registry import find_adapter

    steps = request.get("steps")
    if not inputs or not steps:
        raise DiffCacheError("magcache calibration needs inputs and a request with steps")
    transformer = pipe.transformer
    if not hasattr(transformer, "enable_cache"):
        raise DiffCacheError(f"{type(transformer).__name__} has no diffusers enable_cache")
    lists: list[list[float]] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            text = record.getMessage()
            if text.startswith("MagCache Calibration Results:"):
                lists.append([float(v) for v in ast.literal_eval(text.split(":", 1)[1].strip())])

    log = logging.getLogger("diffusers.hooks.mag_cache")
    catch, level, propagate = Catch(), log.level, log.propagate
    log.addHandler(catch)
    log.setLevel(logging.INFO)
    log.propagate = False
    transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
    try:
        for req in expand(find_adapter(pipe), list(inputs), 1, request):
            with contextlib.redirect_stdout(io.StringIO()):  # it also prints the list
                generate(pipe, req)
    finally:
        transformer.disable_cache()
        log.removeHandler(catch)
        log.setLevel(level)
        log.propagate = propagate
    if not lists or any(len(v) != steps for v in lists):
        raise DiffCacheError(
            f"magcache calibration logged {[len(v) for v in lists]} ratios for {steps} steps"
        )
    return [sum(col) / len(col) for col in zip(*lists, strict=True)]


def magcache(pipe: Any, inputs: Sequence[str], request: Any, **options: Any) -> Comparison:
    """diffusers' MagCache calibrated on ``pipe`` (:func:`magcache_ratios` on ``inputs`` at
    ``request``) with ``options`` (``threshold``, ``max_skip_steps``, ``retention_ratio``), as
    a comparison named by its options."""
    ratios = magcache_ratios(pipe, inputs, request)
    shown = ",".join(f"{k}={v}" for k, v in options.items())
    spec = f"{PREFIX}magcache" + (f":{shown}" if shown else "")
    kwargs = {**options, "num_inference_steps": len(ratios), "mag_ratios": ratios}
    return _diffusers_comparison(spec, "magcache", kwargs)
