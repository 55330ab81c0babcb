"""Elastic-Cache makes the reference's decisions step by step (issue 21).

``plain_elastic`` below is an independent, plain rewrite of the reference loop
(VILA-Lab/Elastic-Cache ``generate_with_elastic_cache`` and its patched attention, LLaDA and
Dream): batch 1, dense per-layer caches of the layer inputs and of q / k / v, an explicit
softmax, and the reference's order of operations. It uses only our model's building blocks
(embedding, ``qkv`` = norm + projections + RoPE, ``finish`` = output projection + MLP, head),
never the method's or the engine's caching code. Our pipeline runs the same generation with
tracing on, and every step's decisions must be equal: the rows recomputed, the layer a refresh
starts from, each layer's tracked tokens and the tokens committed (similarities to 1e-5).

``Rules`` names the three places where our default differs from the reference (see the
module docstring of ``diffcache.methods.elastic_cache``); the plain loop runs either set, so
the default mode is checked against the same loop too.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import diffcache
from diffcache.testing.plain_dlm import cached_model


@dataclasses.dataclass(frozen=True)
class Rules:
    heads_axis: bool  # the drift cosine across heads (reference) instead of over keys
    eos_once: bool  # truncate once, at the first step that commits an EOS (reference)
    track_cut: bool  # masks cut off by the EOS truncation may be tracked (reference)


REFERENCE = Rules(heads_axis=True, eos_once=True, track_cut=True)
DEFAULT = Rules(heads_axis=False, eos_once=False, track_cut=False)


@dataclasses.dataclass
class Step:
    rows: list[int] | None  # positions recomputed (None: a full forward)
    full_from: int | None  # the layer every position is recomputed from (None: no refresh)
    committed: list[int]
    tokens: list[int]
    picked: list[list[int]]  # per layer, its tracked tokens for the next step
    similarity: list[float | None]  # per layer (None: no drift test)
    tracked: list[int] = dataclasses.field(default_factory=list)  # compared by the drift tests
    refresh_from: list[int] = dataclasses.field(default_factory=list)  # traced per layer


def _attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Explicit softmax(q kᵀ / √d) with each KV head serving its group of query heads."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return torch.softmax(q.float() @ k.float().transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)


@torch.no_grad()
def plain_elastic(pipe: Any, prompt: str, gen_length: int, opts: dict, rules: Rules) -> list[Step]:
    """The reference loop, written out (see the module docstring)."""
    model, eos = pipe.model, pipe.tokenizer.eos_token_id
    window, gamma, track_num = opts["window"], opts["gamma"], opts.get("track_num", 1)
    threshold = opts.get("threshold", 0.9)
    prompt_ids = pipe.encode([prompt], None)[0]
    size, shift, layers = len(prompt_ids) + gen_length, model.logit_shift, model.num_layers
    x = torch.full((1, size), model.mask_id)
    x[0, : len(prompt_ids)] = torch.tensor(prompt_ids)
    everything = torch.arange(size)
    cos_all, sin_all = model.rope(everything[None])
    x_cache: list[torch.Tensor] = [torch.empty(0)] * layers
    q_cache, k_cache, v_cache = list(x_cache), list(x_cache), list(x_cache)
    picked: list[torch.Tensor] = [torch.empty(0, dtype=torch.long)] * layers
    track = torch.empty(0, dtype=torch.long)
    new_decoded = everything[: len(prompt_ids)]
    masked = everything[len(prompt_ids) :]
    cut = torch.empty(0, dtype=torch.long)  # masks dropped by the EOS truncation
    truncated, steps = False, []
    while True:
        window_rows = masked[:window] - shift
        if not steps:
            query, start = everything, -1
        else:
            query, start = torch.cat([track, new_decoded, window_rows]), layers
        compared = sorted(track.tolist())  # the tracked tokens this step's drift tests use
        h = model.embed(x[:, query])
        similarity: list[float | None] = []
        for index, layer in enumerate(model.layers):
            if index > start:
                x_cache[index] = h
            else:
                x_cache[index][:, query] = h
                if index == start:
                    h = x_cache[index].clone()
            rows = everything if index >= start else query
            q, k, v = layer.qkv(h, cos_all[:, rows], sin_all[:, rows])
            if index >= start:
                q_cache[index], k_cache[index], v_cache[index] = q, k, v
            else:
                past_k = k_cache[index].clone()
                k_cache[index][:, :, query] = k
                v_cache[index][:, :, query] = v
                past_q = q_cache[index][:, :, track].clone()
                q_cache[index][:, :, query] = q
                k, v = k_cache[index], v_cache[index]
            att = _attention(q, k)
            out = att @ v.repeat_interleave(q.shape[1] // v.shape[1], dim=1).float()
            out = out.to(h.dtype).transpose(1, 2).flatten(2)
            if index >= start:
                window_att = att[:, :, window_rows]
                similarity.append(None)
            else:
                window_att = att[:, :, -len(window_rows) :]
                before, after = _attention(past_q, past_k), att[:, :, : len(track)]
                sim = F.cosine_similarity(before, after, dim=1 if rules.heads_axis else -1)
                similarity.append(float(sim.mean()))
                if sim.mean() < gamma:
                    start = index + 1
            mass = window_att.sum(dim=(0, 1, 2))
            mass[masked] = 0.0
            if not rules.track_cut:
                mass[cut] = 0.0
            picked[index] = mass.topk(track_num).indices
            h = layer.finish(h, out)
        logits = model.head(h)[0]
        logits = logits[window_rows] if h.shape[1] == size else logits[-len(window_rows) :]
        track = torch.cat(picked).unique()
        probs = logits.double().softmax(-1) if shift == 0 else logits.softmax(-1)
        p_max, token = probs.max(-1)
        keep = p_max >= min(threshold, float(p_max.max()))
        decoded = window_rows[keep] + shift
        x[0, decoded] = token[keep]
        order = decoded.argsort()
        steps.append(
            Step(
                None if start == -1 else sorted(set(query.tolist())),
                None if start in (-1, layers) else start,
                decoded[order].tolist(),
                token[keep][order].tolist(),
                [p.tolist() for p in picked],
                similarity,
                compared,
            )
        )
        new_decoded = decoded
        masked = masked[~torch.isin(masked, decoded)]
        eos_at = decoded[token[keep] == eos]
        if rules.eos_once and not truncated and len(eos_at):
            truncated, end = True, int(eos_at.min())
        elif not rules.eos_once and bool((x[0, len(prompt_ids) :] == eos).any()):
            end = len(prompt_ids) + int((x[0, len(prompt_ids) :] == eos).long().argmax())
        else:
            end = size
        cut = torch.cat([cut, masked[masked > end]])
        masked = masked[masked <= end]
        if not len(masked):
            return steps


def ours(pipe: Any, prompt: str, gen_length: int, opts: dict, compat: bool) -> list[Step]:
    """Our Elastic-Cache's steps, read from its trace."""
    plan = {"diffcache": 1, "model": type(pipe).__name__.replace("Pipeline", "").lower()}
    options = {**opts, "reference_compat": compat}
    diffcache.accelerate(pipe, {**plan, "method": "elastic_cache", "options": options}, trace=True)
    try:
        pipe(prompt, gen_length=gen_length, block_length=gen_length)
        trace = diffcache.stats(pipe).trace
    finally:
        diffcache.remove(pipe)
    steps: dict[int, Step] = {}
    for event in trace:  # a step's layer events come before its model event
        values, site = event["values"], event["site"]
        step = steps.setdefault(event["step"], Step(None, None, [], [], [], []))
        if site == "model" and event["action"] == "partial":
            step.rows = values["rows"][0]
            step.full_from = values["full_from"][0] if values["full_from"] else None
        elif site == "layer":
            step.picked.append(values["picked"][0])
            step.similarity.append(values.get("similarity", [None])[0])
            if event["action"] == "partial":
                assert values["gamma"] == opts["gamma"]
                step.tracked = sorted(values["tracked"][0])
                step.refresh_from += [f for f in values["refresh_from"] if f is not None]
        elif site == "decode":
            step.committed, step.tokens = values["positions"][0], values["tokens"][0]
    assert sorted(steps) == list(range(len(steps)))
    return list(steps.values())


