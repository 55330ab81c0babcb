"""DLM caching methods on the tiny LLaDA and Dream models: identity equals the plain pipeline
token for token, and batch rows equal batch-1 runs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import diffcache
from diffcache.kv.policy import Candidates, DecodeState, Policy
from diffcache.methods import d2cache_prior
from diffcache.registry import methods

NEG = float("-inf")

PROMPTS = ["hello there", "a", "the quick brown fox"]
DLM_METHODS = ["fast_dllm", "dkv_cache", "elastic_cache", "d2cache"]
REQ = {"gen_length": 16, "steps": 16, "block_length": 8}


def plan(family: str, method: str, options: dict) -> dict:
    return {"diffcache": 1, "model": family, "method": method, "options": options}


def run(pipe, prompts, **kw):
    """Generate with one seeded generator per row (row r of a batch draws as it would alone)."""
    seeds = [PROMPTS.index(p) for p in prompts]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    out = pipe(prompts, generator=gens, **{**REQ, **kw})
    return out.tokens, out.texts


@pytest.mark.parametrize("method", DLM_METHODS)
def test_identity_equals_plain_batch_1_and_3(pipe, family: str, method: str) -> None:
    plain1, _ = run(pipe, PROMPTS[:1])
    plain3, _ = run(pipe, PROMPTS)
    identity = methods()[method].identity()
    diffcache.accelerate(pipe, plan(family, method, identity.to_options()))
    got3, _ = run(pipe, PROMPTS)
    stats = diffcache.stats(pipe)
    assert stats.method == method and stats.model_calls == 16
    got1, _ = run(pipe, PROMPTS[:1])
    assert torch.equal(got1, plain1)
    assert torch.equal(got3, plain3)
    # identity reuses nothing: without padding (batch 1; d2Cache leaves a batch's padding
    # rows out), every position at every layer of every call is recomputed
    stats = diffcache.stats(pipe)
    assert stats.per_step() == [1.0] * stats.model_calls


@pytest.mark.parametrize("method", DLM_METHODS)
def test_batch_rows_equal_single_runs(pipe, family: str, method: str) -> None:
    pipe.model.double()  # fp64: matmuls of other shapes must not flip near-tied argmaxes
    cfg = methods()[method]()
    diffcache.accelerate(pipe, plan(family, method, cfg.to_options()))
    fixed = {"alg": "maskgit_plus"} if family == "dream" else {}  # fixed counts per step
    batch, texts = run(pipe, PROMPTS, **fixed)
    singles = [run(pipe, [p], **fixed) for p in PROMPTS]
    width = batch.shape[1]
    for row, (tokens, text) in zip(range(len(PROMPTS)), singles, strict=True):
        assert torch.equal(batch[row, width - tokens.shape[1] :], tokens[0])
        assert texts[row] == text[0]
    assert diffcache.stats(pipe).compute_fraction < 1.0


def test_plain_batch_rows_equal_single_runs(pipe, family: str) -> None:
    pipe.model.double()
    fixed = {"alg": "maskgit_plus"} if family == "dream" else {}
    batch, _ = run(pipe, PROMPTS, **fixed)
    for row, p in enumerate(PROMPTS):
        tokens, _ = run(pipe, [p], **fixed)
        assert torch.equal(batch[row, batch.shape[1] - tokens.shape[1] :], tokens[0])


def test_narrowed_candidates_commit_every_position_in_a_batch(pipe, family: str) -> None:
    """d²Cache with current_k 2 narrows each row's candidates to a ragged set, padded by
    repeating a position: a committed candidate must not be undone by its padding copy."""
    pipe.model.double()
    options = {"current_k": 2, "rollout_p": 0.1}
    diffcache.accelerate(pipe, plan(family, "d2cache", options))
    fixed = {"alg": "maskgit_plus"} if family == "dream" else {}
    out = pipe(PROMPTS, generator=[torch.Generator().manual_seed(i) for i in range(3)],
               **{**REQ, **fixed})  # fmt: skip
    assert bool((out.committed_at >= 0).all()), out.committed_at
    for row, p in enumerate(PROMPTS):
        tokens, _ = run(pipe, [p], **fixed)
        assert torch.equal(out.tokens[row, out.tokens.shape[1] - tokens.shape[1] :], tokens[0])


class PriorOnly(Policy):
    """No cache; commits by the request's rule on confidence × d²Cache's certainty density
    of width ``sigma`` over the generated region (0: plain confidences)."""

    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.sigma = sigma

    def commit(self, state: DecodeState, candidates: Candidates) -> torch.Tensor:
        c, p = candidates, state.prompt_len
        if self.sigma:
            decoded = state.ids[: len(c.targets), p:] != state.mask_id
            density = d2cache_prior.certainty_density(decoded, self.sigma)
            at = density.gather(1, (c.targets - p).clamp(min=0))
            c = dataclasses.replace(c, confidence=(c.confidence * at).masked_fill(~c.valid, NEG))
        return super().commit(state, c)


def run_prior(pipe, sigma: float, **kw):
    """The plain pipeline decoding with the certainty prior of width ``sigma``."""
    pipe.cache_policy = lambda: PriorOnly(sigma)
    try:
        return run(pipe, PROMPTS, **kw)
    finally:
        del pipe.cache_policy


@pytest.mark.parametrize("decode_sigma", [0.0, 10.0])
def test_d2cache_decoding_prior_is_its_own_width(pipe, family: str, decode_sigma: float) -> None:
    """``decode_sigma`` (the reference's generation.sigma) alone sets the decoding prior;
    ``sigma`` only weighs the stage-1 selection. With every row recomputed, d²Cache decodes
    exactly as the plain pipeline with that prior."""
    full = {"current_k": 1_000_000, "rollout_p": 1.0, "inflate_w": 1_000_000, "sigma": 10.0}
    fixed = {"alg": "maskgit_plus"} if family == "dream" else {}  # origin ignores confidence
    plain, _ = run_prior(pipe, decode_sigma, **fixed)
    other, _ = run_prior(pipe, 10.0 - decode_sigma, **fixed)
    assert not torch.equal(plain, other)  # the prior changes the decoding here
    diffcache.accelerate(pipe, plan(family, "d2cache", {**full, "decode_sigma": decode_sigma}))
    got, _ = run(pipe, PROMPTS, **fixed)
    assert torch.equal(got, plain)


@pytest.mark.parametrize("method", DLM_METHODS)
def test_bf16_batch_runs_every_method(pipe, family: str, method: str) -> None:
    """The upstream checkpoints run in bf16: each method's store, drift test and rollout take
    bf16 activations, and every position of a padded batch gets committed."""
    pipe.model.to(torch.bfloat16)
    diffcache.accelerate(pipe, plan(family, method, methods()[method]().to_options()))
    out = pipe(PROMPTS, **REQ)
    assert bool((out.committed_at >= 0).all())
    assert diffcache.stats(pipe).compute_fraction < 1.0
