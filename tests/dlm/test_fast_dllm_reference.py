"""Fast-dLLM makes the decisions of its rules step by step (issue 21).

``plain_fast_dllm`` below is an independent, plain rewrite of the method's rules from the paper
(arXiv 2505.22618, §3) and NVlabs/Fast-dLLM (``generate_with_prefix_cache`` /
``generate_with_dual_cache`` and ``get_transfer_index``): batch 1, one dense K/V tensor per
layer written by position, explicit softmax attention. At the first step of every block (and,
with ``refresh_every``, every that many steps into it) one full forward rewrites every
position's K/V; at the other steps only the block (``dual``) or the block and everything after
it (``prefix``) is recomputed, plus for Dream the row before the block (its logits are shifted
by one), attending to the K/V of the last refresh elsewhere. Decoding commits the most
confident masked token of the block and every other one whose confidence (fp64 max
probability) is >= the threshold, or with ``factor`` the top n for the largest n whose n-th
confidence is >= 1 − factor / (n + 1) (as the paper states it; the reference's
``get_transfer_index_dynamic`` also commits all N when only the N-th fails, a slip our sampler
keeps behind ``reference_compat``, not exercised here). ``refresh_every`` and Dream's row
before the block are this method's documented additions to the reference. The loop uses only
the model's building blocks (embedding, ``qkv`` = norm + projections + RoPE, ``finish`` =
output projection + MLP, head), never the method's, the store's or the engine's code.

Our pipeline runs the same generation with tracing on, and each step must agree: the rows
recomputed (the ``model`` event and the method's ``refresh`` event), the candidates and their
confidences (``parallel_decode``, to 1e-4 relative) and the positions and tokens committed
(``decode``). The plain loop asserts that no decision rests on a difference below the float
noise between the two (a confidence within 1e-6 of the threshold, of a factor bound or of the
confidence next to the cut).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch

import diffcache
from diffcache.testing.plain_dlm import cached_model, dense_forward

NOISE = 1e-4  # relative: the plain loop's and our confidences differ by float rounding only
MARGIN = 1e-6  # no decision may rest on a smaller difference of confidences


@dataclasses.dataclass
class Step:
    block_step: int
    rows: list[int] | None  # positions recomputed (None: a full forward)
    candidates: list[int]
    confidence: list[float]
    committed: list[int]
    tokens: list[int]


def commit(conf: torch.Tensor, opts: dict) -> torch.Tensor:
    """Which candidates the step commits: the best always, then the threshold or factor rule."""
    ordered, order = conf.sort(descending=True)
    keep = torch.zeros(len(conf), dtype=torch.bool)
    if opts.get("factor") is not None:
        n = 1
        while n < len(conf) and ordered[n] >= 1 - opts["factor"] / (n + 2):
            n += 1  # the (n + 1)-th most confident passes its bound
        bounds = 1 - opts["factor"] / (torch.arange(2, len(conf) + 1) + 1)
        assert ((ordered[1:] - bounds).abs() > MARGIN).all(), (ordered, bounds)
        keep[order[:n]] = True
    else:
        tau = opts["threshold"]
        assert ((conf - tau).abs() > MARGIN).all(), (conf, tau)
        keep = conf >= tau
        keep[order[0]] = True
    n = int(keep.sum())
    if n < len(conf):  # the last one committed must be clear of the first one left
        assert ordered[n - 1] - ordered[n] > MARGIN, ordered
    return keep


@torch.no_grad()
def plain_fast_dllm(pipe: Any, prompt: str, gen_length: int, block_length: int, opts: dict):
    """The method's rules, written out (see the module docstring)."""
    model, shift = pipe.model, pipe.model.logit_shift
    dual, every = opts.get("mode", "prefix") == "dual", opts.get("refresh_every")
    prompt_ids = pipe.encode([prompt], None)[0]
    length = len(prompt_ids) + gen_length
    ids = torch.full((1, length), model.mask_id)
    ids[0, : len(prompt_ids)] = torch.tensor(prompt_ids)
    rope = model.rope(torch.arange(length)[None])
    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    steps = []
    for b in range(gen_length // block_length):
        start = len(prompt_ids) + b * block_length
        end = start + block_length
        i = 0
        while bool((ids[0, start:end] == model.mask_id).any()):
            refresh = i == 0 or (every is not None and i % every == 0)
            lo = max(start - shift, 0)
            rows = torch.arange(length) if refresh else torch.arange(lo, end if dual else length)
            logits = dense_forward(model, ids, rows, cache, rope)
            targets = (ids[0, start:end] == model.mask_id).nonzero().flatten() + start
            source = logits[targets - shift - int(rows[0])]
            conf, token = source.double().softmax(-1).max(-1)
            keep = commit(conf, opts)
            ids[0, targets[keep]] = token[keep]
            steps.append(
                Step(
                    i,
                    None if refresh else rows.tolist(),
                    targets.tolist(),
                    conf.tolist(),
                    targets[keep].tolist(),
                    token[keep].tolist(),
                )
            )
            i += 1
    return steps, ids


def ours(pipe: Any, prompt: str, gen_length: int, block_length: int, opts: dict):
    """Our Fast-dLLM's steps, read from its trace, and the output ids."""
    rows, tokens = ours_batch(pipe, [prompt], gen_length, block_length, opts)
    return rows[0], tokens


def ours_batch(pipe: Any, prompts: list[str], gen_length: int, block_length: int, opts: dict):
    """Per batch row, our Fast-dLLM's steps where that row had candidates (a finished row
    waits idle for the others), read from the trace; and the output ids."""
    family = type(pipe).__name__.replace("Pipeline", "").lower()
    plan = {"diffcache": 1, "model": family, "method": "fast_dllm", "options": opts}
    diffcache.accelerate(pipe, plan, trace=True)
    try:
        out = pipe(prompts, gen_length=gen_length, block_length=block_length)
        trace = diffcache.stats(pipe).trace
    finally:
        diffcache.remove(pipe)
    steps: list[dict[int, Step]] = [{} for _ in prompts]
    for event in trace:
        values, site, action = event["values"], event["site"], event["action"]
        for row, row_steps in enumerate(steps):
            step = row_steps.setdefault(event["step"], Step(-1, None, [], [], [], []))
            if site == "refresh":
                assert values["refresh_every"] == opts.get("refresh_every")
                step.block_step = values["block_step"]
                step.rows = list(range(*values["rows"])) if action == "partial" else None
                assert action == ("partial" if "rows" in values else "computed"), event
            elif site == "model":
                rows = values["rows"][row] if action == "partial" else None
                assert rows == step.rows and values.get("full_from") is None, (event, step)
            elif site == "parallel_decode":
                assert (values["threshold"], values["factor"]) == (
                    opts.get("threshold", 0.9 if opts.get("factor") is None else None),
                    opts.get("factor"),
                )
                step.candidates = values["candidates"][row]
                step.confidence = values["confidence"][row]
            elif site == "decode":
                step.committed, step.tokens = values["positions"][row], values["tokens"][row]
    assert all(sorted(r) == list(range(len(r))) for r in steps)
    return [[s for s in r.values() if s.candidates] for r in steps], out.tokens


def compare(got: list[Step], want: list[Step]) -> None:
    assert len(got) == len(want), (len(got), len(want))
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        where = f"step {step}"
        assert (g.block_step, g.rows) == (w.block_step, w.rows), where
        assert g.candidates == w.candidates, where
        assert g.confidence == pytest.approx(w.confidence, rel=NOISE), where
        assert (g.committed, g.tokens) == (w.committed, w.tokens), where


ARITH = "sort 8 2 9 0 4 8:"
# (model, prompt, gen_length, block_length, options): thresholds inside each model's spread of
# confidences, so that steps commit one token and several (asserted below)
CASES = [
    ("llada-tiny", "hello", 16, 8, {"threshold": 0.022}),
    ("llada-tiny", "hello", 16, 4, {"threshold": 0.03, "refresh_every": 2}),
    ("llada-tiny", "hello", 16, 8, {"threshold": None, "factor": 2.94}),
    ("dream-tiny", "hello", 16, 8, {"threshold": 0.02}),
    ("dream-tiny", "hello", 16, 8, {"threshold": 0.018, "refresh_every": 3}),
    ("llada-arith", ARITH, 32, 8, {"threshold": 0.9999}),
    ("llada-arith", ARITH, 32, 16, {"threshold": 0.99999, "refresh_every": 2}),
    ("llada-arith", ARITH, 32, 8, {"threshold": None, "factor": 0.001}),
]


@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize(
    "case", CASES, ids=[f"{c[0]}-b{c[3]}-{'-'.join(map(str, c[4].values()))}" for c in CASES]
)
def test_fast_dllm_makes_the_plain_loops_decisions(case: tuple, mode: str) -> None:
    name, prompt, gen_length, block_length, opts = case
    opts = {**opts, "mode": mode}
    pipe = cached_model(name)
    want, want_ids = plain_fast_dllm(pipe, prompt, gen_length, block_length, opts)
    assert any(len(s.committed) > 1 for s in want)  # several tokens in one step
    assert any(len(s.committed) == 1 < len(s.candidates) for s in want)  # only the best one
    assert any(s.rows is not None for s in want)  # cached steps happen
    if opts.get("refresh_every"):
        assert any(s.rows is None and s.block_step > 0 for s in want)  # a refresh inside a block
    got, got_ids = ours(pipe, prompt, gen_length, block_length, opts)
    compare(got, want)
    assert torch.equal(got_ids, want_ids)


@pytest.mark.parametrize("name", ["llada-tiny", "dream-tiny"])
def test_a_confidence_equal_to_the_threshold_is_committed(name: str) -> None:
    """The rule is ``>=``: with the threshold set to the exact (traced) step-0 confidence of the
    second most confident candidate, step 0 commits the two most confident; one ulp above it,
    the best one only. Step 0 is a full forward, so its confidences do not depend on the
    threshold."""
    pipe = cached_model(name)
    first, _ = ours(pipe, "hello", 16, 8, {"threshold": 0.9})
    conf, cands = first[0].confidence, first[0].candidates
    second = sorted(conf, reverse=True)[1]
    top2 = sorted(c for c, x in zip(cands, conf, strict=True) if x >= second)
    assert len(top2) == 2
    at, _ = ours(pipe, "hello", 16, 8, {"threshold": second})
    above, _ = ours(pipe, "hello", 16, 8, {"threshold": math.nextafter(second, 1.0)})
    assert at[0].confidence == conf == above[0].confidence
    assert at[0].committed == top2
    assert above[0].committed == [cands[conf.index(max(conf))]]


@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("name", ["llada-tiny", "dream-tiny"])
def test_each_batch_row_makes_its_own_plain_loops_decisions(name: str, mode: str) -> None:
    """Two prompts of different lengths in one batch (the shorter left-padded): each row's
    steps, while it has candidates, are the plain loop's for that prompt alone, its positions
    moved by its padding."""
    pipe = cached_model(name)
    prompts, opts = ["hello", "the quick brown fox jumps"], {"threshold": 0.025, "mode": mode}
    lengths = [len(ids) for ids in pipe.encode(prompts, None)]
    assert lengths[0] < lengths[1]
    got, got_ids = ours_batch(pipe, prompts, 16, 8, opts)
    for row, prompt in enumerate(prompts):
        pad = max(lengths) - lengths[row]
        want, want_ids = plain_fast_dllm(pipe, prompt, 16, 8, opts)
        moved = [
            dataclasses.replace(
                s,
                rows=None if s.rows is None else [p + pad for p in s.rows],
                candidates=[p + pad for p in s.candidates],
                committed=[p + pad for p in s.committed],
            )
            for s in want
        ]
        compare(got[row], moved)
        assert torch.equal(got_ids[row, pad:], want_ids[0])
    # the rows finish their blocks at different steps (one waits idle for the other)
    assert [s.block_step for s in got[0]] != [s.block_step for s in got[1]]


@pytest.mark.parametrize(
    ("name", "prompt"), [("llada-tiny", "hello"), ("llada-arith", "sort 9 9 1 0 5 7 3 2:")]
)
def test_aggressive_is_the_dual_cache_with_threshold_one_half(name: str, prompt: str) -> None:
    """aggressive(): the dual cache committing every candidate at least 0.5 confident, as the
    plain loop does with those rules. llada-tiny (confidences near 0.02) decodes one token a
    step, so its cached steps show the dual rows; llada-arith commits candidates of 0.68 and
    0.88 beside surer ones at its first step."""
    from diffcache.methods.fast_dllm import FastDLLMConfig

    pipe = cached_model(name)
    want, want_ids = plain_fast_dllm(pipe, prompt, 16, 8, {"mode": "dual", "threshold": 0.5})
    committed = [
        c for s in want for c, p in zip(s.confidence, s.candidates, strict=True) if p in s.committed
    ]
    if name == "llada-tiny":
        assert all(len(s.committed) == 1 for s in want) and want[1].rows is not None
    else:
        assert any(0.5 < c < 0.9 for c in committed)
    got, got_ids = ours(pipe, prompt, 16, 8, FastDLLMConfig.aggressive().to_options())
    compare(got, want)
    assert torch.equal(got_ids, want_ids)
