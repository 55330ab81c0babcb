"""Each DLM method recomputes the rows its rule says (recorded by the KV store on a short
hand-checkable generation), and bad requests fail before any model call."""

from __future__ import annotations

import math
import re

import pytest
import torch

import diffcache
from diffcache.errors import DiffCacheError, PlanError, UnsupportedModelError
from diffcache.kv.store import KVStore

REQ = {"gen_length": 8, "steps": 8, "block_length": 4}


def traced(pipe, method: str, options: dict, **kw):
    """Generate once with ``method``; returns (output, per step: rows written at layer 0)."""
    out, writes = store_writes(pipe, method, options, "hello", **kw)
    per_step = {s: set(r[0].tolist()) for s, layer, r in writes if layer == 0}
    return out, per_step


def store_writes(pipe, method: str, options: dict, prompts: str | list[str], **kw):
    """Generate once with ``method``; returns (output, the KV store's writes: (step, layer,
    rows ``[B, n]``))."""
    family = type(pipe).__name__.replace("Pipeline", "").lower()
    diffcache.accelerate(
        pipe, {"diffcache": 1, "model": family, "method": method, "options": options}, trace=True
    )
    writes: list[tuple[int, int, torch.Tensor]] = []
    original = KVStore.for_model

    def for_model(model, ids, *args):
        store = original(model, ids, *args)
        store.trace = writes
        return store

    KVStore.for_model = staticmethod(for_model)  # test instrumentation only
    try:
        out = pipe(prompts, **{**REQ, **kw})
    finally:
        KVStore.for_model = staticmethod(original)
    return out, writes


def committed_at(out) -> torch.Tensor:
    """``[L]``: the step each position of the first row was committed at (-1: the prompt)."""
    at = torch.full((out.tokens.shape[1],), -1)
    at[out.prompt_len :] = out.committed_at[0]
    return at


@pytest.mark.parametrize("every", [2, 3, 100])
def test_dkv_decode_recomputes_positions_not_decoded_two_steps_earlier(llada, every) -> None:
    """Full forwards at block steps 0, 1 and every ``every``-th (blocks of 4 steps); any other
    step recomputes the generated positions not decoded before the previous step."""
    out, rows = traced(llada, "dkv_cache", {"refresh_every": every})
    p, length = out.prompt_len, out.tokens.shape[1]
    decoded_at = committed_at(out)
    full = {s for s in range(8) if s % 4 in (0, 1) or s % 4 % every == 0}
    assert full == {2: {0, 1, 2, 4, 5, 6}, 3: {0, 1, 3, 4, 5, 7}, 100: {0, 1, 4, 5}}[every]
    for step, got in rows.items():
        if step in full:
            assert got == set(range(length)), step
            continue
        want = {q for q in range(p, length) if not (0 <= decoded_at[q] < step - 1)}
        assert got == want, (step, got, want)


@pytest.mark.parametrize("every", [2, 3])
def test_dkv_decode_on_dream_refreshes_every_n_steps(dream, every) -> None:
    """Dream has no blocks: full forwards at steps 0, N, 2N, ...; other steps recompute every
    position whose next one was not decoded before the previous step (shifted logits), and
    the last position."""
    out, rows = traced(dream, "dkv_cache", {"refresh_every": every})
    length = out.tokens.shape[1]
    decoded_at = committed_at(out)
    assert sorted(rows) == list(range(8))
    for step, got in rows.items():
        if step % every == 0:
            assert got == set(range(length)), step
            continue
        cached = {q for q in range(length - 1) if decoded_at[q + 1] < step - 1}
        assert got == set(range(length)) - cached, (step, got)


@pytest.mark.parametrize("shift", ["un", "un_right", "right"])
def test_dkv_dream_shift_says_which_positions_are_cacheable(dream, shift: str) -> None:
    """Dream's logits are shifted: a position's stored K/V is used when the token after it was
    decoded before the previous step (``un``), when it and the token after it were
    (``un_right``), or when it was (``right``); the rows giving this step's candidates'
    logits (the row before each mask) are recomputed anyway."""
    out, rows = traced(dream, "dkv_cache", {"refresh_every": 100, "shift": shift})
    p, length = out.prompt_len, out.tokens.shape[1]
    decoded_at = torch.full((length + 1,), 10**6)  # one past the end: never decoded
    decoded_at[:p] = -1
    decoded_at[p:length] = out.committed_at[0]
    assert sorted(rows) == list(range(8)) and rows[0] == set(range(length))
    for step in range(1, 8):
        before = [int(decoded_at[q]) < step - 1 for q in range(length + 1)]
        cacheable = {
            "un": before[1:],
            "un_right": [a and b for a, b in zip(before, before[1:], strict=False)],
            "right": before[:-1],
        }[shift]
        logit_rows = {q - 1 for q in range(p, length) if decoded_at[q] >= step}
        want = {q for q in range(length) if not cacheable[q]} | logit_rows
        assert rows[step] == want, (step, rows[step], want)


@pytest.mark.parametrize("variant", ["prefill", "pd"])
def test_dkv_prefill_and_pd_keep_the_prompt(pipe, family: str, variant: str) -> None:
    """After step 0 the prompt's K/V are kept (Dream recomputes its last position, whose logits
    are the first answer token's). prefill recomputes the whole answer every step; pd only at
    its refreshes (LLaDA: block steps 0, 1 and every 3rd; Dream: every 3rd step) and otherwise
    the answer positions not cacheable as in decode."""
    out, rows = traced(pipe, "dkv_cache", {"variant": variant, "refresh_every": 3})
    p, length = out.prompt_len, out.tokens.shape[1]
    shift = 1 if family == "dream" else 0
    decoded_at = torch.full((length + 1,), 10**6)  # one past the end: never decoded
    decoded_at[:p] = -1
    decoded_at[p:length] = out.committed_at[0]
    assert sorted(rows) == list(range(8)) and rows[0] == set(range(length))
    for step in range(1, 8):
        i = step % 4 if family == "llada" else step
        refresh = i % 3 == 0 or (family == "llada" and i == 1)
        answer = range(p - shift, length)
        if variant == "prefill" or refresh:
            want = set(answer)
        else:  # cacheable: decoded before the previous step (Dream: the next token is)
            want = {q for q in answer if not int(decoded_at[q + shift]) < step - 1}
        assert rows[step] == want, (step, rows[step], want)


