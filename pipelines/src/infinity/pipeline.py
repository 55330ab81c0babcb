"""``InfinityPipeline``: Infinity's next-scale text-to-image loop (research/var.md §1.2.3).

One generation: T5 features of the prompts (and, with CFG, the learned unconditional text or a
negative prompt as the second half of the batch), the pooled text as the first map's input,
then per scale the blocks over the new map (self-attention through the generation's history
store), bit logits divided by ``tau``, ``cfg * cond + (1 - cfg) * uncond``, one draw per bit
(top-k, top-p, a seeded generator), and the codes summed at the final size; the sum resized to
the next map is its input. Bitwise self-correction is training-only and plays no part.

Each scale is a step of the ``pipeline`` driver (``begin_run(num_steps=scales)``,
``begin_step``, ``end_run``); :meth:`history_store` gives each generation its store
(:class:`~diffcache.kv.history.FullHistory`: the plain model), a KV method hands in its own.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffcache.errors import DiffCacheError
from diffcache.kv.history import FullHistory, History, Schedule
from diffcache.pipelines._events import DriverEvents
from diffcache.pipelines.infinity import text
from diffcache.pipelines.infinity.attention import ScaleContext
from diffcache.pipelines.infinity.bitwise import Codes, greedy_bits, sample_bits
from diffcache.pipelines.infinity.bsq import load_bsq_decoder
from diffcache.pipelines.infinity.config import CONFIGS
from diffcache.pipelines.infinity.model import Infinity, load_transformer
from diffcache.pipelines.infinity.schedule import (
    TEMPLATES_1M,
    VAE_STRIDE,
    Maps,
    rope_table,
    template_schedule,
)

#: upstream file names inside a model folder (``scripts/infer.sh``)
WEIGHTS = {"infinity_2b": "infinity_2b_reg.pth", "infinity_8b": "infinity_8b_weights"}
VAES = {"infinity_8b": "infinity_vae_d56_f8_14_patchify.pth"}
VAE = "infinity_vae_d32reg.pth"
TEXT_ENCODER = "flan-t5-xl"


class RequestError(DiffCacheError, ValueError):
    """A generation request the pipeline cannot run (checked before any model call)."""


@dataclasses.dataclass
class ImageOutput:
    """Images ``(H, W, 3)`` float32 in [0, 1] (None with ``output_type="codes"``), the summed
    codes ``[B, d, 1, H, W]``, and per scale the sampled bits ``[B, n, d]`` and the logits
    the bits were drawn from (after ``tau`` and CFG)."""

    images: list[np.ndarray] | None
    codes: torch.Tensor
    bits: list[torch.Tensor]
    logits: list[torch.Tensor]


class InfinityPipeline(DriverEvents):
    """``pipe("a red fox", cfg=3, tau=1.0, seed=0).images[0]``.

    Args:
        transformer: the transformer.
        vae: a decoder with ``decode(codes [B, d, H, W]) -> [B, 3, h, w]`` in [-1, 1]
            (:class:`~diffcache.pipelines.infinity.bsq.BSQDecoder`), or None (only
            ``output_type="codes"``).
        text_encoder: a ``T5EncoderModel``.
        tokenizer: its tokenizer (``tokenizer(texts, max_length=..., padding="max_length",
            truncation=True, return_tensors="pt")``).
        templates: aspect ratio (h/w) -> the maps ``(h, w)`` of its full schedule (RoPE is
            normalised to its last map; smaller images use its first maps); default the
            released models' fifteen ratios.
        patchify: 2x2 VAE cells per token (the 8B's VAE).
    """

    #: the guidance scale of a call that gives none
    DEFAULT_CFG = 3.0

    @staticmethod
    def guided(cfg: float) -> bool:
        """Whether a call with guidance ``cfg`` runs the unconditional twins (2 rows per
        prompt): every scale but 1, where ``cfg·cond + (1 − cfg)·uncond`` is the conditional."""
        return cfg != 1

    def __init__(
        self,
        transformer: Infinity,
        vae: Any,
        text_encoder: Any,
        tokenizer: Any,
        templates: Mapping[float, Maps] = TEMPLATES_1M,
        patchify: bool = False,
    ) -> None:
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.templates = dict(templates)
        self.patchify = patchify

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        model_type: str = "infinity_2b",
        torch_dtype: torch.dtype = torch.float32,
        device: str = "cpu",
    ) -> InfinityPipeline:
        """The transformer weights (``infinity_2b_reg.pth``, or the sharded
        ``infinity_8b_weights/``), the BSQ VAE's decoder (``infinity_vae_d32reg.pth``; the
        8B's ``infinity_vae_d56_f8_14_patchify.pth``) and Flan-T5 (``flan-t5-xl/``,
        transformers' ``T5EncoderModel`` and ``AutoTokenizer``) of a local folder."""
        from transformers import AutoTokenizer, T5EncoderModel

        if model_type not in CONFIGS:
            raise DiffCacheError(f"model_type {model_type!r} is not one of {', '.join(CONFIGS)}")
        folder = Path(folder)
        weights = folder / WEIGHTS.get(model_type, f"{model_type}.pth")
        vae_path = folder / VAES.get(model_type, VAE)
        encoder_dir = folder / TEXT_ENCODER
        missing = [p.name for p in (weights, vae_path, encoder_dir) if not p.exists()]
        if missing:
            raise DiffCacheError(
                f"{folder}: no {', '.join(missing)} (an Infinity {model_type} folder holds "
                f"{weights.name}, {vae_path.name} and {TEXT_ENCODER}/)"
            )
        transformer = load_transformer(Infinity(CONFIGS[model_type]), weights).eval()
        vae = load_bsq_decoder(vae_path)
        encoder = T5EncoderModel.from_pretrained(encoder_dir, torch_dtype=torch_dtype).eval()
        tokenizer = AutoTokenizer.from_pretrained(encoder_dir)
        pipe = cls(transformer, vae, encoder, tokenizer, patchify=model_type == "infinity_8b")
        return pipe.to(device, torch_dtype)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        """Move the transformer, text encoder and decoder (and cast the transformer and
        decoder to ``dtype``); returns the pipeline."""
        self.transformer.to(device=device, dtype=dtype)
        self.text_encoder.to(device=device)
        if self.vae is not None:
            self.vae.to(device=device, dtype=dtype)
        return self

    def history_store(self) -> History:
        """The history store of the next generation (plain: keep everything)."""
        return FullHistory()

    # -- generation ---------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """The side in pixels of the 1:1 template's largest image (the default size)."""
        return self.templates[1.0][-1][0] * VAE_STRIDE

    @property
    def max_side(self) -> int:
        """The longest side in pixels of any template's largest image."""
        return max(max(maps[-1]) for maps in self.templates.values()) * VAE_STRIDE

    def schedule(self, height: int | None, width: int | None) -> Schedule:
        """The maps of a ``height`` x ``width`` image (default: the 1:1 template's largest)."""
        return self._template(height, width)[0]

    def _template(self, height: int | None, width: int | None) -> tuple[Schedule, tuple[int, int]]:
        """:meth:`schedule` and its template's last map (what RoPE is normalised to)."""
        try:
            return template_schedule(height or self.size, width or self.size, self.templates)
        except ValueError as e:
            raise RequestError(str(e)) from None

    @staticmethod
    def check(cfg: float, tau: float, top_k: int, top_p: float) -> None:
        """Refuse sampler settings out of range (before any work)."""
        problems = []
        if not (math.isfinite(cfg) and cfg >= 0):
            problems.append(f"cfg must be a finite number >= 0, got {cfg!r}")
        if not (math.isfinite(tau) and tau >= 0):
            problems.append(f"tau must be a finite number >= 0, got {tau!r}")
        if int(top_k) != top_k or top_k < 0:
            problems.append(f"top_k must be a whole number >= 0, got {top_k!r}")
        if not 0 <= top_p <= 1:
            problems.append(f"top_p must be in [0, 1], got {top_p!r}")
        if problems:
            raise RequestError("; ".join(problems))

    def conditions(
        self, prompts: Sequence[str], negative: Sequence[str] | None, guided: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 features and mask of the batch: the prompts, then with CFG their unconditional
        twins (the negative prompts, or the learned ``cfg_uncond`` over each prompt's length),
        in the transformer's dtype."""
        maxlen = self.transformer.config.text_maxlen
        dtype = self.transformer.head.weight.dtype

        def encode(texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
            features, mask = text.encode(self.tokenizer, self.text_encoder, texts, maxlen)
            return features.to(dtype), mask

        cond = encode(prompts)
        if not guided:
            return cond
        if negative is not None:
            return text.stack(cond, encode(negative))
        return text.stack(cond, (self.transformer.unconditional(*cond), cond[1]))

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        cfg: float = DEFAULT_CFG,
        tau: float = 1.0,
        top_k: int = 900,
        top_p: float = 0.97,
        height: int | None = None,
        width: int | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "np",
    ) -> ImageOutput:
        """Generate one image per prompt; ``tau=0`` takes each bit's likelier class (no
        draws). ``generator`` (else one seeded with ``seed``, default 0) draws every bit; a
        generator on another device than the model's is replaced by one there with the same
        seed. The whole model runs in its parameters' dtype (upstream's bf16 inference keeps
        the blocks in bf16 under autocast, with float32 q and k)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negative = (
            [negative_prompt] * len(prompts)
            if isinstance(negative_prompt, str)
            else negative_prompt
        )
        if not prompts or (negative is not None and len(negative) != len(prompts)):
            raise RequestError(
                f"got {len(prompts)} prompts and {len(negative or [])} negative prompts"
                if prompts
                else "no prompt given"
            )
        if output_type not in ("np", "codes"):
            raise RequestError(f"output_type must be 'np' or 'codes', got {output_type!r}")
        if output_type == "np" and self.vae is None:
            raise RequestError("this pipeline has no VAE decoder; pass output_type='codes'")
        self.check(cfg, tau, top_k, top_p)
        schedule, final = self._template(height, width)
        model = self.transformer
        device = model.head.weight.device
        rng = generator if generator is not None else torch.Generator(device).manual_seed(seed or 0)
        if rng.device != device:
            rng = torch.Generator(device).manual_seed(rng.initial_seed())

        guided = self.guided(cfg)
        b = len(prompts)
        cond = model.condition(*self.conditions(prompts, negative, guided))
        dtype = model.head.weight.dtype
        rows = cond.cond.shape[0]
        history = self.history_store()
        rope = rope_table(model.config.head_dim, schedule, final).to(device)
        d_cell = model.config.d_vae // (4 if self.patchify else 1)
        codes = Codes(schedule, d_cell, self.patchify, dtype)
        bits_out, logits_out = [], []
        x = model.start(cond)
        self.begin_run(len(schedule))
        try:
            for si in range(len(schedule)):
                self.begin_step()
                h = model.scale(x, cond, ScaleContext(history, schedule, si, b, rope))
                logits = model.logits(h, cond.cond)
                logits = logits.mul(1 / tau) if tau else logits
                if guided:
                    logits = cfg * logits[:b] + (1 - cfg) * logits[b:]
                bits = sample_bits(logits, int(top_k), top_p, rng) if tau else greedy_bits(logits)
                bits_out.append(bits)
                logits_out.append(logits)
                nxt = codes.add(bits, si)
                if nxt is not None:
                    x = model.word_embed(nxt).repeat(rows // b, 1, 1)
        finally:
            self.end_run()
        images = None
        if output_type == "np":
            vae_dtype = next(self.vae.parameters()).dtype
            pixels = (
                self.vae.decode(codes.summed.squeeze(2).to(vae_dtype)).add(1).div(2).clamp(0, 1)
            )
            images = list(pixels.permute(0, 2, 3, 1).float().cpu().numpy())
        return ImageOutput(images, codes.summed, bits_out, logits_out)
