"""The ``pipeline`` driver seam: our own text-diffusion and next-scale toy pipelines with toy KV
methods (``diffcache.testing.toys_seq``): identity is bit-exact, work and KV bytes follow the
arithmetic, valid_for facts are checked, remove() restores the plain pipeline."""

from __future__ import annotations

import pytest
import torch

import diffcache
from diffcache.errors import AlreadyAcceleratedError, PlanError, UnsupportedModelError
from diffcache.generate import Request, generate
from diffcache.testing import toys_seq
from diffcache.testing.toys import ToyPipeline, clean
from diffcache.testing.toys_seq import (
    WIDTH,
    ScaleOutput,
    TextOutput,
    ToyBudgetConfig,
    ToyKVConfig,
    toy_scale_pipeline,
    toy_text_pipeline,
)

LAYERS, FP32 = 2, 4


def text_plan(config: ToyKVConfig, steps: int = 4, gen_length: int = 8) -> dict:
    return {
        "diffcache": 1,
        "model": "toy-text",
        "method": "toy_kv",
        "options": config.to_options(),
        "valid_for": {"num_inference_steps": steps, "gen_length": gen_length},
    }


def scale_plan(config: ToyBudgetConfig) -> dict:
    return {
        "diffcache": 1,
        "model": "toy-scale",
        "method": "toy_budget",
        "options": config.to_options(),
        "valid_for": {"num_inference_steps": 3},
    }


def same_text(a: TextOutput, b: TextOutput) -> bool:
    return (
        a.texts == b.texts
        and torch.equal(a.tokens, b.tokens)
        and torch.equal(a.logits, b.logits)
        and torch.equal(a.committed_at, b.committed_at)
    )


def same_scales(a: ScaleOutput, b: ScaleOutput) -> list[bool]:
    return [torch.equal(x, y) for x, y in zip(a.scales, b.scales, strict=True)]


def no_slots_left(pipe: object) -> bool:
    """No instance attribute left where diffcache hooked driver events or ``keep``."""
    events = {"begin_run", "begin_step", "end_run"}
    return not events & vars(pipe).keys() and not any(
        "keep" in vars(layer) or "forward" in vars(layer) for layer in pipe.model.layers
    )


def kv_bytes(length: int, layers: int = LAYERS, batch: int = 1) -> int:
    """K and V of every layer, fp32."""
    return layers * 2 * batch * length * WIDTH * FP32


# ----------------------------------------------------------------------------- text
def test_rows_path_of_a_layer_is_bit_exact_with_all_rows() -> None:
    layer = toy_text_pipeline().model.layers[0]
    h = torch.randn(1, 7, WIDTH)
    rows = torch.arange(7)
    h_rows = h.index_select(1, rows)
    q, k, v = layer.qkv(h_rows)
    store = torch.zeros(1, 7, WIDTH).index_copy(1, rows, k)
    values = torch.zeros(1, 7, WIDTH).index_copy(1, rows, v)
    out = torch.zeros(1, 7, WIDTH).index_copy(
        1, rows, layer.finish(h_rows, layer.attend(q, store, values))
    )
    assert torch.equal(out, layer(h))