@pytest.mark.parametrize("variant", ["decode", "pd"])
def test_dkv_batch_work_counts_each_rows_own_positions(pipe, variant: str) -> None:
    """With a parallel-decoding threshold the batch rows decode different counts, so a cached
    step's row sets are ragged (padded by repeating a position): the work recorded is each
    batch row's distinct positions, at every layer, as the store wrote them."""
    assert_batch_work_counts_distinct_rows(
        pipe, "dkv_cache", {"variant": variant, "refresh_every": 3}
    )


def assert_batch_work_counts_distinct_rows(pipe, method: str, options: dict) -> None:
    """Two prompts with a parallel-decoding threshold: some cached step pads a batch row, and
    the work recorded is each row's distinct positions, at every layer."""
    prompts = ["hello", "the quick brown fox"]
    kw = {"gen_length": 16, "steps": 16, "block_length": 8, "threshold": 0.02}
    _, writes = store_writes(pipe, method, options, prompts, **kw)
    layer0 = [r for _, layer, r in writes if layer == 0]
    distinct = [len(set(row.tolist())) for r in layer0 for row in r]
    assert distinct != [r.shape[1] for r in layer0 for _ in r]  # some step padded a row
    done, _ = diffcache.stats(pipe).work["token_layer"]
    assert done == sum(distinct) * pipe.model.num_layers


