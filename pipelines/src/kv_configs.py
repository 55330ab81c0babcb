"""The released next-scale models' KV geometry from their configs alone (no weights, nothing
built): what ``diffcache kv`` computes memory for (research/var.md §1.1.3, §2.1.8).

Names follow the released checkpoints: ``var-d16`` ... ``var-d36`` (``var_d{depth}.pth``) and
``infinity-2b`` / ``infinity-8b``; the built-in models ``var-tiny``, ``var-digits`` (its config
file, not its weights) and ``infinity-tiny`` (on its own small templates) are there too. Both
families use cosine attention, so the cache holds K in fp32 (normalised under autocast) and V in
the compute dtype. The attention rows of a batch are its images, twice where the pipeline runs
classifier-free guidance at the request's scale (``VARPipeline.guided``,
``InfinityPipeline.guided``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from diffcache.errors import DiffCacheError
from diffcache.kv.history import Schedule
from diffcache.kv.memory import Geometry
from diffcache.pipelines import var_digits
from diffcache.pipelines.infinity.config import CONFIGS as INFINITY_CONFIGS
from diffcache.pipelines.infinity.pipeline import InfinityPipeline
from diffcache.pipelines.infinity.schedule import (
    TEMPLATES_1M,
    VAE_STRIDE,
    Maps,
    template_schedule,
)
from diffcache.pipelines.infinity.tiny import TINY_TEMPLATES
from diffcache.pipelines.var import TINY as VAR_TINY
from diffcache.pipelines.var.config import PATCH_NUMS_256, PATCH_NUMS_512, VARConfig, VQVAEConfig
from diffcache.pipelines.var.pipeline import VARPipeline

#: bytes per element of each ``--dtype``
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclasses.dataclass(frozen=True)
class KVConfig:
    """One model's self-attention cache shape: ``sides`` is its largest schedule (the default
    image size is ``sides[-1] * stride`` px); ``sizes`` True when the schedule follows the image
    size (Infinity: a prefix of its aspect ratio's template in ``templates``, the model's own),
    False when the model makes one size (VAR); ``pipeline`` the class that runs it (its
    ``guided(cfg)`` rule and ``DEFAULT_CFG``)."""

    family: str
    layers: int
    heads: int
    head_dim: int
    sides: tuple[int, ...]
    sizes: bool
    pipeline: type
    cosine: bool = True
    stride: int = VAE_STRIDE
    templates: Mapping[float, Maps] = dataclasses.field(default_factory=lambda: TEMPLATES_1M)

    @property
    def size(self) -> int:
        """The default image side in pixels."""
        return self.sides[-1] * self.stride

    def rows(self, batch: int, guidance: float | None = None) -> int:
        """The attention rows of ``batch`` images at guidance scale ``guidance`` (None: the
        pipeline's default): two per image where the pipeline runs CFG there, else one."""
        scale = self.pipeline.DEFAULT_CFG if guidance is None else guidance
        return 2 * batch if self.pipeline.guided(scale) else batch

    def schedule(self, height: int | None = None, width: int | None = None) -> Schedule:
        """The maps of a ``height`` x ``width`` image (default: :attr:`size`); DiffCacheError
        naming the size for one the model does not make."""
        height = self.size if height is None else height
        width = self.size if width is None else width
        if self.sizes:
            try:
                return template_schedule(height, width, self.templates)[0]
            except ValueError as e:
                raise DiffCacheError(f"--height/--width: {e}") from None
        if (height, width) != (self.size, self.size):
            raise DiffCacheError(
                f"--height {height} --width {width}: this {self.family} model makes "
                f"{self.size}x{self.size} images only"
            )
        return Schedule.square(self.sides)

    def geometry(
        self,
        batch: int,
        dtype: str,
        height: int | None = None,
        width: int | None = None,
        guidance: float | None = None,
    ) -> Geometry:
        """The cache of ``batch`` images computed in ``dtype`` at guidance scale ``guidance``
        (:meth:`rows`)."""
        element = DTYPE_BYTES[dtype]
        k_bytes = 4 if self.cosine else element
        schedule = self.schedule(height, width)
        rows = self.rows(batch, guidance)
        return Geometry(self.layers, self.heads, self.head_dim, schedule, rows, k_bytes, element)


def _var(config: VARConfig, vae: VQVAEConfig) -> KVConfig:
    return KVConfig(
        "var",
        config.depth,
        config.num_heads,
        config.head_dim,
        config.patch_nums,
        sizes=False,
        pipeline=VARPipeline,
        stride=vae.downsample,
    )


def _var_released(depth: int) -> KVConfig:
    sides = PATCH_NUMS_512 if depth == 36 else PATCH_NUMS_256
    return _var(VARConfig.from_depth(depth, patch_nums=sides), VQVAEConfig(patch_nums=sides))


def _infinity(model_type: str, templates: Mapping[float, Maps] = TEMPLATES_1M) -> KVConfig:
    """An Infinity config on its templates (the released models': the 1M ones)."""
    c = INFINITY_CONFIGS[model_type]
    sides = tuple(h for h, _ in templates[1.0])
    return KVConfig(
        "infinity",
        c.depth,
        c.num_heads,
        c.head_dim,
        sides,
        True,
        InfinityPipeline,
        templates=templates,
    )


#: config name -> the model's KV geometry (``diffcache kv --model NAME``)
KV_CONFIGS: dict[str, KVConfig] = {
    **{f"var-d{d}": _var_released(d) for d in (16, 20, 24, 30, 36)},
    "infinity-2b": _infinity("infinity_2b"),
    "infinity-8b": _infinity("infinity_8b"),
    "infinity-tiny": _infinity("infinity_tiny", TINY_TEMPLATES),
    "var-tiny": _var(*VAR_TINY),
    "var-digits": _var(*var_digits.configs()),
}


def kv_config(name: str) -> KVConfig:
    """The named config, or DiffCacheError listing the known names."""
    if name not in KV_CONFIGS:
        raise DiffCacheError(
            f"--model {name}: not a model config diffcache kv knows; known: {', '.join(KV_CONFIGS)}"
        )
    return KV_CONFIGS[name]
