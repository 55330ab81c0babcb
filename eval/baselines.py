"""What an evaluation compares with the baseline: our plans, and diffusers' built-in caches.

A comparison is named by a plan (file, bundled name, dict or Plan) or by a spec string
``diffusers:<cache>[:key=value,key=value]`` for one of diffusers' ``enable_cache`` configs:

- ``diffusers:fbcache:threshold=0.1`` — ``FirstBlockCacheConfig``;
- ``diffusers:taylorseer:cache_interval=2,disable_cache_before_step=4,max_order=1`` —
  ``TaylorSeerCacheConfig``, with ``cache_identifiers`` defaulting to the attention modules of
  every block (diffusers' own default patterns miss Wan's and CogVideoX's ``attn1`` / ``attn2``);
- ``diffusers:pab`` — ``PyramidAttentionBroadcastConfig`` (its ``current_timestep_callback``
  reads the pipeline's current timestep).

Values are YAML scalars. diffusers' caches report no computed work, so their
``compute_fraction`` is null.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from diffcache.errors import DiffCacheError
from diffcache.plan import Plan
from diffcache.registry import did_you_mean

PREFIX = "diffusers:"
#: re.fullmatch patterns of the attention modules of every block, across the families we adapt.
ATTENTION_PATTERNS = [
    rf"^{blocks}.*attn\d*"
    for blocks in ("blocks", "transformer_blocks", "single_transformer_blocks")
]


@dataclasses.dataclass
class Comparison:
    """One configuration compared with the baseline: how to set it up and tear it down."""

    name: str
    method: str
    setup: Callable[[Any], None]
    teardown: Callable[[Any], None]
    plan: Plan | None = None  # ours: diffcache.stats() describes its runs

    def check(self, pipe: Any) -> None:
        """Attach and detach once: refuses a comparison that does not fit the model, before any
        generation runs."""
        self.setup(pipe)
        self.teardown(pipe)


def comparison(spec: Any) -> Comparison:
    """A comparison from a plan or a ``diffusers:...`` spec (validated, nothing attached)."""
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
        PyramidAttentionBroadcastConfig,
        TaylorSeerCacheConfig,
    )

    def taylorseer(**kw: Any) -> Any:
        return TaylorSeerCacheConfig(**{"cache_identifiers": ATTENTION_PATTERNS, **kw})

    return {
        "fbcache": FirstBlockCacheConfig,
        "taylorseer": taylorseer,
        "pab": PyramidAttentionBroadcastConfig,
    }


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
    for item in filter(None, params.split(",")):
        key, sep, text = item.partition("=")
        if not sep:
            raise DiffCacheError(f"--plan {spec}: expected key=value, got {item!r}")
        kwargs[key.strip()] = loads_yaml(text, f"--plan {spec}")
    try:
        configs[name](**kwargs)
    except (TypeError, ValueError) as e:
        raise DiffCacheError(f"--plan {spec}: {e}") from e

    def setup(pipe: Any) -> None:
        transformer = pipe.transformer
        if not hasattr(transformer, "enable_cache"):
            raise DiffCacheError(
                f"--plan {spec}: {type(transformer).__name__} has no diffusers enable_cache"
            )
        config = configs[name](**kwargs)
        if name == "pab":
            config.current_timestep_callback = lambda: pipe.current_timestep
        transformer.enable_cache(config)

    def teardown(pipe: Any) -> None:
        if getattr(pipe.transformer, "is_cache_enabled", False):
            pipe.transformer.disable_cache()

    return Comparison(spec, f"diffusers:{name}", setup, teardown)