def test_dkv_greedy_order_is_drawn_from_the_request_generator(llada) -> None:
    """Greedy decodes a block in one random order drawn at its start from the request's
    generator: the block's positions by ascending fp64 uniform draw (a generator seeded alike
    draws them here), whatever the global random state."""
    options = {"variant": "greedy", "refresh_every": 2, "window": 1}
    draws = torch.rand(8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        gen = torch.Generator().manual_seed(3)
        out, _ = traced(llada, "dkv_cache", options, block_length=8, generator=gen)
        diffcache.remove(llada)
        assert out.committed_at[0].tolist() == draws.argsort().argsort().tolist()


def test_dkv_greedy_remasks_at_random_between_its_block_orders(llada) -> None:
    """Greedy decodes with LLaDA's random remasking: each step draws one uniform per scheduled
    mask from the request's generator (its picks are the block order's), so the second
    block's order is the 4 draws after the first block's 4 and its 4 steps' one each."""
    options = {"variant": "greedy", "refresh_every": 2, "window": 1}
    gen = torch.Generator().manual_seed(5)
    first = torch.rand(4, generator=gen, dtype=torch.float64)
    for _ in range(4):  # the first block's 4 steps: 1 scheduled mask each
        torch.rand(1, generator=gen, dtype=torch.float64)
    second = torch.rand(4, generator=gen, dtype=torch.float64)
    out, _ = traced(llada, "dkv_cache", options, generator=torch.Generator().manual_seed(5))
    rank = torch.cat([first.argsort().argsort(), second.argsort().argsort() + 4])
    assert out.committed_at[0].tolist() == rank.tolist()


def test_fast_dllm_dual_recomputes_the_block_prefix_the_rest(llada) -> None:
    for mode, upto in (("dual", "block"), ("prefix", "end")):
        out, rows = traced(llada, "fast_dllm", {"mode": mode, "threshold": None})
        diffcache.remove(llada)
        p, length = out.prompt_len, out.tokens.shape[1]
        for step, got in rows.items():
            start = p + 4 * (step // 4)
            if step % 4 == 0:
                assert got == set(range(length))
            else:
                end = start + 4 if upto == "block" else length
                assert got == set(range(start, end)), (mode, step)


@pytest.mark.parametrize("gamma", [2.0, -1.0])
def test_elastic_refreshes_from_the_layer_after_a_drift(llada, gamma: float) -> None:
    """An attention similarity (a cosine of probabilities, in (0, 1]) is below gamma 2 at every
    layer and never below -1: with 2 every step after the first recomputes its rows at layer 0
    and every position from layer 1 on; with -1 only its rows at every layer."""
    out, rows = traced(llada, "elastic_cache", {"gamma": gamma}, block_length=8)
    layers, length = llada.model.num_layers, out.tokens.shape[1]
    assert layers >= 2
    per_step = diffcache.stats(llada).per_step()
    assert len(per_step) == len(rows) >= 2
    want = [1.0]
    for step in range(1, len(per_step)):
        n = len(rows[step])
        assert n < length, step
        done = n + length * (layers - 1) if gamma > 1 else n * layers
        want.append(done / (length * layers))
    assert per_step == pytest.approx(want, abs=1e-12)
    # the trace names each partial call's rows and the layer each batch row refreshed from
    calls = [e["values"] for e in diffcache.stats(llada).trace if e["site"] == "model"][1:]
    assert [set(c["rows"][0]) for c in calls] == [rows[s] for s in range(1, len(rows))]
    assert [c["full_from"] for c in calls] == [[1] if gamma > 1 else None] * (len(rows) - 1)
    # a layer that recomputes every position has no drift test: traced ``computed``
    layer = [e for e in diffcache.stats(llada).trace if e["site"] == "layer" and e["step"] > 0]
    after = "computed" if gamma > 1 else "partial"
    want = ["partial"] + [after] * (layers - 1)
    assert [e["action"] for e in layer] == want * (len(rows) - 1)


def test_parallel_decoding_is_credited_for_the_calls_it_never_made(llada) -> None:
    """Threshold 0 commits a whole block per call: 2 calls for 8 steps, each recomputing every
    row (refresh every step), so 2/8 of the plain generation's token-layers."""
    traced(llada, "fast_dllm", {"threshold": 0.0, "refresh_every": 1})
    stats = diffcache.stats(llada)
    assert stats.model_calls == 2
    assert stats.compute_fraction == 2 / 8


def test_stats_name_only_the_kernels_this_generation_used(llada) -> None:
    """dKV-Cache with blocks of 2 steps recomputes every row (full forwards at block steps 0
    and 1), so it never scatters K/V rows: after a generation of 4-step blocks that did, in
    the same session, the next one's Stats do not name the scatter."""
    plan = {"diffcache": 1, "model": "llada", "method": "dkv_cache", "options": {}}
    diffcache.accelerate(llada, plan)
    llada("hello", **REQ)
    assert diffcache.stats(llada).kernels == {"kv_scatter": "torch", "token_confidence": "torch"}
    llada("hello", **{**REQ, "steps": 4})
    assert diffcache.stats(llada).kernels == {"token_confidence": "torch"}


def test_elastic_on_dream_decodes_by_confidence_not_origin(dream) -> None:
    """Elastic-Cache decodes by confidence: a request for Dream's ``origin`` (random reveal)
    decodes as ``maskgit_plus`` does, where the plain pipeline's two differ."""
    plain = [dream("hello", alg=alg, **REQ).tokens for alg in ("origin", "maskgit_plus")]
    assert not torch.equal(*plain)
    plan = {"diffcache": 1, "model": "dream", "method": "elastic_cache", "options": {}}
    diffcache.accelerate(dream, plan)
    got = [dream("hello", alg=alg, **REQ).tokens for alg in ("origin", "maskgit_plus")]
    assert torch.equal(*got)
    # only ``origin`` is replaced: ``topk_margin`` keeps its own confidence (a margin), here
    # with another commit order than ``maskgit_plus``'s, as in the plain pipeline
    orders = [dream("hello", alg=a, **REQ).committed_at for a in ("topk_margin", "maskgit_plus")]
    assert not torch.equal(*orders)


def test_elastic_decodes_until_no_mask_is_left_whatever_the_steps(llada) -> None:
    """Elastic-Cache's window decodes one block until no mask is left: llada-tiny's
    confidences (about 0.02) are below the threshold, so each step commits the window's best
    only, 8 steps for 8 masks, whatever the request's step count."""
    plan = {"diffcache": 1, "model": "llada", "method": "elastic_cache", "options": {}}
    diffcache.accelerate(llada, plan)
    runs = [llada("hello", **{**REQ, "steps": steps}) for steps in (2, 8)]
    for out in runs:
        assert out.steps == 8
        assert sorted(out.committed_at[0].tolist()) == list(range(8))
    assert torch.equal(runs[0].tokens, runs[1].tokens)


def _eos_head(pipe, factor: float) -> int:
    """Make ``pipe``'s head score EOS as ``factor`` times the token its plain generation of
    "hello" commits most (a test copy of the model); returns the EOS id."""
    out = pipe("hello", **REQ)
    tokens = out.tokens[0, out.prompt_len :].tolist()
    eos = pipe.tokenizer.eos_token_id
    with torch.no_grad():
        head = pipe.model.model.transformer["ff_out"].weight
        head[eos] = factor * head[max(set(tokens), key=tokens.count)]
    return eos


def test_elastic_without_its_decoding_rule_does_not_cut_at_eos(llada) -> None:
    """``decode: false`` leaves the decoding to the request's rule, EOS stop included: with a
    head that decodes EOS early, the identity plan equals the plain pipeline, which goes on
    decoding the masks after an EOS."""
    eos = _eos_head(llada, 1.05)
    kw = {**REQ, "gen_length": 16, "steps": 16, "block_length": 16}
    plain = llada("hello", **kw)
    at = plain.committed_at[0]
    first = int((plain.tokens[0, plain.prompt_len :] == eos).long().argmax())
    assert plain.tokens[0, plain.prompt_len + first] == eos
    assert bool((at[first + 1 :] > at[first]).any())  # masks after the EOS decoded later
    identity = {"refresh_every": 1, "decode": False}
    diffcache.accelerate(
        llada, {"diffcache": 1, "model": "llada", "method": "elastic_cache", "options": identity}
    )
    got = llada("hello", **kw)
    assert torch.equal(got.tokens, plain.tokens)
    assert torch.equal(got.committed_at, plain.committed_at)


def test_elastic_eos_stop_under_cfg_follows_each_real_rows_eos(llada) -> None:
    """Under classifier-free guidance (the model runs each row twice) each real row stops at
    its own EOS: no position right of an EOS is committed after it, every position left of
    the row's first EOS is committed; the row without an EOS decodes every position."""
    eos = _eos_head(llada, 1.1)
    plan = {"diffcache": 1, "model": "llada", "method": "elastic_cache", "options": {}}
    diffcache.accelerate(llada, plan)
    kw = {**REQ, "gen_length": 16, "steps": 16, "block_length": 16, "cfg_scale": 1.0}
    out = llada(["hello", "the quick brown fox"], **kw)
    gen, at = out.tokens[:, out.prompt_len :], out.committed_at
    assert not bool((gen[1] == eos).any()) and bool((at[1] >= 0).all())
    where = (gen[0] == eos).nonzero().flatten().tolist()
    assert where and bool((at[0] == -1).any())  # an EOS, and masks it left
    for e in where:
        assert bool((at[0, e + 1 :] <= at[0, e]).all()), e  # nothing right of it committed later
    assert bool((at[0, : where[0]] >= 0).all())


def test_elastic_batch_rows_measure_their_own_similarity(llada) -> None:
    """Each batch row's drift test averages over its own tracked tokens (a padded union in a
    batch): the traced similarities of a batch are each row's alone."""
    prompts = ["hello", "the quick brown fox"]
    plan = {"diffcache": 1, "model": "llada", "method": "elastic_cache", "options": {}}

    def partial_layers(batch: list[str]) -> list[dict]:
        diffcache.accelerate(llada, plan, trace=True)
        llada(batch, **REQ)
        trace = diffcache.stats(llada).trace
        diffcache.remove(llada)
        return [e["values"] for e in trace if e["site"] == "layer" and e["action"] == "partial"]

    both = partial_layers(prompts)
    assert any(len(v["tracked"][0]) != len(v["tracked"][1]) for v in both)  # a padded union
    for row, prompt in enumerate(prompts):
        alone = [v["similarity"][0] for v in partial_layers([prompt])]
        assert [v["similarity"][row] for v in both] == pytest.approx(alone, abs=1e-6)


def _elastic_step1(config, prompt_len: int, k0, q0, k1, q1):
    """One Elastic-Cache layer on a hand-made attention (batch 1, head dim 1; the last position
    masked and the window, the others up to ``prompt_len`` the prompt and the rest decoded at
    step 0): step 0 computes every row, step 1 the rows ``plan`` gives (``q1``, ``k1``: theirs).
    Returns (the policy, step 1's rows, its drift)."""
    from diffcache.kv.policy import DecodeState, LayerView
    from diffcache.methods.elastic_cache import ElasticPolicy

    length = k0.shape[2]
    policy = ElasticPolicy(config)
    ids = torch.tensor([[5 + i for i in range(length - 1)] + [99]])
    decoded_at = torch.tensor([[-1] * prompt_len + [0] * (length - 1 - prompt_len) + [-2]])
    state = DecodeState(ids, 99, prompt_len, 0, 1, decoded_at)
    policy.start(state, None)
    targets, full = torch.tensor([[length - 1]]), torch.zeros(1, dtype=torch.bool)
    assert policy.plan(state, targets).rows is None
    assert not policy.layer_end(0, LayerView(0, None, q0, k0, None, 1.0, full))
    state.step = 1
    rows = policy.plan(state, targets).rows
    old_k = k0.gather(2, rows[:, None, :, None].expand(-1, k0.shape[1], -1, 1))
    return policy, rows, policy.layer_end(0, LayerView(0, rows, q1, k1, old_k, 1.0, full))


def _col(*heads) -> torch.Tensor:
    """``[1, H, n, 1]``: per head, one value per position."""
    return torch.tensor(heads, dtype=torch.float32)[None, :, :, None]


def _elastic_layer_end(gamma: float, heads_axis: bool = False, config=None):
    """The drift test of a toy layer (2 heads, keys at positions 0-2, position 2 masked): step 1
    recomputes rows 1 and 2 (``config``: instead of ``gamma`` and ``heads_axis``)."""
    from diffcache.methods.elastic_cache import ElasticCacheConfig

    config = config or ElasticCacheConfig(gamma=gamma, reference_compat=heads_axis)
    k0 = _col([0.5, 1.5, 3.0], [0.5, 1.5, 3.0])
    k1 = _col([0.5, 0.5, 2.0], [0.5, 2.0, -1.0])  # rows 1, 2 rewritten at step 1
    q0 = _col([0.0, 1.0, 2.0], [0.0, -1.0, 2.0])
    q1 = _col([2.0, 2.0], [0.5, 2.0])  # rows 1, 2
    policy, rows, drift = _elastic_step1(config, 1, k0, q0, k1, q1)
    # the window query (position 2) attends most to key 1 among the decoded keys: tracked
    assert rows.tolist() == [[1, 2]]
    return drift


def test_elastic_drift_is_the_key_cosine_of_the_tracked_attention_below_gamma() -> None:
    """The tracked token's attention before (its old query on the old keys) and after (new
    query, new keys), per head; their cosine over the keys, averaged over heads, is compared
    with gamma (``reference_compat``: the cosine across heads per key, averaged over keys)."""

    def softmax(s):
        e = [math.exp(x) for x in s]
        return [x / sum(e) for x in e]

    def cos(a, b):
        dot = sum(x * y for x, y in zip(a, b, strict=True))
        return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    before = [softmax([1.0 * k for k in [0.5, 1.5, 3.0]]), softmax([-k for k in [0.5, 1.5, 3.0]])]
    after = [softmax([2.0 * k for k in [0.5, 0.5, 2.0]]), softmax([0.5 * k for k in [0.5, 2, -1]])]
    over_keys = sum(cos(b, a) for b, a in zip(before, after, strict=True)) / 2
    over_heads = sum(cos([b[j] for b in before], [a[j] for a in after]) for j in range(3)) / 3
    assert abs(over_keys - over_heads) > 0.1  # the toy tells the two readings apart
    for sim, compat in ((over_keys, False), (over_heads, True)):
        assert bool(_elastic_layer_end(sim + 1e-4, compat))
        assert not bool(_elastic_layer_end(sim - 1e-4, compat))


def test_elastic_aggressive_never_refreshes_a_drifted_layer() -> None:
    """aggressive() sets gamma to -1 (never refresh): the toy's similarity (0.849 by hand, the
    heads' key cosines) is below the default 0.9, which would refresh, yet nothing drifts."""
    from diffcache.methods.elastic_cache import ElasticCacheConfig

    config = ElasticCacheConfig.aggressive()
    assert config.gamma == -1.0 and ElasticCacheConfig().gamma == 0.9
    assert bool(_elastic_layer_end(0.9))  # 0.849 < 0.9: the default refreshes
    assert not bool(_elastic_layer_end(0.0, config=config))


def test_elastic_a_similarity_equal_to_gamma_is_no_drift() -> None:
    """Drift is a similarity *below* gamma. A tracked token whose query is 0 before and after
    attends uniformly (1/4 each) to the 4 keys whatever they hold: cosine exactly 1, and
    gamma 1 does not refresh (gamma 1 + 1e-4 does)."""
    from diffcache.methods.elastic_cache import ElasticCacheConfig

    k0 = _col([0.0, 0.0, 1.0, 0.0])
    k1 = _col([0.0, 0.0, 3.0, -1.0])  # rows 2, 3 rewritten at step 1
    q0 = _col([0.0, 0.0, 0.0, 1.0])  # the window query (3) attends most to key 2
    q1 = _col([0.0, 2.0])  # the tracked token 2's query stays 0
    for gamma, drifts in ((1.0, False), (1.0 + 1e-4, True)):
        policy, rows, drift = _elastic_step1(ElasticCacheConfig(gamma=gamma), 2, k0, q0, k1, q1)
        assert policy.track[0].tolist() == [[2]] and rows.tolist() == [[2, 3]]
        assert bool(drift) == drifts, gamma


def test_elastic_dream_window_after_a_one_token_prompt_is_queried_from_row_0() -> None:
    """Dream's logits are shifted: the window's mask at position 1 (after a one-token prompt)
    is queried from row 0, whose query attends most to key 2 among the decoded keys 0 and 2
    (row 1's, the mask's own, would pick key 0)."""
    from diffcache.kv.policy import DecodeState, LayerView
    from diffcache.methods.elastic_cache import ElasticCacheConfig, ElasticPolicy

    policy = ElasticPolicy(ElasticCacheConfig(window=1))
    ids, decoded_at = torch.tensor([[5, 99, 6]]), torch.tensor([[-1, -2, 0]])
    state = DecodeState(ids, 99, prompt_len=1, logit_shift=1, num_layers=1, decoded_at=decoded_at)
    policy.start(state, None)
    assert policy.plan(state, torch.tensor([[1]])).rows is None
    k, q = _col([1.0, 0.0, -1.0]), _col([-1.0, 1.0, 0.0])  # scores: row 0 -k, row 1 +k
    full = torch.zeros(1, dtype=torch.bool)
    assert not policy.layer_end(0, LayerView(0, None, q, k, None, 1.0, full))
    assert policy.track[0].tolist() == [[2]]


def test_elastic_batch_work_counts_each_rows_own_positions(pipe) -> None:
    """Elastic-Cache's ragged row sets (each row's tracked tokens, last decoded tokens and
    window; no depth refresh at gamma -1): the work recorded is each batch row's distinct
    positions, as for dKV-Cache."""
    assert_batch_work_counts_distinct_rows(
        pipe, "elastic_cache", {"gamma": -1.0, "threshold": 0.02, "window": 4}
    )


def test_elastic_step_after_a_periodic_refresh_uses_the_refreshs_tracks(llada) -> None:
    """``refresh_every`` 2: every even step is a full forward that also re-picks each layer's
    tracked tokens; the odd step after it recomputes those tracks (traced as ``picked`` at the
    refresh), the token decoded at the refresh and the window (the first 2 masks)."""
    options = {"refresh_every": 2, "window": 2, "gamma": -1.0}
    out, rows = traced(llada, "elastic_cache", options, block_length=8)
    p, length = out.prompt_len, out.tokens.shape[1]
    decoded_at = committed_at(out)
    trace = diffcache.stats(llada).trace
    assert len(rows) >= 4
    for step, got in rows.items():
        if step % 2 == 0:
            assert got == set(range(length)), step
            continue
        picked = [
            e["values"]["picked"][0]
            for e in trace
            if e["step"] == step - 1 and e["site"] == "layer"
        ]
        assert len(picked) == llada.model.num_layers
        masks = [q for q in range(p, length) if decoded_at[q] >= step]
        want = {t for pick in picked for t in pick} | set(masks[:2])
        want |= {q for q in range(p, length) if decoded_at[q] == step - 1}
        assert got == want, (step, got, want)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"gen_length": 10, "block_length": 4}, "not a multiple of block_length"),
        ({"gen_length": 8, "block_length": 4, "steps": 3}, "not divisible by the number of blocks"),
        ({"gen_length": 600}, "exceeds the model's context"),
        ({"temperature": -1.0}, "temperature must be a finite number >= 0, got -1"),
        ({"temperature": float("nan")}, "temperature must be a finite number >= 0, got nan"),
        ({"cfg_scale": float("inf")}, "cfg_scale must be a finite number >= 0, got inf"),
    ],
)
def test_bad_requests_fail_before_the_model_runs(llada, kw, message) -> None:
    calls = []
    llada.model.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(DiffCacheError, match=message):
        llada("hello", **kw)
    assert not calls


