"""d²Cache with ``reference_compat: true`` makes the reference's decisions step by step
(Kamichanw/d2Cache @72feb60, research/dlm.md §2.4): rows recomputed and tokens committed, on
llada-tiny, dream-tiny and llada-arith, one block and semi-autoregressive blocks.

The reference is re-implemented here in plain torch from its code: a dense forward over the
chosen rows with a per-layer K/V cache and eager attention, the attention rollout as dense
products of row-normalised (A + I) over layers, stage 1 with the reference's search window and
block bias over the step-0 confidence (frozen, as its precedence slip leaves it), its certainty
density with the constant denominator, nucleus selection and inflation as written there. It
calls only the model's building blocks (embedding, ``qkv`` = norm, projections and RoPE,
``finish`` = output projection and MLP, head), never our store, engine or method code.

The reference decodes every masked position of the block, giving the ones it did not recompute
all-zero logits (confidence 1/V, token 0; its restriction to recomputed rows writes into an
indexing copy). d²Cache here decodes the recomputed ones only; :func:`reference` checks that an
unrecomputed mask would never have won in these runs, so both decide alike.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import diffcache
from diffcache.testing.plain_dlm import cached_model, dense_forward

MODELS = {"llada-tiny": "llada", "dream-tiny": "dream", "llada-arith": "llada"}
OPTIONS = {"current_k": 4, "rollout_p": 0.1, "sigma": 10.0, "decode_sigma": 10.0, "inflate_w": 0}


def density(decoded: torch.Tensor, sigma: float) -> torch.Tensor:
    """The reference's certainty density of ``decoded [G]``: Gaussian-weighted decoded share
    over a 3G canvas (left G decoded; right G decoded iff the last position is), divided by
    the kernel summed over every offset of its 6G FFT circle, −3G .. 3G − 1."""
    g = decoded.shape[0]
    right = torch.full((g,), float(decoded[-1]), dtype=torch.float64)
    canvas = torch.cat([torch.ones(g, dtype=torch.float64), decoded.double(), right])
    here = torch.arange(g, 2 * g, dtype=torch.float64)[:, None]
    kernel = lambda d: torch.exp(-(d**2) / (2 * sigma**2))  # noqa: E731
    num = (kernel(here - torch.arange(3 * g, dtype=torch.float64)) * canvas).sum(1)
    return num / kernel(torch.arange(-3 * g, 3 * g, dtype=torch.float64)).sum()


def nucleus(scores: torch.Tensor, p: float, allowed: torch.Tensor) -> torch.Tensor:
    """The reference's ``nucleus_select`` (min_k 1) of ``scores [T]`` over ``allowed``."""
    scores = torch.where(allowed, scores, 0.0)
    ordered, index = (scores / (scores.sum() + 1e-9)).sort(descending=True)
    keep = (ordered.cumsum(0) <= p) | (torch.arange(len(scores)) < 1)
    return torch.zeros_like(allowed).scatter(0, index, keep & allowed[index])


def inflate(q: torch.Tensor, w: int) -> torch.Tensor:
    """Every position whose previous and next selected positions are at most ``w`` apart."""
    picked = q.nonzero().flatten().tolist()
    out = q.clone()
    for a, b in zip(picked, picked[1:], strict=False):
        if b - a <= w:
            out[a:b] = True
    return out


