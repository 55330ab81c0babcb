"""The plain LLaDA and Dream pipelines reproduce the reference samplers step for step: the same
positions committed at the same step with the same tokens.

The oracles below are our own straight transcriptions of the published loops (LLaDA:
``generate()`` of ML-GSAI/LLaDA; Dream: ``diffusion_generate`` of DreamLM/Dream, research/dlm.md
§1.1-1.2): full-sequence logits every step, the confidence of every masked position, a per-row
top-k commit. They run at temperature 0, where neither loop draws random numbers (with sampling,
the references draw from the global RNG over the whole vocabulary and sequence, which no
per-row generator reproduces). fp64 weights keep near-tied confidences from flipping between the
oracle's full LM head and the pipeline's head on the needed rows.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from diffcache.pipelines import arith
from diffcache.pipelines.dream import build_tiny as build_dream
from diffcache.pipelines.llada import build_tiny as build_llada

NEG = float("-inf")


def llada_reference(model, prompt, steps, gen_length, block_length, mask_id):
    """LLaDA's semi-autoregressive low-confidence remasking at temperature 0; returns the final
    ids and the step at which each generated position was committed."""
    p = prompt.shape[1]
    x = torch.full((1, p + gen_length), mask_id, dtype=torch.long)
    x[:, :p] = prompt
    when = torch.full((gen_length,), -1)
    blocks = gen_length // block_length
    per_block = steps // blocks
    step = 0
    for b in range(blocks):
        lo, hi = p + b * block_length, p + (b + 1) * block_length
        masks = int((x[0, lo:hi] == mask_id).sum())
        counts = [
            masks // per_block + (1 if i < masks % per_block else 0) for i in range(per_block)
        ]
        for i in range(per_block):
            mask_index = x == mask_id
            logits = model(x)
            x0 = logits.argmax(-1)
            conf = torch.gather(F.softmax(logits.double(), -1), -1, x0[..., None])[..., 0]
            conf[:, hi:] = NEG
            conf = torch.where(mask_index, conf, NEG)
            chosen = torch.topk(conf[0], counts[i]).indices
            x[0, chosen] = x0[0, chosen]
            when[chosen - p] = step
            step += 1
    return x, when


def dream_reference(model, prompt, steps, gen_length, alg, mask_id, eps=1e-3):
    """Dream's confidence algorithms (maskgit_plus, topk_margin, entropy) at temperature 0 with
    shifted logits and the linear schedule; returns the final ids and commit steps."""
    p = prompt.shape[1]
    x = torch.full((1, p + gen_length), mask_id, dtype=torch.long)
    x[:, :p] = prompt
    when = torch.full((gen_length,), -1)
    timesteps = torch.linspace(1, eps, steps + 1)
    for i in range(steps):
        mask_index = x == mask_id
        logits = model(x)
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        probs = torch.softmax(logits[mask_index], -1)
        top, x0 = probs.max(-1)
        if alg == "maskgit_plus":
            confidence = top
        elif alg == "topk_margin":
            ranked = probs.sort(-1, descending=True).values
            confidence = ranked[:, 0] - ranked[:, 1]
        else:  # entropy
            confidence = (probs * torch.log(probs + 1e-10)).sum(-1)
        t, s = timesteps[i], timesteps[i + 1]
        masks = mask_index.sum() / mask_index.shape[0]
        n = int(masks * (1 - s / t)) if i < steps - 1 else int(masks)
        full = torch.full_like(x, NEG, dtype=logits.dtype)
        full[mask_index] = confidence
        if n > 0:
            chosen = torch.topk(full[0], n).indices
            proposal = torch.full_like(x, mask_id)
            proposal[mask_index] = x0
            x[0, chosen] = proposal[0, chosen]
            when[chosen - p] = i
    return x, when


def _check(out, ref_ids, ref_when) -> None:
    assert torch.equal(out.tokens, ref_ids)
    assert torch.equal(out.committed_at[0].cpu(), ref_when)


@pytest.fixture(scope="module")
def arith_pipe():
    pipe = copy.deepcopy(arith.load())
    pipe.model.double()
    return pipe


@pytest.mark.parametrize(
    "prompt", ["123+456=", "sort 7 2 9 4:", "Ann has 3 pens and buys 4 more. Pens:"]
)
@pytest.mark.parametrize("steps, block", [(16, 16), (6, 16), (8, 8), (4, 4)])
def test_llada_arith_follows_the_reference_loop(arith_pipe, prompt, steps, block) -> None:
    out = arith_pipe(prompt, gen_length=16, steps=steps, block_length=block)
    ids = out.tokens[:, : out.prompt_len]
    mask_id = arith_pipe.model.mask_id
    ref_ids, ref_when = llada_reference(arith_pipe.model, ids, steps, 16, block, mask_id)
    _check(out, ref_ids, ref_when)
    if steps == 16:
        assert arith.score(prompt, out.texts[0])


def test_llada_tiny_real_vocabulary_follows_the_reference_loop() -> None:
    pipe = build_llada()
    pipe.model.double()
    out = pipe("hello there", gen_length=24, steps=12, block_length=8)
    ids = out.tokens[:, : out.prompt_len]
    _check(out, *llada_reference(pipe.model, ids, 12, 24, 8, pipe.model.mask_id))


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
@pytest.mark.parametrize("steps", [16, 5])
def test_dream_follows_the_reference_loop(alg: str, steps: int) -> None:
    pipe = build_dream()
    pipe.model.double()
    out = pipe("hello there", gen_length=16, steps=steps, alg=alg)
    ids = out.tokens[:, : out.prompt_len]
    _check(out, *dream_reference(pipe.model, ids, steps, 16, alg, pipe.model.mask_id))