def test_dream_with_fewer_steps_than_blocks_is_refused_before_the_model_runs(dream) -> None:
    """Dream gives each block steps // blocks steps: 1 step over 2 blocks would decode nothing
    (all masks out, no error, before the rule); 2 steps decode both blocks, one step each."""
    calls = []
    hook = dream.model.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(DiffCacheError, match=r"^steps 1 is fewer than the number of blocks 2 "):
        dream("hello", gen_length=8, block_length=4, steps=1)
    assert not calls
    out = dream("hello", gen_length=8, block_length=4, steps=2)
    hook.remove()
    assert len(calls) == 2
    assert out.steps == 2 and bool((out.committed_at >= 0).all())


def test_empty_prompt_in_a_batch_is_refused(llada) -> None:
    with pytest.raises(DiffCacheError, match=r"prompt\(s\) \[1\] of the batch are empty"):
        llada(["hello", " "], gen_length=8, steps=8)


def test_a_llada_plan_on_dream_is_refused_and_dream_stays_clean(dream) -> None:
    with pytest.raises(PlanError, match="llada"):
        diffcache.accelerate(dream, {"diffcache": 1, "model": "llada", "method": "dkv_cache"})
    assert "cache_policy" not in vars(dream)


def test_dkv_greedy_recomputes_decoded_scheduled_and_their_windows(llada) -> None:
    from diffcache.methods.dkv_cache import neighbours

    hand = neighbours(
        torch.tensor([[False, False, False, True, False, False, False, False]]),
        torch.tensor([[True, True, False, False, True, True, True, False]]),
        3,
    )
    assert hand[0].nonzero().flatten().tolist() == [0, 1, 4]  # left 1, right 4, left 0
    one_side = neighbours(
        torch.tensor([[False, True, False, False, False]]),
        torch.tensor([[True, False, True, True, True]]),
        3,
    )
    assert one_side[0].nonzero().flatten().tolist() == [0, 2, 3]  # left 0, right 2, right 3
    options = {"variant": "greedy", "refresh_every": 2, "window": 1}
    out, rows = traced(llada, "dkv_cache", options)
    p, length = out.prompt_len, out.tokens.shape[1]
    at = torch.full((length,), -1)
    at[p:] = out.committed_at[0]
    for step, got in rows.items():
        if step % 4 % 2 == 0:  # refresh every 2 block steps (blocks of 4 steps)
            assert got == set(range(length))
            continue
        now = at == step
        masked = (at >= step) & ~now
        masked[:p] = False
        want = now | (at == step - 1) | neighbours(now[None], masked[None], 1)[0]
        assert got == set(want.nonzero().flatten().tolist()), step