def forward(model, ids, rows, cache, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[n, V]`` of ``rows`` and the step's attention rollout ``[T, T]``: per layer the
    head-mean attention of the recomputed rows (identity elsewhere) plus I, rows normalised."""
    attentions: list[torch.Tensor] = []
    logits = dense_forward(model, ids, rows, cache, (cos, sin), attentions.append)
    eye = torch.eye(ids.shape[1], dtype=torch.float64)
    rollout = eye
    for attn in attentions:
        effective = eye.clone()
        effective[rows] = attn[0].mean(0).double()
        residual = effective + eye
        rollout = (residual / residual.sum(-1, keepdim=True)) @ rollout
    return logits, rollout


def reference(pipe, ids: torch.Tensor, gen: int, block_length: int, o: dict) -> list[dict]:
    """The reference's run: per step the rows recomputed, the committed position and token,
    and the choices of the next step's rows (stage 1, rollout, inflated gaps) with their values."""
    model, shift = pipe.model, pipe.model.logit_shift
    length = ids.shape[1]
    p = length - gen
    cos, sin = model.rope(torch.arange(length)[None])
    ids, cache, q, conf0, steps = ids.clone(), {}, None, None, []
    for b in range(gen // block_length):
        block = torch.zeros(gen, dtype=torch.bool)
        block[b * block_length : (b + 1) * block_length] = True
        while bool((ids[0, p:][block] == model.mask_id).any()):
            rows = torch.arange(length) if q is None else q.nonzero().flatten()
            out, rollout = forward(model, ids, rows, cache, cos, sin)
            logits = torch.zeros(length, out.shape[-1], dtype=torch.float64)
            logits[rows] = out.double()
            if shift:
                logits = torch.cat([logits[:1], logits[:-1]])
            conf, token = logits[p:].softmax(-1).max(-1)
            remaining = ids[0, p:] == model.mask_id
            computed = torch.ones(gen, dtype=torch.bool) if q is None else q[p - shift :][:gen]
            prior = density(~remaining, o["decode_sigma"]) if o["decode_sigma"] else 1.0
            score = conf * prior
            chosen = torch.where(remaining & block & computed, score, -math.inf)
            i = int(chosen.argmax())
            # an unrecomputed mask (1/V from zero logits) never wins here
            stale = remaining & block & ~computed
            assert not bool((score[stale] >= chosen[i]).any())
            ids[0, p + i] = token[i]
            steps.append({"rows": rows.tolist(), "positions": [p + i], "tokens": [int(token[i])]})
            if conf0 is None:
                conf0 = conf  # frozen: the reference's update writes into a copy
            # stage 1: the next step's masks, by step-0 confidence x density
            remaining = ids[0, p:] == model.mask_id
            col = torch.arange(gen)
            reached = remaining.long().cumsum(0) >= o["current_k"]
            first = int(reached.long().argmax()) if bool(reached.any()) else gen - 1
            end = (first // block_length + 1) * block_length - 1
            search = (col >= b * block_length) & (col <= end)
            scores = conf0 * density(~remaining, o["sigma"])
            scores = scores + block * scores.max()
            top = torch.where(search & remaining, scores, -math.inf).topk(min(o["current_k"], gen))
            selected = torch.zeros(gen, dtype=torch.bool)
            selected[top.indices] = True
            selected &= remaining
            response = torch.cat([selected[1:], selected[:0]]) if shift else selected.clone()
            response = torch.cat([response, torch.zeros(shift, dtype=torch.bool)])
            response[i] = True
            q = torch.cat([torch.zeros(p, dtype=torch.bool), response])
            importance = rollout.sum(0)
            rolled = nucleus(importance, o["rollout_p"], ~q)
            q |= rolled
            if shift:
                q[p - 1] = selected[0]
            picked = q
            if o["inflate_w"] > 0:
                q = inflate(q, o["inflate_w"])
            at = selected.nonzero().flatten()
            steps[-1]["stage1"] = ((at + p).tolist(), (conf0 * density(~remaining, o["sigma"]))[at])
            steps[-1]["rollout"] = (rolled.nonzero().flatten().tolist(), importance[rolled])
            steps[-1]["gaps"] = (q & ~picked).nonzero().flatten().tolist()
    return steps


def ours(pipe, prompt: str, gen: int, block_length: int, o: dict, **sampler) -> tuple:
    """Our run with ``reference_compat``: the prompt ids and per step what its trace says."""
    family = pipe.model.logit_shift and "dream" or "llada"
    plan = {"diffcache": 1, "model": family, "method": "d2cache"}
    diffcache.accelerate(pipe, {**plan, "options": {**o, "reference_compat": True}}, trace=True)
    try:
        out = pipe(prompt, gen_length=gen, steps=gen, block_length=block_length, **sampler)
        trace = diffcache.stats(pipe).trace
    finally:
        diffcache.remove(pipe)
    length = out.tokens.shape[1]
    steps: list[dict] = []
    for event in trace:
        site, v = event["site"], event["values"]
        if site == "model":
            steps.append({"rows": v.get("rows", [list(range(length))])[0]})
        elif site == "decode":
            steps[-1].update(positions=v["positions"][0], tokens=v["tokens"][0])
        elif site == "stage1":
            steps[-1]["stage1"] = (v["positions"][0], torch.tensor(v["scores"][0]))
        elif site == "rollout":
            steps[-1]["rollout"] = (v["positions"][0], torch.tensor(v["importance"][0]))
        elif site == "inflate":
            steps[-1]["gaps"] = v["positions"][0]
    return out.tokens[:, : length - gen], steps


CASES = [  # model, prompt, gen_length, block_length, options
    ("llada-tiny", "hello there", 16, 16, OPTIONS),
    # blocks of 4 with 6 masks searched: the window and the block bias decide
    ("llada-tiny", "the quick brown fox", 16, 4, {**OPTIONS, "current_k": 6, "inflate_w": 4}),
    ("dream-tiny", "hello there", 16, 16, OPTIONS),
    ("dream-tiny", "the quick brown fox", 16, 4, {**OPTIONS, "current_k": 6, "inflate_w": 4}),
    ("llada-arith", None, 16, 16, OPTIONS),
    ("llada-arith", None, 32, 16, {**OPTIONS, "current_k": 8}),
]


@pytest.mark.parametrize(("name", "prompt", "gen", "block_length", "options"), CASES)
def test_reference_compat_makes_the_reference_decisions(
    name: str, prompt: str | None, gen: int, block_length: int, options: dict
) -> None:
    pipe = cached_model(name)
    pipe.model.double()  # fp64 both sides: the rollout's sums differ only in the last bits
    if prompt is None:
        from diffcache.pipelines import arith

        prompt = arith.PROMPTS[0]
    # Dream: one token per step as the reference's vanilla loop (nothing reaches 1.0)
    sampler = {"alg": "maskgit_plus", "threshold": 1.0} if MODELS[name] == "dream" else {}
    prompt_ids, got = ours(pipe, prompt, gen, block_length, options, **sampler)
    masks = torch.full((1, gen), pipe.model.mask_id)
    want = reference(pipe, torch.cat([prompt_ids, masks], 1), gen, block_length, options)
    assert len(got) == len(want) == gen
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        for key in ("rows", "positions", "tokens", "stage1", "rollout"):
            if key in ("stage1", "rollout"):  # positions exactly, their values to the last bits
                assert g[key][0] == w[key][0], f"step {step} {key}: {g[key]} != {w[key]}"
                torch.testing.assert_close(g[key][1].double(), w[key][1], rtol=1e-5, atol=0)
            else:
                assert g[key] == w[key], f"step {step} {key}: {g[key]} != {w[key]}"
        assert g.get("gaps", []) == (w["gaps"] if options["inflate_w"] else [])


def dream_state(confidence: list[float]) -> tuple[Any, Any]:
    """A Dream decoding state: prompt of 3 tokens, 4 masks, and a step-0 plan over them."""
    from diffcache.kv import DecodeState, StepPlan

    ids = torch.tensor([[1, 2, 3, 9, 9, 9, 9]])
    decoded_at = torch.tensor([[-1, -1, -1, -2, -2, -2, -2]])
    state = DecodeState(ids, 9, 3, 1, 1, decoded_at, block=(3, 7))
    state.confidence = torch.tensor([confidence], dtype=torch.float64)
    return state, StepPlan(rows=None, targets=torch.arange(3, 7)[None])


@pytest.mark.parametrize("compat", [False, True])
@pytest.mark.parametrize("chosen", [3, 4, 5])
def test_dream_rows_are_the_chosen_masks_predecessors(compat: bool, chosen: int) -> None:
    """Dream recomputes the row before each chosen mask, not the mask (the reference's rule).
    The last prompt row, there when the first mask is chosen, joins the rollout's choice
    (here the last prompt token, which every row attends to); ``reference_compat`` assigns it
    as the reference does, dropping the rollout's choice when the first mask is not chosen."""
    from diffcache.methods.d2cache import D2CacheConfig, D2Policy

    cfg = D2CacheConfig(current_k=1, rollout_p=0.1, sigma=0.0, reference_compat=compat)
    policy = D2Policy(cfg)
    probs = torch.zeros(1, 7, 7)
    probs[..., 2] = 1.0  # all attention on position 2 = P - 1
    policy.attn = [(None, probs)]
    confidence = [0.1, 0.2, 0.3, 0.4]
    confidence[chosen - 3] = 0.9  # the mask stage 1 picks; its logits come from the row before
    state, plan = dream_state(confidence)
    policy.step_end(state, plan, torch.zeros(1, 7, dtype=torch.bool))
    rows = policy.next[0].nonzero().flatten().tolist()
    first = chosen == 3
    assert rows == sorted({chosen - 1} | (set() if compat and not first else {2}))


def test_confidence_update_ignores_padding_copies() -> None:
    """Outside ``reference_compat`` a recomputed mask's stage-1 confidence is its latest one,
    also when its row's padding repeats it (padding copies have confidence -inf)."""
    from diffcache.methods.d2cache import D2CacheConfig, D2Policy

    policy = D2Policy(D2CacheConfig())
    state, plan = dream_state([0.1, 0.2, 0.3, 0.4])
    policy._update_conf(state, plan)
    plan.targets = torch.tensor([[4, 4, 4, 4]])
    state.confidence = torch.tensor([[0.7, -math.inf, -math.inf, -math.inf]], dtype=torch.float64)
    policy._update_conf(state, plan)
    assert policy.conf[0, 3:].tolist() == [0.1, 0.7, 0.3, 0.4]


@pytest.mark.parametrize(("k", "want"), [(5, [2, 3, 4, 5, 6]), (6, [2, 3, 4, 5, 6, 7])])
def test_stage1_search_window_and_block_bias(k: int, want: list[int]) -> None:
    """Blocks of 4 over 12 generated positions; the current block (columns 0-3) has two masks
    left, the later blocks are all masks. The search ends at the block holding the k-th mask
    (column 6 for k 5, column 7, a block's last, for k 6: not the next block), and the current
    block's masks come first even when their confidence is the lowest."""
    from diffcache.kv import DecodeState
    from diffcache.methods import d2cache_prior as prior

    p, mask = 2, 9
    ids = torch.tensor([[1, 1, 5, 5] + [mask] * 10])
    state = DecodeState(ids, mask, p, 0, 1, torch.where(ids == mask, -2, -1), block=(2, 6))
    conf = [0.0, 0.0, 0.01, 0.5, 0.4, 0.3, 0.2, 0.1, 0.9, 0.9, 0.9, 0.9]
    scored = torch.tensor([[0.0] * p + conf], dtype=torch.float64)
    chosen, scores = prior.stage1(state.masked, scored, p, state.block, k, sigma=0.0)
    assert (chosen[0].nonzero().flatten() - p).tolist() == want
    assert scores[0, p:].tolist() == conf


def test_nucleus_mass_boundary_is_inclusive() -> None:
    """The rollout keeps the largest prefix whose mass is <= p, the boundary included, as the
    reference (masses 0.5, 0.25, 0.25 are exact in binary)."""
    from diffcache.methods import d2cache_prior as prior

    scores = torch.tensor([[2.0, 1.0, 1.0]])
    picked = prior.nucleus_select(scores, 0.75, torch.ones(1, 3, dtype=torch.bool))
    assert picked[0].tolist() == [True, True, False]


def test_dream_after_a_one_token_prompt_keeps_the_first_mask_by_row_0() -> None:
    """A cached step keeps the candidates whose logit row (for Dream the position before) is
    recomputed and recomputes those rows: after a one-token prompt the first mask's row is 0."""
    from diffcache.kv import DecodeState
    from diffcache.methods.d2cache import D2CacheConfig, D2Policy

    ids = torch.tensor([[1, 9, 9, 9, 9]])
    state = DecodeState(ids, 9, 1, 1, 1, torch.where(ids == 9, -2, -1), block=(1, 5))
    policy = D2Policy(D2CacheConfig())
    policy.next = torch.tensor([[True, False, True, False, False]])  # rows of masks 1 and 3
    plan = policy.plan(state, torch.tensor([[1, 2, 3, 4]]))
    assert plan.targets.tolist() == [[1, 3]]
    assert plan.rows.tolist() == [[0, 2]]


def test_stage1_search_window_of_a_later_block() -> None:
    """Blocks of 4 over 16 generated positions, the second block current (columns 4-7). Row 0
    has two masks left there: with k 4 its 4th mask is at column 9, so the search ends with the
    third block (column 11) and the fourth block's high confidences are out of reach. Row 1
    holds fewer than k masks: its search runs to the end and takes them all. Row 2's 4th mask
    is in the fourth block, so its search reaches the end."""
    from diffcache.kv import DecodeState
    from diffcache.methods import d2cache_prior as prior

    p, mask = 2, 9
    ids = torch.tensor([[1, 1] + [5] * 6 + [mask] * 10] + [[1, 1] + [5] * 16] * 2)
    ids[1, [p + 7, p + 12, p + 15]] = mask
    ids[2, [p + 6, p + 12, p + 13, p + 14, p + 15]] = mask
    state = DecodeState(ids, mask, p, 0, 1, torch.where(ids == mask, -2, -1), block=(6, 10))
    conf = [0.0] * 6 + [0.01, 0.02, 0.1, 0.4, 0.3, 0.2, 0.9, 0.9, 0.9, 0.9]
    falling = conf[:12] + [0.9, 0.8, 0.7, 0.6]
    scored = torch.tensor([[0.0] * p + c for c in (conf, conf, falling)], dtype=torch.float64)
    chosen, _ = prior.stage1(state.masked, scored, p, state.block, 4, sigma=0.0)
    assert (chosen[0].nonzero().flatten() - p).tolist() == [6, 7, 9, 10]
    assert (chosen[1].nonzero().flatten() - p).tolist() == [7, 12, 15]
    assert (chosen[2].nonzero().flatten() - p).tolist() == [6, 12, 13, 14]


def test_stage1_with_blocks_of_one_reaches_the_last_position() -> None:
    """Blocks of one position and fewer than k masks: the search runs to the last column."""
    from diffcache.kv import DecodeState
    from diffcache.methods import d2cache_prior as prior

    p, mask = 2, 9
    ids = torch.tensor([[1, 1, mask, 5, 5, mask]])
    state = DecodeState(ids, mask, p, 0, 1, torch.where(ids == mask, -2, -1), block=(2, 3))
    conf = torch.full(ids.shape, 0.5, dtype=torch.float64)
    chosen, _ = prior.stage1(state.masked, conf, p, state.block, 4, sigma=0.0)
    assert chosen[0].nonzero().flatten().tolist() == [2, 5]
