"""Dream (Dream-v0-7B, Qwen2-based): our own model code and pipeline.

``DreamPipeline.from_pretrained(folder)`` reads the published files unchanged, with no remote
code. The sampler is Dream's ``diffusion_generate`` (research/dlm.md §1.2): timesteps
``linspace(1, eps, steps + 1)``; ``alg="origin"`` reveals each mask with probability 1 − s/t,
the confidence algorithms (``maskgit_plus``, ``topk_margin``, ``entropy``) commit the
int(M·(1 − s/t)) most confident masks per step (``alg_temp`` samples them instead); logits are
shifted (the hidden state at p−1 predicts token p). ``block_length`` < ``gen_length`` runs that
schedule per block (Fast-dLLM's Dream variant); ``threshold`` / ``factor`` are Fast-dLLM's
parallel-decoding rules.

Deliberate difference: the number to commit uses each row's own mask count (the reference uses
the batch mean, which makes a row depend on its batch-mates; ``reference_compat=True`` restores
it).
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import torch

from diffcache.adapter import Adapter
from diffcache.pipelines import dlm_loading
from diffcache.pipelines.dlm_pipeline import (
    KV_SEAM,
    DiffusionLMPipeline,
    RequestError,
    block_problem,
    rule,
)
from diffcache.pipelines.llada import FIELDS, PROVIDES
from diffcache.pipelines.sampling import dream as sampling
from diffcache.pipelines.sampling import rules
from diffcache.pipelines.sampling.dream import origin_commit as rules_origin
from diffcache.registry import register_adapter
from diffcache.sites import Stack

ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")


def steps_problem(gen_length: int, steps: int, block_length: int) -> str | None:
    """Dream gives each block ``steps // blocks`` steps: fewer steps than blocks would decode
    nothing (LLaDA's divisibility rule implies the same bound)."""
    blocks = gen_length // block_length
    if steps < blocks:
        return (
            f"steps {steps} is fewer than the number of blocks {blocks} (gen_length {gen_length} "
            f"/ block_length {block_length}): each block needs a step; raise steps to at least "
            f"{blocks} or lengthen block_length"
        )
    return None


ADAPTER = register_adapter(
    Adapter(
        name="dream",
        pipelines=("DreamPipeline",),
        denoisers=(),
        experts=("model",),
        driver="pipeline",
        cfg="none",
        stacks=(Stack("layers"),),
        media="text",
        provides=PROVIDES,
        output="texts",
        seed_arg="generator",
        kv=KV_SEAM,
        fields=FIELDS,
        rules=(rule(block_problem), rule(steps_problem)),
        valid_for={"gen_length": int, "block_length": int},
    )
)


class DreamPipeline(DiffusionLMPipeline):
    """Dream generation: ``pipe("Write a haiku", gen_length=128, steps=128, alg="entropy")``."""

    family = "dream"
    defaults: dict[str, Any] = {
        "temperature": 0.0,
        "top_p": None,
        "top_k": None,
        "alg": "origin",
        "alg_temp": None,
        "eps": 1e-3,
        "threshold": None,
        "factor": None,
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
        if s["alg"] not in ALGS:
            raise RequestError(f"alg must be one of {', '.join(ALGS)}, got {s['alg']!r}")
        return sampling.dream_confidence(
            s["alg"],
            logits,
            s["temperature"],
            s["top_p"],
            s["top_k"],
            generator,
            valid,
            backend,
            record,
        )

    def commit(self, confidence, valid, left, start_masks, per_block, i, s, generator):
        """``origin`` reveals candidates at random and ``alg_temp`` samples which to commit;
        otherwise as every family (count of the most confident, or a parallel rule)."""
        if not self._until_done(s):
            if s["alg"] == "origin":
                return rules_origin(valid, i, per_block, s["eps"], generator)
            if s["alg_temp"]:
                k = self.count(left, start_masks, i, per_block, s)
                return rules.commit_sampled(confidence, valid, k, s["alg_temp"], generator)
        return super().commit(confidence, valid, left, start_masks, per_block, i, s, generator)

    def count(self, masks_left, start_masks, i, steps, s):
        return sampling.dream_transfer_count(
            masks_left, i, steps, s["eps"], reference_compat=s["reference_compat"]
        )


def build_tiny() -> DreamPipeline:
    """``dream-tiny``: the Dream architecture at a tiny size with the real vocabulary and special
    ids (GQA like the 7B), deterministic random weights (tests, demos)."""
    from diffcache.pipelines.dream.model import build_tiny_dream

    return DreamPipeline(*build_tiny_dream())


dlm_loading.register_family_loader(DreamPipeline, "Dream")