def test_dkv_greedy_batch_rows_recompute_their_own_windows(llada) -> None:
    """Greedy on three prompts (blocks of 8 masks in 4 steps: 2 scheduled a step, window 2):
    each batch row's cached step recomputes its own last-decoded, scheduled and window
    positions; the rows' sets differ in size (padded by repeating a position), and the work
    recorded is each row's distinct positions, at every layer."""
    from diffcache.methods.dkv_cache import neighbours

    prompts = ["hello", "the quick brown fox", "a"]
    options = {"variant": "greedy", "refresh_every": 2, "window": 2}
    gen = torch.Generator().manual_seed(0)
    kw = {"gen_length": 16, "steps": 8, "block_length": 8, "generator": gen}
    out, writes = store_writes(llada, "dkv_cache", options, prompts, **kw)
    p, length = out.prompt_len, out.tokens.shape[1]
    assert bool((out.committed_at >= 0).all())
    layer0 = {step: r for step, layer, r in writes if layer == 0}
    assert sorted(layer0) == list(range(8))
    ragged = False
    for step, r in layer0.items():
        got = [set(row.tolist()) for row in r]
        ragged |= len({len(g) for g in got}) > 1
        for b, row in enumerate(got):
            if step % 4 % 2 == 0:  # a refresh: every 2 block steps
                assert row == set(range(length)), (step, b)
                continue
            at = torch.full((length,), -1)
            at[p:] = out.committed_at[b]
            now = at == step
            masked = (at >= step) & ~now
            masked[:p] = False
            want = now | (at == step - 1) | neighbours(now[None], masked[None], 2)[0]
            assert row == set(want.nonzero().flatten().tolist()), (step, b)
    assert ragged  # some cached step pads a row
    done, _ = diffcache.stats(llada).work["token_layer"]
    distinct = sum(len(set(row.tolist())) for r in layer0.values() for row in r)
    assert done == distinct * llada.model.num_layers