def compare(got: list[Step], want: list[Step]) -> None:
    assert len(got) == len(want)
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        where = f"step {step}"
        assert (g.rows, g.full_from) == (w.rows, w.full_from), where
        assert g.refresh_from == ([] if w.full_from is None else [w.full_from]), where
        assert g.tracked == w.tracked, where
        assert [sorted(p) for p in g.picked] == [sorted(p) for p in w.picked], where
        assert (g.committed, g.tokens) == (w.committed, w.tokens), where
        assert [s is None for s in g.similarity] == [s is None for s in w.similarity], where
        ours_sim = [s for s in g.similarity if s is not None]
        plain_sim = [s for s in w.similarity if s is not None]
        assert ours_sim == pytest.approx(plain_sim, abs=1e-5), where


# (model, prompt, gen_length, options): gamma / window where refreshes and non-refreshes both
# happen in both modes (asserted)
CASES = [
    ("llada-tiny", "hello", 16, {"window": 8, "gamma": 0.99}),
    ("dream-tiny", "hello", 16, {"window": 8, "gamma": 0.99}),
    ("llada-arith", "sort 8 2 9 0 4 8:", 32, {"window": 4, "gamma": 0.97, "threshold": 0.999}),
]


@pytest.mark.parametrize("compat", [True, False], ids=["reference_compat", "default"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_elastic_makes_the_plain_loops_decisions(case: tuple, compat: bool) -> None:
    """``reference_compat: true`` against the reference's rules, the default against ours."""
    name, prompt, gen_length, opts = case
    pipe = cached_model(name)
    want = plain_elastic(pipe, prompt, gen_length, opts, REFERENCE if compat else DEFAULT)
    cached = [s.full_from for s in want[1:]]
    assert None in cached and any(f is not None for f in cached), cached
    compare(ours(pipe, prompt, gen_length, opts, compat), want)


def test_elastic_eos_rules_against_the_plain_loop() -> None:
    """An EOS case: llada-tiny's head scores EOS as 1.05 times the token it commits most, so
    EOS is decoded at several steps, a later one left of the first. The reference truncates
    once (it keeps decoding the masks between the two EOS and may track masks it cut off);
    ours follows the first EOS and never tracks a mask."""
    shared = cached_model("llada-tiny")
    shared_head = shared.model.model.transformer["ff_out"].weight.clone()
    pipe = copy.deepcopy(shared)  # its LM head is edited below; the shared model must not be
    opts, eos = {"window": 8, "gamma": 0.99}, pipe.tokenizer.eos_token_id
    tokens = [t for s in plain_elastic(pipe, "hello", 24, opts, DEFAULT) for t in s.tokens]
    with torch.no_grad():
        head = pipe.model.model.transformer["ff_out"].weight
        head[eos] = 1.05 * head[max(set(tokens), key=tokens.count)]
    runs = {}
    for compat, rules in ((True, REFERENCE), (False, DEFAULT)):
        runs[compat] = want = plain_elastic(pipe, "hello", 24, opts, rules)
        compare(ours(pipe, "hello", 24, opts, compat), want)
    eos_at = [min(p for p, t in zip(s.committed, s.tokens, strict=True) if t == eos)
              for s in runs[True] if eos in s.tokens]  # fmt: skip
    assert len(eos_at) >= 2 and min(eos_at[1:]) < eos_at[0], eos_at
    first = eos_at[0]
    decoded = {p for s in runs[True] for p in s.committed}
    tracked = {p for s in runs[True] for layer in s.picked for p in layer}
    assert any(p > first and p not in decoded for p in tracked)  # a cut-off mask tracked
    assert len(runs[True]) > len(runs[False])  # the masks between the two EOS decoded
    assert torch.equal(shared.model.model.transformer["ff_out"].weight, shared_head)
