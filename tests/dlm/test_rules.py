"""Each DLM method recomputes the rows its rule says (recorded by the KV store on a short
hand-checkable generation), and bad requests fail before any model call."""

from __future__ import annotations

import math

import pytest
import torch

import diffcache
from diffcache import kernels
from diffcache.errors import DiffCacheError, PlanError
from diffcache.kv.store import KVStore

REQ = {"gen_length": 8, "steps": 8, "block_length": 4}


def traced(pipe, method: str, options: dict, **kw):
    """Generate once with ``method`` (traced); returns (output, per step: rows written at
    layer 0)."""
    family = type(pipe).__name__.replace("Pipeline", "").lower()
    diffcache.accelerate(
        pipe, {"diffcache": 1, "model": family, "method": method, "options": options}, trace=True
    )
    writes: list[tuple[int, int, torch.Tensor]] = []
    original = KVStore.for_model

    def for_model(model, ids, backend="auto"):
        store = original(model, ids, backend)
        store.trace = writes
        return store

    KVStore.for_model = staticmethod(for_model)  # test instrumentation only
    try:
        out = pipe("hello", **{**REQ, **kw})
    finally:
        KVStore.for_model = staticmethod(original)
    per_step = {s: set(r[0].tolist()) for s, layer, r in writes if layer == 0}
    return out, per_step


@pytest.mark.parametrize("every", [2, 3, 100])
def test_dkv_decode_recomputes_positions_not_decoded_two_steps_earlier(llada, every) -> None:
    """Full forwards at block steps 0, 1 and every ``every``-th (blocks of 4 steps); any other
    step recomputes the generated positions not decoded before the previous step."""
    out, rows = traced(llada, "dkv_cache", {"refresh_every": every})
    p, length = out.prompt_len, out.tokens.shape[1]
    decoded_at = torch.full((length,), -1)
    decoded_at[p:] = out.committed_at[0]
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
    p, length = out.prompt_len, out.tokens.shape[1]
    decoded_at = torch.full((length,), -1)
    decoded_at[p:] = out.committed_at[0]
    assert sorted(rows) == list(range(8))
    for step, got in rows.items():
        if step % every == 0:
            assert got == set(range(length)), step
            continue
        cached = {q for q in range(length - 1) if decoded_at[q + 1] < step - 1}
        assert got == set(range(length)) - cached, (step, got)


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


def test_parallel_decoding_is_credited_for_the_calls_it_never_made(llada) -> None:
    """Threshold 0 commits a whole block per call: 2 calls for 8 steps, each recomputing every
    row (refresh every step), so 2/8 of the plain generation's token-layers."""
    traced(llada, "fast_dllm", {"threshold": 0.0, "refresh_every": 1})
    stats = diffcache.stats(llada)
    assert stats.model_calls == 2
    assert stats.compute_fraction == 2 / 8


def test_stats_name_only_the_kernels_this_generation_used(llada, monkeypatch) -> None:
    """Recomputing every row never scatters K/V rows: a backend left from an earlier
    generation is not reported."""
    monkeypatch.setitem(kernels.last_backend, "kv_scatter", "torch")
    traced(llada, "fast_dllm", {"threshold": None, "refresh_every": 1})
    assert "kv_scatter" not in diffcache.stats(llada).kernels


def _elastic_layer_end(gamma: float, heads_axis: bool = False):
    """One Elastic-Cache layer on a hand-made attention (batch 1, 2 heads, head dim 1, keys at
    positions 0-2, position 2 masked): step 0 computes all rows, step 1 rows 1 and 2."""
    from diffcache.kv.policy import DecodeState, LayerView
    from diffcache.methods.elastic_cache import ElasticCacheConfig, ElasticPolicy

    def col(*heads):  # [1, H, n, 1]
        return torch.tensor(heads, dtype=torch.float32)[None, :, :, None]

    k0 = col([0.5, 1.5, 3.0], [0.5, 1.5, 3.0])
    k1 = col([0.5, 0.5, 2.0], [0.5, 2.0, -1.0])  # rows 1, 2 rewritten at step 1
    q0 = col([0.0, 1.0, 2.0], [0.0, -1.0, 2.0])
    q1 = col([2.0, 2.0], [0.5, 2.0])  # rows 1, 2
    policy = ElasticPolicy(ElasticCacheConfig(gamma=gamma, reference_compat=heads_axis))
    ids = torch.tensor([[5, 6, 99]])
    state = DecodeState(ids, 99, 1, 0, 2, torch.tensor([[-1, 0, -2]]))
    policy.start(state, None)
    targets, full = torch.tensor([[2]]), torch.zeros(1, dtype=torch.bool)
    assert policy.plan(state, targets).rows is None
    assert not policy.layer_end(0, LayerView(0, None, q0, k0, None, 1.0, full))
    # the window query (position 2) attends most to key 1 among the decoded keys: tracked
    assert policy.track[0].tolist() == [[1]]
    state.step = 1
    rows = policy.plan(state, targets).rows
    assert rows.tolist() == [[1, 2]]
    old_k = k0[:, :, 1:]
    return policy.layer_end(0, LayerView(0, rows, q1, k1, old_k, 1.0, full))


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


def test_dkv_greedy_is_refused_on_dream(dream) -> None:
    plan = {
        "diffcache": 1,
        "model": "dream",
        "method": "dkv_cache",
        "options": {"variant": "greedy"},
    }
    with pytest.raises(DiffCacheError, match="greedy is defined for LLaDA"):
        diffcache.accelerate(dream, plan)


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