def test_text_identity_is_bit_exact_and_remove_restores() -> None:
    pipe = toy_text_pipeline()
    prompts = ["cat", "a dog"]
    base = [pipe(p, gen_length=8, steps=4) for p in prompts]
    assert base[0].tokens.shape[1] != base[1].tokens.shape[1]
    assert "_" not in base[0].texts[0] and len(base[0].texts[0]) == 8
    diffcache.accelerate(pipe, text_plan(ToyKVConfig.identity()))
    for prompt, want in zip(prompts, base, strict=True):
        got = pipe(prompt, gen_length=8, steps=4)
        assert same_text(got, want), f"identity differs from the plain pipeline for {prompt!r}"
        length = want.tokens.shape[1]
        s = diffcache.stats(pipe)
        assert s.steps == 4 and s.model_calls == 4
        assert s.compute_fraction == 1.0
        assert s.work["token_layer"] == [LAYERS * 4 * length] * 2
        assert s.work["block"] == [LAYERS * 4] * 2
        assert s.kv_bytes_peak == kv_bytes(length)
        assert s.kv_bytes_per_step == [kv_bytes(length)] * 4
    assert generate(pipe, Request(prompt="cat", gen_length=8, steps=4)) == base[0].texts[0]
    diffcache.remove(pipe)
    assert not diffcache.is_accelerated(pipe)
    assert clean(pipe, pipe.model, *pipe.model.layers) and no_slots_left(pipe)
    assert all(
        same_text(pipe(p, gen_length=8, steps=4), b) for p, b in zip(prompts, base, strict=True)
    )


def test_text_aggressive_recomputes_exactly_the_rule_rows(monkeypatch) -> None:
    pipe = toy_text_pipeline()
    prompt, gen, steps, n = "cat", 4, 4, 3  # n: prompt tokens
    base = pipe(prompt, gen_length=gen, steps=steps)
    trace: list = []
    widths: list[int] = []
    monkeypatch.setattr(toys_seq, "ROW_TRACE", trace)
    for layer in pipe.model.layers:
        qkv = layer.qkv
        monkeypatch.setattr(layer, "qkv", lambda h, f=qkv: widths.append(h.shape[1]) or f(h))
    diffcache.accelerate(pipe, text_plan(ToyKVConfig.aggressive(), steps, gen))
    out = pipe(prompt, gen_length=gen, steps=steps)

    at = out.committed_at.tolist()
    expected = [tuple(range(n + gen))]  # step 0 refreshes every row
    for s in range(1, steps):
        masked = {n + i for i in range(gen) if at[i] >= s}
        committed = {n + i for i in range(gen) if at[i] == s - 1}
        expected.append(tuple(sorted(masked | committed)))
    assert [len(r) for r in expected] == [7, 4, 3, 2]
    assert trace == [(s, i, expected[s]) for s in range(steps) for i in range(LAYERS)]
    assert widths == [len(rows) for _, _, rows in trace], "qkv must see only the rows R"

    s = diffcache.stats(pipe)
    assert s.work["token_layer"] == [LAYERS * (7 + 4 + 3 + 2), LAYERS * steps * 7] == [32, 56]
    assert s.compute_fraction == 32 / 56
    assert s.per_step() == [1.0, 4 / 7, 3 / 7, 2 / 7]
    assert s.work["block"] == [LAYERS, LAYERS * steps]  # only step 0 runs whole blocks
    assert s.kv_bytes_peak == kv_bytes(7)
    assert torch.equal(out.logits[0], base.logits[0]), "step 0 is computed in full"
    assert not torch.equal(out.logits, base.logits), "reused rows changed nothing"

    # state is released between calls: a longer prompt in between changes nothing after it
    other = pipe("a dog", gen_length=gen, steps=steps)
    again = pipe(prompt, gen_length=gen, steps=steps)
    assert same_text(again, out)
    assert diffcache.stats(pipe).as_dict() | {"wall_s": 0} == s.as_dict() | {"wall_s": 0}
    fresh = diffcache.accelerate(toy_text_pipeline(), text_plan(ToyKVConfig.aggressive(), 4, 4))
    assert same_text(fresh("a dog", gen_length=gen, steps=steps), other)


def test_text_valid_for_gen_length_is_checked_and_pipeline_stays_accelerated() -> None:
    pipe = toy_text_pipeline()
    base = pipe("cat", gen_length=8, steps=4)
    diffcache.accelerate(pipe, text_plan(ToyKVConfig.identity(), gen_length=8))
    with pytest.raises(PlanError, match=r"(?s)gen_length=8 but .*gen_length=4.*still accelerated"):
        pipe("cat", gen_length=4, steps=4)
    assert diffcache.is_accelerated(pipe)
    with pytest.raises(PlanError, match="num_inference_steps=4"):
        pipe("cat", gen_length=8, steps=2)
    assert same_text(pipe("cat", gen_length=8, steps=4), base)
    assert diffcache.stats(pipe).steps == 4


