"""Each DLM method recomputes the rows its rule says (recorded by the KV store on a short
hand-checkable generation), and bad requests fail before any model call."""

from __future__ import annotations

import pytest
import torch

import diffcache
from diffcache.errors import DiffCacheError, PlanError
from diffcache.kv.store import KVStore

REQ = {"gen_length": 8, "steps": 8, "block_length": 4}


def traced(pipe, method: str, options: dict, **kw):
    """Generate once with ``method``; returns (output, per step: rows written at layer 0)."""
    family = type(pipe).__name__.replace("Pipeline", "").lower()
    diffcache.accelerate(
        pipe, {"diffcache": 1, "model": family, "method": method, "options": options}
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


def test_dkv_decode_recomputes_positions_not_decoded_two_steps_earlier(llada) -> None:
    out, rows = traced(llada, "dkv_cache", {"refresh_every": 100})
    p, length = out.prompt_len, out.tokens.shape[1]
    decoded_at = torch.full((length,), -1)
    decoded_at[p:] = out.committed_at[0]
    for step, got in rows.items():
        block_step = step % 4  # 2 blocks of 4 steps
        if block_step in (0, 1):  # block start and the step after it: full forwards
            assert got == set(range(length)), step
            continue
        want = {q for q in range(p, length) if not (0 <= decoded_at[q] < step - 1)}
        assert got == want, (step, got, want)


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


def test_elastic_refreshes_from_the_layer_after_a_drift(llada) -> None:
    diffcache.accelerate(
        llada,
        {"diffcache": 1, "model": "llada", "method": "elastic_cache", "options": {"gamma": 2.0}},
    )
    llada("hello", gen_length=8, steps=8, block_length=8)
    stats = diffcache.stats(llada)
    layers, length = llada.model.num_layers, 5 + 8  # "hello" is 5 characters
    # gamma > 1: every step after the first drifts at layer 0, so layer 1 recomputes all rows
    done, total = stats.work["token_layer"]
    steps = stats.steps
    assert total == steps * length * layers
    assert done > (steps - 1) * length * (layers - 1) + length * layers - 1e-9
    assert done < total


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
