"""The DLM loop asks its policy for the decoding rule: which masks are candidates, which of
them a step commits, how long the blocks are and when one ends (issue 22)."""

from __future__ import annotations

import pytest
import torch

from diffcache.kv.policy import Candidates, DecodeState, Policy

REQ = {"gen_length": 8, "steps": 8, "block_length": 4}


class LeftToRight(Policy):
    """Commits the leftmost candidate each step."""

    def commit(self, state: DecodeState, candidates: Candidates) -> torch.Tensor:
        position = candidates.targets.masked_fill(~candidates.valid, state.length)
        return candidates.valid & (position == position.min(1, keepdim=True).values)


class OneStepBlocks(Policy):
    """Ends every block after its first step."""

    def block_done(self, state: DecodeState) -> bool:
        return state.block_step >= 1


class FirstTwoMasks(Policy):
    """One block over the whole answer; only its first two masks are candidates."""

    def block_length(self, gen_length: int, block_length: int) -> int:
        return gen_length

    def candidates(self, state: DecodeState, masked: torch.Tensor) -> torch.Tensor:
        return masked & (masked.cumsum(1) <= 2)


def generate(pipe, policy: Policy | None = None, **kw):
    """One generation of "hello" with ``policy`` as the pipeline's cache policy."""
    if policy is not None:
        pipe.cache_policy = lambda: policy
    return pipe("hello", **{**REQ, **kw})


def test_a_step_commits_what_the_policy_says(pipe) -> None:
    """Each step commits the leftmost mask only, where the family's rule commits by
    confidence."""
    plain = generate(pipe).committed_at[0]
    got = generate(pipe, LeftToRight()).committed_at[0]
    assert got.tolist() == list(range(8))
    assert not torch.equal(plain, got)


def test_a_block_ends_when_the_policy_says(llada) -> None:
    """LLaDA commits one mask a step here (4 masks, 4 steps a block); ending each block after
    one step leaves three masks of each of the two blocks."""
    out = generate(llada, OneStepBlocks())
    at = out.committed_at[0]
    assert out.steps == 2
    assert [int((at[:4] == 0).sum()), int((at[4:] == 1).sum())] == [1, 1]
    assert int((at == -1).sum()) == 6


def test_candidates_and_block_length_are_the_policys(llada) -> None:
    """One block of 8 steps over the answer, each step committing (LLaDA's count: one) one
    of the first two masks left, where the plain request decodes blocks of 4 in any order."""
    out = generate(llada, FirstTwoMasks())
    at = out.committed_at[0].tolist()
    assert sorted(at) == list(range(8))
    for step in range(8):
        left = [p for p, s in enumerate(at) if s >= step]  # masked when the step begins
        assert at.index(step) in left[:2]
    plain = generate(llada, Policy(), block_length=8).committed_at[0].tolist()
    later = [sum(plain[q] > plain[p] for q in range(p)) for p in range(8)]
    assert max(later) >= 2  # the plain order commits a mask with two masks left of it


@pytest.mark.parametrize("keyword", ["window", "eos_truncate", "prior_sigma"])
def test_method_rules_are_no_request_keywords(pipe, keyword: str) -> None:
    """Elastic-Cache's window and EOS truncation and d2Cache's prior are the methods' plan
    options, not sampler settings: a request naming one is refused before the model runs."""
    calls = []
    pipe.model.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=f"Pipeline takes no {keyword}; sampler settings: "):
        pipe("hello", **{**REQ, keyword: 1})
    assert not calls