def test_kv_methods_refuse_other_families() -> None:
    text, scale = toy_text_pipeline(), toy_scale_pipeline()
    toy_plan = {**text_plan(ToyKVConfig.identity()), "model": "toy", "valid_for": {}}
    with pytest.raises(UnsupportedModelError, match="toy_kv needs attention sites but toy's"):
        diffcache.accelerate(ToyPipeline(), toy_plan)
    cross = {**scale_plan(ToyBudgetConfig.identity()), "model": "toy-text", "valid_for": {}}
    with pytest.raises(UnsupportedModelError, match=r"toy_budget needs a kv store \(history\)"):
        diffcache.accelerate(text, cross)
    with pytest.raises(UnsupportedModelError, match="pass the whole pipeline"):
        diffcache.accelerate(scale.model, scale_plan(ToyBudgetConfig.identity()))
    assert clean(text, text.model, scale, scale.model, *scale.model.layers)
    assert no_slots_left(text) and no_slots_left(scale)


# ----------------------------------------------------------------------------- next-scale
def test_scale_budget_bounds_kv_bytes_per_scale() -> None:
    pipe = toy_scale_pipeline()
    base = pipe("a cat")
    diffcache.accelerate(pipe, scale_plan(ToyBudgetConfig(budget=3)))
    out = pipe("a cat")
    s = diffcache.stats(pipe)
    cumulative = [1, 5, 21]
    assert s.kv_bytes_per_step == [kv_bytes(min(c, 3)) for c in cumulative] == [128, 384, 384]
    assert s.kv_bytes_peak == kv_bytes(3)
    assert s.steps == 3 and s.model_calls == 3
    assert s.work["scale"] == [3, 3] and s.compute_fraction == 1.0
    # scales 0 and 1 see at most 3 history tokens either way; scale 2 loses 2 of its 5
    assert same_scales(out, base) == [True, True, False]
    assert all(layer.past is None for layer in pipe.model.layers), "stores emptied after a call"


def test_scale_identity_keeps_all_and_remove_restores() -> None:
    pipe = toy_scale_pipeline()
    base = pipe("a cat")
    diffcache.accelerate(pipe, scale_plan(ToyBudgetConfig(budget=100)))
    assert all(same_scales(pipe("a cat"), base))
    assert diffcache.stats(pipe).kv_bytes_per_step == [kv_bytes(c) for c in (1, 5, 21)]
    diffcache.remove(pipe)
    assert clean(pipe, pipe.model, *pipe.model.layers) and no_slots_left(pipe)
    diffcache.accelerate(pipe, scale_plan(ToyBudgetConfig.aggressive()))
    assert diffcache.stats(pipe).kv_bytes_peak is None  # nothing ran yet
    pipe("a cat")
    assert diffcache.stats(pipe).kv_bytes_per_step == [kv_bytes(1)] * 3
    diffcache.remove(pipe)
    assert clean(pipe, pipe.model, *pipe.model.layers) and no_slots_left(pipe)
    assert all(same_scales(pipe("a cat"), base))


@pytest.mark.parametrize("which", ["text", "scale"])
def test_double_accelerate_raises(which: str) -> None:
    if which == "text":
        pipe, plan = toy_text_pipeline(), text_plan(ToyKVConfig.identity())
    else:
        pipe, plan = toy_scale_pipeline(), scale_plan(ToyBudgetConfig.identity())
    diffcache.accelerate(pipe, plan)
    with pytest.raises(AlreadyAcceleratedError, match="remove"):
        diffcache.accelerate(pipe, plan)
    assert diffcache.is_accelerated(pipe)