def test_dkv_greedy_commits_the_fixed_counts_whatever_the_request_threshold(llada) -> None:
    """Greedy commits the tokens its order scheduled, LLaDA's fixed per-step count (2 of a
    block's 4 masks a step here): a request's parallel-decoding threshold or factor, which
    would commit only the first of them, is set aside."""
    options = {"variant": "greedy", "refresh_every": 2, "window": 1}
    for rule in ({"threshold": 0.5}, {"factor": 0.01}):
        out, rows = traced(llada, "dkv_cache", options, steps=4, **rule)
        diffcache.remove(llada)
        assert sorted(rows) == list(range(4))
        assert sorted(out.committed_at[0].tolist()) == [0, 0, 1, 1, 2, 2, 3, 3], rule


def test_dkv_aggressive_is_pd_without_a_periodic_refresh(llada) -> None:
    """aggressive(): the prefill+decode cache with no periodic refresh within 16 steps (one
    block). Step 0 is the only full forward; block step 1 recomputes the answer (the prompt's
    K/V from step 0 are kept); any other step the answer positions not decoded before the
    previous step."""
    from diffcache.methods.dkv_cache import DKVCacheConfig

    options = DKVCacheConfig.aggressive().to_options()
    out, rows = traced(llada, "dkv_cache", options, gen_length=16, steps=16, block_length=16)
    p, length = out.prompt_len, out.tokens.shape[1]
    decoded_at = committed_at(out)
    assert sorted(rows) == list(range(16))
    for step, got in rows.items():
        if step == 0:
            want = set(range(length))
        elif step == 1:
            want = set(range(p, length))
        else:
            want = {q for q in range(p, length) if not (0 <= decoded_at[q] < step - 1)}
        assert got == want, (step, got, want)


@pytest.mark.parametrize("method", ["dkv_cache", "fast_dllm", "elastic_cache", "d2cache"])
def test_text_methods_name_the_kv_store_they_need(method: str) -> None:
    from diffcache.adapter import Target
    from diffcache.registry import methods
    from diffcache.testing.toys import TOY, ToyPipeline

    target = Target.resolve(TOY, ToyPipeline())
    assert methods()[method]().not_supported_reasons(target) == [
        f"{method} needs a kv store (position) but toy's adapter provides none"
    ]


def test_fast_dllm_refuses_a_threshold_with_a_factor(llada) -> None:
    plan = {"diffcache": 1, "model": "llada", "method": "fast_dllm"}
    message = (
        "method 'fast_dllm' cannot run on LLaDAPipeline:\n"
        "  - fast_dllm: give threshold or factor, not both"
    )
    with pytest.raises(UnsupportedModelError, match=f"^{re.escape(message)}$"):
        diffcache.accelerate(llada, {**plan, "options": {"threshold": 0.9, "factor": 1.0}})
    assert not diffcache.is_accelerated(llada)
    diffcache.accelerate(llada, {**plan, "options": {"threshold": None, "factor": 1.0}})


