"""LLaDA (LLaDA-8B-Instruct, LLaDA-1.5): our own model code and pipeline.

``LLaDAPipeline.from_pretrained(folder)`` reads the published safetensors, config.json and
tokenizer unchanged, with no remote code. The sampler is LLaDA's ``generate()`` (ML-GSAI/LLaDA,
research/dlm.md §1.1): semi-autoregressive blocks, a fixed number of tokens committed per step
(remainder to the first steps), low-confidence or random remasking with fp64 Gumbel-max
sampling, unsupervised CFG with the prompt masked, the EOS/EoT options; and Fast-dLLM's
threshold and factor parallel-decoding rules (``threshold=``, ``factor=``).

Deliberate differences from the reference: positions are ``cumsum(attention_mask) - 1`` (the
old reference used the absolute index even with left padding) and padding keys are masked, so a
batch row decodes exactly as alone; ``confidence_eos_eot_inf`` demotes EOS and EoT at every
temperature (the reference only demotes EOS at temperature 0, an aliasing effect;
``reference_compat=True`` reproduces it); CFG works with or without an attention mask.
"""

from __future__ import annotations

import dataclasses
from collections.abc import MutableMapping
from typing import Any

import torch

from diffcache.adapter import Adapter, Capabilities
from diffcache.pipelines import dlm_loading
from diffcache.pipelines.dlm_pipeline import (
    KV_SEAM,
    DiffusionLMPipeline,
    RequestError,
    block_problem,
    rule,
)
from diffcache.pipelines.sampling import llada as sampling
from diffcache.registry import register_adapter
from diffcache.request import Field
from diffcache.sites import Stack


def steps_problem(gen_length: int, steps: int, block_length: int) -> str | None:
    """LLaDA gives every block the same number of steps."""
    blocks = gen_length // block_length
    if blocks and steps % blocks:
        return (
            f"steps {steps} is not divisible by the number of blocks {blocks} "
            f"(gen_length {gen_length} / block_length {block_length})"
        )
    return None


FIELDS = (
    Field(
        "prompt",
        str,
        "what to generate",
        "prompt",
        required=True,
        accepts=DiffusionLMPipeline.prompt_problem,
        input=True,
    ),
    Field("gen_length", int, "tokens to generate", "gen_length", min=1, max=65536),
    Field("block_length", int, "semi-autoregressive block length", "block_length", min=1),
    Field("steps", int, "denoising steps", "steps", min=1, max=65536),
    Field("temperature", float, "sampling temperature (0: greedy)", "temperature", min=0.0),
)
#: What the text diffusion LMs offer: steps, layers whose attention a method may split (qkv /
#: attend / finish), and the position-indexed KV store their pipeline runs a method's policy with.
PROVIDES = Capabilities(("step", "block", "attention"), "position", "masked-token")

ADAPTER = register_adapter(
    Adapter(
        name="llada",
        pipelines=("LLaDAPipeline",),
        denoisers=(),
        experts=("model",),
        driver="pipeline",
        cfg="batched",
        stacks=(Stack("layers"),),
        media="text",
        provides=PROVIDES,
        output="texts",
        seed_arg="generator",
        kv=dataclasses.replace(KV_SEAM, semi_autoregressive=True, random_remasking=True),
        fields=FIELDS,
        rules=(rule(block_problem), rule(steps_problem)),
        valid_for={"gen_length": int, "block_length": int},
    )
)


class LLaDAPipeline(DiffusionLMPipeline):
    """LLaDA generation: ``pipe("What is 12*7?", gen_length=256, steps=256, block_length=32)``."""

    family = "llada"
    defaults: dict[str, Any] = {
        "temperature": 0.0,
        "remasking": "low_confidence",  # or "random"
        "cfg_scale": 0.0,
        "logits_eos_inf": False,
        "confidence_eos_eot_inf": False,
        "threshold": None,  # Fast-dLLM: commit every candidate with confidence >= threshold
        "factor": None,  # Fast-dLLM's factor rule
        "reference_compat": False,
    }

    def check_request(self, gen_length: int, steps: int, block_length: int) -> None:
        problem = steps_problem(gen_length, steps, block_length)
        if problem:
            raise RequestError(problem)

    def score(
        self,
        logits: torch.Tensor,
        s: dict[str, Any],
        generator: Any,
        valid: Any,
        backend: str,
        record: MutableMapping[str, str] | None = None,
    ):
        if s["remasking"] not in ("low_confidence", "random"):
            raise RequestError(
                f"remasking must be low_confidence or random, got {s['remasking']!r}"
            )
        config = self.model.config
        return sampling.llada_candidates(
            logits,
            s["temperature"],
            s["remasking"],
            generator,
            eos_id=config.eos_token_id,
            eot_id=config.eot_token_id,
            logits_eos_inf=s["logits_eos_inf"],
            confidence_eos_eot_inf=s["confidence_eos_eot_inf"],
            reference_compat=s["reference_compat"],
            valid=valid,
            backend=backend,
            record=record,
        )

    def count(self, masks_left, start_masks, i, steps, s):
        return sampling.num_transfer_tokens(start_masks, steps)[:, i]

    def mix_cfg(self, cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
        return sampling.cfg_mix(cond, uncond, scale)


def build_tiny() -> LLaDAPipeline:
    """``llada-tiny``: the LLaDA architecture at a tiny size with the real vocabulary and special
    ids, deterministic random weights (tests, demos)."""
    from diffcache.pipelines.llada.model import build_tiny_llada

    return LLaDAPipeline(*build_tiny_llada())


dlm_loading.register_family_loader(LLaDAPipeline, "LLaDA")
