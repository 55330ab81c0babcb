"""``VARPipeline``: class-conditional image generation with VAR (research/var.md §1.1.2).

One generation runs the transformer once per scale, coarse to fine (a scale is a step). With
CFG the batch is doubled, conditional rows first and their null-class twins after, and the
guidance ramps linearly over the scales: ``t = cfg * si / (K - 1)``, logits
``(1 + t) cond - t uncond`` (none at the first scale). Each scale's tokens are drawn with top-k
/ top-p sampling from one ``torch.Generator``; their codes join the VQ-VAE's running latent
``f_hat``, which, area-downsampled, is the next scale's input. The attention's K/V history lives
in a store the pipeline gets from :meth:`VARPipeline.history_store` (a KV method wraps it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffcache.errors import UnsupportedModelError
from diffcache.kv.history import FullHistory, History, ScaleCall, Schedule
from diffcache.pipelines._events import DriverEvents
from diffcache.pipelines.dlm_loading import check_weights
from diffcache.pipelines.dlm_pipeline import RequestError
from diffcache.pipelines.var import sampling
from diffcache.pipelines.var.config import PATCH_NUMS_256, PATCH_NUMS_512, VARConfig, VQVAEConfig
from diffcache.pipelines.var.transformer import VARTransformer
from diffcache.pipelines.var.vqvae import VQVAE

#: the released tokenizer's file
VAE_FILE = "vae_ch160v4096z32.pth"


@dataclasses.dataclass
class VAROutput:
    """Images (``[H, W, 3]`` float32 in [0, 1]), each scale's sampled indices ``[B, pn*pn]``
    and the final latent ``f_hat`` ``[B, Cvae, side, side]``."""

    images: list[np.ndarray]
    indices: list[torch.Tensor]
    f_hat: torch.Tensor


class VARPipeline(DriverEvents):
    """VAR generation: ``pipe([207, 88], cfg=4.0, top_k=900, top_p=0.95, seed=0).images``.

    ``last_history`` is the last generation's store (its K/V and byte counts).
    """

    #: the guidance scale of a call that gives none
    DEFAULT_CFG = 1.5

    @staticmethod
    def guided(cfg: float) -> bool:
        """Whether a call with guidance ``cfg`` runs the null-class twins (2 rows per image)."""
        return cfg > 0

    def __init__(self, transformer: VARTransformer, vae: VQVAE) -> None:
        t, q = transformer.config, vae.config
        assert (t.vocab_size, t.z_channels) == (q.vocab_size, q.z_channels), (t, q)
        assert t.patch_nums[-1] == q.patch_nums[-1], (t.patch_nums, q.patch_nums)
        self.transformer, self.vae = transformer, vae
        self.last_history: History | None = None

    @property
    def num_classes(self) -> int:
        return self.transformer.config.num_classes

    @property
    def schedule(self) -> Schedule:
        return Schedule.square(self.transformer.config.patch_nums)

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        depth: int = 16,
        patch_nums: Sequence[int] | None = None,
        torch_dtype: torch.dtype = torch.float32,
        device: str = "cpu",
    ) -> VARPipeline:
        """The released checkpoints in ``folder``: ``var_d{depth}.pth`` and the tokenizer
        ``vae_ch160v4096z32.pth`` (depth 36: shared AdaLN and the 512 px scales)."""
        folder = Path(folder)
        if patch_nums is None:
            patch_nums = PATCH_NUMS_512 if depth == 36 else PATCH_NUMS_256
        config = VARConfig.from_depth(depth, patch_nums=tuple(patch_nums), shared_aln=depth == 36)
        vae_config = VQVAEConfig(patch_nums=config.patch_nums)
        with torch.device("meta"):
            transformer, vae = VARTransformer(config), VQVAE(config=vae_config)
        for module, name in ((transformer, f"var_d{depth}.pth"), (vae, VAE_FILE)):
            load_strict(module, folder / name)
        return cls(transformer.eval(), vae).to(device, torch_dtype)

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> VARPipeline:
        for module in (self.transformer, self.vae):
            module.to(device=device, dtype=dtype)
        return self

    def history_store(self) -> History:
        """The K/V history store of the next generation (plain: keep everything)."""
        return FullHistory()

    # -- generation --------------------------------------------------------------------------
    def check_request(
        self, labels: list[Any], cfg: Any, top_k: Any, top_p: Any, seed: Any, generator: Any
    ) -> None:
        """Refuse bad arguments (all at once) before any model call."""
        problems = []
        if not labels:
            problems.append("no class label given")
        bad = [x for x in labels if isinstance(x, bool) or not isinstance(x, int)]
        bad += [x for x in labels if x not in bad and not 0 <= x < self.num_classes]
        if bad:
            top = self.num_classes - 1
            problems.append(f"class label(s) {bad} out of range: this model has classes 0..{top}")
        if not _number(cfg) or cfg < 0:
            problems.append(f"cfg must be a finite number >= 0, got {cfg!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            problems.append(f"top_k must be a whole number >= 0 (0: off), got {top_k!r}")
        if not _number(top_p) or not 0 <= top_p <= 1:
            problems.append(f"top_p must be a number in [0, 1] (0: off), got {top_p!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            problems.append(f"seed must be a whole number >= 0, got {seed!r}")
        if seed is not None and generator is not None:
            problems.append("give seed or generator, not both")
        if problems:
            raise RequestError("; ".join(problems))

    def make_generator(self, seed: int | None, generator: torch.Generator | None) -> Any:
        """The sampler's generator on the model's device: seeded with ``seed``, or with the
        seed of a ``generator`` made for another device; None: torch's global RNG."""
        device = self.transformer.lvl_1L.device
        if generator is not None and generator.device == device:
            return generator
        if generator is not None:
            seed = generator.initial_seed()
        return None if seed is None else torch.Generator(device).manual_seed(seed)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | Sequence[int] | torch.Tensor,
        cfg: float = DEFAULT_CFG,
        top_k: int = 0,
        top_p: float = 0.0,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        more_smooth: bool = False,
    ) -> VAROutput:
        """Generate one image per class label. ``cfg`` 0 runs without the unconditional rows;
        ``top_k`` / ``top_p`` 0 are off; ``more_smooth`` (visualisation only) feeds Gumbel-
        softmax mixtures of codes forward instead of the sampled codes."""
        if isinstance(class_labels, torch.Tensor):
            class_labels = class_labels.tolist()
        labels = [class_labels] if isinstance(class_labels, int) else list(class_labels)
        self.check_request(labels, cfg, top_k, top_p, seed, generator)
        rng = self.make_generator(seed, generator)
        model, quant = self.transformer, self.vae.quantize
        sides, b = model.config.patch_nums, len(labels)
        device = model.lvl_1L.device
        guided = self.guided(cfg)
        nulls = [self.num_classes] * b if guided else []  # CFG: the null-class twins
        rows = torch.tensor(labels + nulls, device=device)
        cond, x = model.first_input(rows)
        schedule, num = self.schedule, len(sides)
        history = self.last_history = self.history_store()
        f_hat = cond.new_zeros(b, quant.z_channels, sides[-1], sides[-1])
        indices = []
        self.begin_run(num)
        try:
            for si, pn in enumerate(sides):
                self.begin_step()
                ratio = si / (num - 1)
                logits = model(x, cond, history, ScaleCall(0, si, schedule, cond_rows=b))
                if guided:
                    t = cfg * ratio
                    logits = (1 + t) * logits[:b] - t * logits[b:]
                logits = sampling.filtered(logits, top_k, top_p)
                idx = sampling.draw(logits, rng)
                indices.append(idx)
                if more_smooth:
                    tau = max(0.27 * (1 - 0.95 * ratio), 0.005)
                    soft = sampling.gumbel_softmax(logits * (1 + ratio), tau, rng)
                    h = (soft @ quant.embedding.weight).transpose(1, 2).reshape(b, -1, pn, pn)
                else:
                    h = quant.codes(idx, pn, pn)
                f_hat, small = quant.next_input(si, num, f_hat, h)
                if si < num - 1:
                    x = model.next_input(si + 1, small.flatten(2).transpose(1, 2))
                    x = torch.cat([x, x]) if guided else x
        finally:
            self.end_run()
        images = (self.vae.fhat_to_img(f_hat) + 1) / 2
        pixels = images.permute(0, 2, 3, 1).float().cpu().numpy()
        return VAROutput(list(pixels), indices, f_hat)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_strict(module: torch.nn.Module, path: Path) -> None:
    """Load ``path`` (a flat state dict, read with ``weights_only``) into ``module`` (built on
    the meta device), refusing a missing file or any missing, unexpected or mis-shaped key in
    one error. The VQ-VAE's codebook-usage buffer is kept as built when its number of scales
    differs (a training statistic; upstream does the same)."""
    if not path.is_file():
        raise UnsupportedModelError(f"{path}: no such checkpoint file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    own = module.state_dict()
    usage = "quantize.ema_vocab_hit_SV"
    if usage in own and usage in state and state[usage].shape != own[usage].shape:
        state[usage] = torch.zeros(own[usage].shape)
    found = {k: tuple(v.shape) for k, v in state.items()}
    check_weights(
        module,
        found,
        str(path),
        hint=f"the checkpoint does not fit {type(module).__name__}",
        advice="Check the file and the depth given.",
    )
    module.load_state_dict(state, strict=True, assign=True)