def test_fast_dllm_dream_recomputes_the_row_before_the_block(dream) -> None:
    """Dream's logits are shifted: a cached step of the dual cache recomputes the block and the
    row before it, position 0 after a one-token prompt."""
    out, writes = store_writes(dream, "fast_dllm", {"mode": "dual", "threshold": None}, "a")
    length = out.tokens.shape[1]
    assert out.prompt_len == 1
    rows = {s: set(r[0].tolist()) for s, layer, r in writes if layer == 0}
    assert sorted(rows) == list(range(8))
    for step, got in rows.items():
        start = 1 + 4 * (step // 4)
        assert got == (set(range(length)) if step % 4 == 0 else set(range(start - 1, start + 4)))


def test_fast_dllm_traces_the_real_rows_under_cfg(llada) -> None:
    """With classifier-free guidance the model runs each row twice; the parallel-decoding trace
    holds the real row's candidates only, with their confidences, and the committed ones."""
    plan = {"diffcache": 1, "model": "llada", "method": "fast_dllm", "options": {}}
    diffcache.accelerate(llada, plan, trace=True)
    llada("hello", cfg_scale=1.0, **REQ)
    trace = diffcache.stats(llada).trace
    decided = [e["values"] for e in trace if e["site"] == "parallel_decode"]
    committed = [e["values"]["positions"] for e in trace if e["site"] == "decode"]
    assert len(decided) == len(committed) == 8
    for values, positions in zip(decided, committed, strict=True):
        assert len(values["candidates"]) == len(values["confidence"]) == 1
        assert len(values["candidates"][0]) == len(values["confidence"][0]) >= 1
        assert set(positions[0]) <= set(values["candidates"][0])


def test_fast_dllm_rule_overrides_the_requests(llada) -> None:
    """A plan's parallel-decoding rule replaces the request's: a threshold of 0 in the request
    (every mask of a block in one call) changes nothing under a factor or threshold plan."""
    for options in ({"threshold": None, "factor": 0.5}, {"threshold": 0.5}):
        calls = []
        for request in ({}, {"threshold": 0.0}, {"factor": 100.0}):
            diffcache.accelerate(
                llada, {"diffcache": 1, "model": "llada", "method": "fast_dllm", "options": options}
            )
            out = llada("hello", **{**REQ, **request})
            calls.append((out.committed_at.tolist(), diffcache.stats(llada).model_calls))
            diffcache.remove(llada)
        assert calls[0][1] > 2 and calls[1] == calls[0] == calls[2], options


def test_dkv_greedy_is_refused_on_dream(dream) -> None:
    plan = {
        "diffcache": 1,
        "model": "dream",
        "method": "dkv_cache",
        "options": {"variant": "greedy"},
    }
    reason = (
        "dkv_cache variant greedy needs a sampler with random remasking (a fixed count per "
        "step in a drawn order); dream's sampler has none"
    )
    with pytest.raises(DiffCacheError, match=f"\n  - {re.escape(reason)}$"):
        diffcache.accelerate(dream, plan)


@pytest.mark.parametrize(("seam_of", "llada_rules"), [("llada", True), ("dream", False)])
def test_dkv_rules_follow_the_samplers_seam_not_the_family_name(seam_of, llada_rules) -> None:
    """dKV-Cache's LLaDA rules (greedy accepted; block step 1 a full forward, the schedule
    counted per block) come from the KV seam's sampler facts: a family of another name gets
    them with LLaDA's seam (semi-autoregressive, random remasking), not with Dream's."""
    import dataclasses
    from types import SimpleNamespace

    from diffcache.kv import DecodeState
    from diffcache.methods.dkv_cache import DKVCacheConfig, DKVPolicy
    from diffcache.registry import adapters

    adapter = dataclasses.replace(adapters()[seam_of], name="other")
    greedy = DKVCacheConfig(variant="greedy").own_reasons(SimpleNamespace(adapter=adapter))
    assert (greedy == []) is llada_rules
    # the second block's step 1 (the generation's 5th): position 2 decoded at step 4
    ids = torch.tensor([[1, 1, 5, 9, 9, 9]])
    decoded_at = torch.tensor([[-1, -1, 4, -2, -2, -2]])
    state = DecodeState(ids, 9, 2, 0, 1, decoded_at, block=(2, 6), step=5, block_step=1)
    plan = DKVPolicy(DKVCacheConfig(), adapter.kv).plan(state, torch.tensor([[3, 4, 5]]))
    assert (plan.rows is None) is llada_rules  # else the positions not decoded before step 4
    assert llada_rules or plan.rows.tolist() == [[2, 3, 4, 5]]


def test_d2cache_rollout_is_the_column_sums_of_the_layer_product() -> None:
    """Importance = 1^T M_last ... M_0 with M_l the identity whose recomputed rows i are
    (A_l[i] + e_i) / 2 (heads averaged), as dense float64 matrices; a padded row set repeats
    its first position, which must count once."""
    from diffcache.methods.d2cache import D2CacheConfig, D2Policy

    g = torch.Generator().manual_seed(0)
    length = 5
    layers = [  # (rows [B, n] or None: all, head-averaged probs [B, n, L])
        (None, torch.randn(2, length, length, generator=g).softmax(-1)),
        (torch.tensor([[1, 3, 1], [0, 2, 4]]), torch.randn(2, 3, length, generator=g).softmax(-1)),
        (torch.tensor([[4, 0, 4], [2, 2, 2]]), torch.randn(2, 3, length, generator=g).softmax(-1)),
    ]
    # a padding copy has its position's query, so the same probs
    for layer, b, copies in ((1, 0, [2]), (2, 0, [2]), (2, 1, [1, 2])):
        layers[layer][1][b, copies] = layers[layer][1][b, 0].clone()
    policy = D2Policy(D2CacheConfig())
    policy.attn = layers
    got = policy._rollout(2, length, torch.device("cpu"))
    for b in range(2):
        product = torch.eye(length, dtype=torch.float64)
        for rows, probs in layers:
            m = torch.eye(length, dtype=torch.float64)
            picked = range(length) if rows is None else rows[b].tolist()
            for j, i in enumerate(picked):
                m[i] = (probs[b, j].double() + torch.eye(length, dtype=torch.float64)[i]) / 2
            product = m @ product
        assert torch.allclose(got[b].double(), product.sum(0), atol=1e-6), b


def _refresh_trace(pipe, options: dict) -> list[dict]:
    family = type(pipe).__name__.replace("Pipeline", "").lower()
    plan = {"diffcache": 1, "model": family, "method": "dkv_cache", "options": options}
    diffcache.accelerate(pipe, plan, trace=True)
    try:
        pipe("hello", **REQ)
        return diffcache.stats(pipe).trace
    finally:
        diffcache.remove(pipe)


@pytest.mark.parametrize("every", [1, 2, 3, 5])
def test_dkv_refresh_schedule_follows_a_plain_schedule(pipe, family, every) -> None:
    """dKV-Cache decode (paper §3, horseee/dKV-Cache): LLaDA refreshes at block steps 0, 1 and
    every N-th (its cache resets per block of 4 steps here); Dream at steps 0, N, 2N, ... The
    trace's refresh events and the model's full forwards follow that schedule step by step."""
    trace = _refresh_trace(pipe, {"refresh_every": every})
    steps = REQ["steps"]
    if family == "llada":
        pos = [s % REQ["block_length"] for s in range(steps)]
        full = [i == 0 or i == 1 or i % every == 0 for i in pos]
    else:
        pos = list(range(steps))
        full = [i % every == 0 for i in pos]
    refresh = [e for e in trace if e["site"] == "refresh"]
    assert [e["step"] for e in refresh] == list(range(steps))
    assert [e["values"]["position"] for e in refresh] == pos
    assert [e["action"] == "computed" for e in refresh] == full
    model = [e for e in trace if e["site"] == "model"]
    assert [e["action"] == "computed" for e in model] == full


def test_d2cache_aggressive_recomputes_one_mask_and_the_decoded_token(llada) -> None:
    """aggressive(): stage 1 picks one mask and nothing is rolled out, so after the full step 0
    each step recomputes the token decoded at the previous step and one still-masked position."""
    from diffcache.methods.d2cache import D2CacheConfig

    options = D2CacheConfig.aggressive().to_options()
    out, rows = traced(llada, "d2cache", options, gen_length=16, steps=16, block_length=16)
    p, length = out.prompt_len, out.tokens.shape[1]
    decoded_at = committed_at(out)
    assert sorted(rows) == list(range(16))
    assert rows[0] == set(range(length))
    for step in range(1, 16):
        previous = {q for q in range(p, length) if decoded_at[q] == step - 1}
        assert len(previous) == 1 and previous <= rows[step], step
        rest = rows[step] - previous
        assert len(rest) == 1 and decoded_at[min(rest)] >= step, (step, rest)


def test_d2cache_batch_work_counts_each_rows_own_positions(pipe) -> None:
    """d²Cache's ragged query sets (each row's stage-1 masks and decoded tokens): the work
    recorded is each batch row's distinct positions, as for dKV-Cache."""
    assert_batch_work_counts_distinct_rows(pipe, "d2cache", {"current_k": 2, "rollout_p": 0.1})


def test_d2cache_never_recomputes_padding_even_at_rollout_p_1(llada) -> None:
    """Left padding (14 positions before "hello", 5 characters beside the 19 of the other
    prompt) gives and gets no attention: the rollout never picks it, not even at
    ``rollout_p`` 1, which keeps every other position of zero importance."""
    prompts = ["hello", "the quick brown fox"]
    out, writes = store_writes(llada, "d2cache", {"rollout_p": 1.0}, prompts)
    padding = set(range(len(prompts[1]) - len(prompts[0])))
    assert out.prompt_len == len(prompts[1]) and len(padding) == 14
    later = [set(r[0].tolist()) for step, layer, r in writes if step > 0 and layer == 0]
    assert len(later) == 7 and all(rows.isdisjoint(padding) for rows in later)
    assert any(rows & set(range(14, 19)) for rows in later)  # the rollout picks prompt rows


def test_d2cache_stage1_picks_block_masks_whose_scores_are_all_zero() -> None:
    """Stage 1 with every confidence 0 (every candidate chose EoT, which LLaDA's confidence
    demotes to 0): the scores all tie at 0, and it still picks ``current_k`` (2) masks, the
    two its search window holds (the block's), which the next step recomputes."""
    from diffcache.kv.policy import DecodeState
    from diffcache.methods.d2cache import D2CacheConfig, D2Policy

    policy = D2Policy(D2CacheConfig(current_k=2, rollout_p=0.0))
    ids = torch.tensor([[5, 6, 99, 99, 99, 99]])
    decoded_at = torch.tensor([[-1, -1, -2, -2, -2, -2]])
    state = DecodeState(ids, 99, 2, 0, 1, decoded_at, block=(2, 4), block_steps=2)
    plan = policy.plan(state, torch.tensor([[2, 3]]))
    assert plan.rows is None and plan.targets.tolist() == [[2, 3, 4, 5]]
    state.confidence = torch.zeros(1, 4, dtype=torch.float64)
    policy.step_end(state, plan, torch.zeros_like(ids, dtype=torch.bool))
    state.step = state.block_step = 1
    plan = policy.plan(state, torch.tensor([[2, 3]]))
    assert plan.rows.tolist() == [[2, 3]] and plan.targets.tolist() == [[2, 3]]


def test_d2cache_a_row_whose_candidates_stage1_left_out_keeps_its_first() -> None:
    """A step's candidates are narrowed to those whose logit row the previous step chose; a
    row left with none keeps its first (one, not two). Row 0's confidences are all 0 (every
    candidate chose EoT): stage 1's scores tie at 0 with no block bias, and with ``current_k``
    3 beyond the block's 2 masks its search window holds the next block's 3 too, so the tie
    decides (torch's top-k leaves the block's masks out here). Row 1 keeps its one mask."""
    from diffcache.kv.policy import DecodeState
    from diffcache.methods.d2cache import D2CacheConfig, D2Policy

    policy = D2Policy(D2CacheConfig(current_k=3, rollout_p=0.0))
    ids = torch.tensor([[5, 6] + [99] * 6, [5, 6] + [99] * 6])
    state = DecodeState(ids, 99, 2, 0, 1, torch.full(ids.shape, -2), block=(2, 5))
    plan = policy.plan(state, torch.tensor([[2, 3, 4]] * 2))
    state.ids = torch.tensor([[5, 6, 7] + [99] * 5, [5, 6, 7, 8] + [99] * 4])
    state.confidence = torch.tensor([[0.0] * 6, [0.5] * 6], dtype=torch.float64)
    committed = torch.zeros_like(ids, dtype=torch.bool)
    committed[0, 2] = committed[1, 2] = committed[1, 3] = True
    policy.step_end(state, plan, committed)
    state.step = state.block_step = 1
    chosen = policy.next
    targets = [[3, 4], [4, 4]]  # the block's masks, padded by repeating
    kept = [[t for t in row if chosen[b, t]] or row[:1] for b, row in enumerate(targets)]
    assert kept[0] == [3]  # the tie left both out: the first candidate stays
    width = max(len(k) for k in kept)
    want = [k + k[:1] * (width - len(k)) for k in kept]
    assert policy.plan(state, torch.tensor(targets)).targets.tolist() == want


def test_d2cache_identity_equals_plain_under_cfg(llada) -> None:
    """Under classifier-free guidance the unconditional rows take their real rows' stage-1
    confidences; with every row recomputed d²Cache decodes exactly as the plain pipeline."""
    from diffcache.methods.d2cache import D2CacheConfig

    plain = llada("hello", cfg_scale=1.0, **REQ).tokens
    options = D2CacheConfig.identity().to_options()
    diffcache.accelerate(
        llada, {"diffcache": 1, "model": "llada", "method": "d2cache", "options": options}
    )
    try:
        got = llada("hello", cfg_scale=1.0, **REQ).tokens
    finally:
        diffcache.remove(llada)
    assert torch.equal(got, plain)
