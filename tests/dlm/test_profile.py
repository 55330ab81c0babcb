"""Profiling the DLM methods: a compute target sets each method's knob (the value closest to
full computation that meets it), plans carry the request's gen_length / block_length, and the
compute fraction credits the calls parallel decoding never made."""

from __future__ import annotations

import re

import pytest

import diffcache
from diffcache.errors import DiffCacheError
from diffcache.generate import Request
from diffcache.methods.dkv_cache import DKVCacheConfig
from diffcache.methods.elastic_cache import ElasticCacheConfig
from diffcache.methods.fast_dllm import FastDLLMConfig
from diffcache.profile import Profiling

PROMPTS = ["hello there", "the quick brown fox"]
KW = {"gen_length": 16, "steps": 16, "block_length": 8}
REQUEST = Request(**KW)


@pytest.mark.parametrize(
    "method, knob, rising",
    [("dkv_cache", "refresh_every", False), ("elastic_cache", "gamma", True),
     ("d2cache", "rollout_p", True), ("fast_dllm", "threshold", True)],
)  # fmt: skip
def test_a_compute_target_sets_the_knob(llada, method: str, knob: str, rising: bool) -> None:
    target = 0.6  # one calibration prompt: the search's rule, not the average, is tested here
    plan = diffcache.profile(llada, method, PROMPTS[:1], request=REQUEST, target_compute=target)
    measured = plan.provenance["measured"]
    assert measured["compute_fraction"] <= target
    assert plan.valid_for == {"num_inference_steps": 16, "gen_length": 16, "block_length": 8}
    value = plan.options[knob]
    misses = [k for k, c in measured["search"] if c > target]
    # closest to full computation: every value tried beyond it computes too much
    assert all(k > value for k in misses) if rising else all(k < value for k in misses)
    diffcache.accelerate(llada, plan)
    llada(PROMPTS[0], **KW)
    assert diffcache.stats(llada).compute_fraction <= 1.0


def test_a_speedup_target_is_checked_on_the_clock(llada) -> None:
    """The speedup is turned into a compute target with the decoder's share, and the plan's
    wall-clock speedup on the calibration inputs is recorded beside it (not asserted: noisy)."""
    plan = diffcache.profile(llada, "dkv_cache", PROMPTS, request=REQUEST, target_speedup=1.05)
    given = plan.provenance
    assert given["target_speedup"] == 1.05 and 0 < given["denoiser_share"] <= 1
    assert 0 < given["target_compute"] < 1 and given["speedup_measured"] > 0
    assert not diffcache.is_accelerated(llada)


def test_dkv_refresh_is_a_whole_number_and_the_closest_to_full(llada) -> None:
    plan = diffcache.profile(llada, "dkv_cache", PROMPTS, request=REQUEST, target_compute=0.6)
    every = plan.options["refresh_every"]
    assert isinstance(every, int) and every > 1
    search = dict((round(k), c) for k, c in plan.provenance["measured"]["search"])
    assert search[every] <= 0.6
    if every - 1 in search:
        assert search[every - 1] > 0.6


def test_dkv_target_of_full_compute_keeps_every_step_a_refresh(llada) -> None:
    """A compute target of 1 is met by full computation, the value closest to it: refresh
    every step (``refresh_every`` 1, the identity), not the cheapest period that also meets it."""
    plan = diffcache.profile(llada, "dkv_cache", PROMPTS, request=REQUEST, target_compute=1.0)
    assert plan.options["refresh_every"] == 1
    assert plan.provenance["measured"]["compute_fraction"] == 1.0


def test_prefill_has_no_knob(llada) -> None:
    message = (
        "dkv_cache variant prefill has no knob to meet a compute target; "
        "use decode or pd (refresh_every) or greedy (window)"
    )
    with pytest.raises(DiffCacheError, match=f"^{re.escape(message)}$"):
        diffcache.profile(
            llada, DKVCacheConfig(variant="prefill"), PROMPTS, request=REQUEST,
            target_compute=0.5,
        )  # fmt: skip
    assert diffcache.profile(llada, DKVCacheConfig(variant="prefill"), PROMPTS, request=REQUEST)


def test_dkv_greedy_tunes_the_largest_window_meeting_the_target(llada) -> None:
    """Greedy's knob is ``window`` (compute rises with it; the refresh period is kept): the
    largest whole window whose run computes at most the target, checked against runs of that
    window and the next one. The target sits between windows 1 and 2 (0.22 and 0.25 here),
    the search's lower end."""
    target = 0.23
    greedy = DKVCacheConfig(variant="greedy")
    plan = diffcache.profile(llada, greedy, PROMPTS[:1], request=REQUEST, target_compute=target)
    window = plan.options["window"]
    assert isinstance(window, int) and window >= 1
    assert {**plan.options, "window": 4} == greedy.to_options()

    def compute(w: int) -> float:
        diffcache.accelerate(llada, {**plan.to_dict(), "options": {**plan.options, "window": w}})
        llada(PROMPTS[0], **KW)
        fraction = diffcache.stats(llada).compute_fraction
        diffcache.remove(llada)
        return fraction

    measured = compute(window)
    assert measured <= target
    assert plan.provenance["measured"]["compute_fraction"] == pytest.approx(measured, abs=1e-6)
    assert compute(window + 1) > target


def test_fast_dllm_with_a_factor_tunes_the_factor(llada) -> None:
    """With ``factor`` set, Fast-dLLM's knob is the factor (compute falls as it grows): the
    smallest factor tried that meets the target; every factor tried below it computes too
    much, and the threshold stays unset."""
    target = 0.3
    config = FastDLLMConfig(threshold=None, factor=1.0)
    plan = diffcache.profile(llada, config, PROMPTS[:1], request=REQUEST, target_compute=target)
    measured = plan.provenance["measured"]
    factor = plan.options["factor"]
    assert plan.options["threshold"] is None and factor != 1.0
    assert measured["compute_fraction"] <= target
    tried = dict(measured["search"])
    assert factor in tried and all(k < factor for k, c in tried.items() if c > target)
    assert any(c > target for c in tried.values())
    # a target the least parallel factor meets: the search's low end, 0.01
    easy = diffcache.profile(llada, config, PROMPTS[:1], request=REQUEST, target_compute=0.6)
    assert easy.options["factor"] == 0.01
    assert all(c <= 0.6 for _, c in easy.provenance["measured"]["search"])


def test_fast_dllm_threshold_below_one_token_a_step(llada) -> None:
    """A target below one token a step's compute (threshold 1) needs a lower threshold: the
    largest tried that meets it, every larger one tried computing too much."""
    target = 0.5
    plan = diffcache.profile(
        llada, "fast_dllm", PROMPTS[:1], request=REQUEST, target_compute=target
    )
    measured = plan.provenance["measured"]
    threshold = plan.options["threshold"]
    tried = dict(measured["search"])
    assert tried[1.0] > target and measured["compute_fraction"] <= target
    assert threshold < 1.0 and any(k == pytest.approx(threshold, abs=1e-6) for k in tried)
    assert all(k > threshold for k, c in tried.items() if c > target)


def test_compute_counts_the_calls_parallel_decoding_saved(llada) -> None:
    """Threshold 0 commits every masked position of a block at its first step: 2 calls of 16.
    The work not done in the 14 unmade calls counts as skipped."""
    diffcache.accelerate(
        llada,
        {"diffcache": 1, "model": "llada", "method": "fast_dllm",
         "options": {"threshold": 0.0, "refresh_every": 1}},
    )  # fmt: skip
    llada("hello", **KW)
    stats = diffcache.stats(llada)
    done, total = stats.work["token_layer"]
    full_call = (5 + 16) * llada.model.num_layers  # "hello" is 5 tokens
    assert stats.model_calls == 2
    assert done == 2 * full_call and total == 16 * full_call
    assert stats.compute_fraction == pytest.approx(2 / 16)


def test_more_calls_than_the_plain_generation_are_charged(llada) -> None:
    """With 4 steps for 16 tokens the plain generation commits 4 tokens a call; a threshold of 1
    commits one (its rule's minimum), so it makes 16 calls: 4 calls' worth is the total."""
    diffcache.accelerate(
        llada,
        {"diffcache": 1, "model": "llada", "method": "fast_dllm",
         "options": {"threshold": 1.0, "refresh_every": 1}},
    )  # fmt: skip
    llada("hello", **{**KW, "steps": 4})
    stats = diffcache.stats(llada)
    done, total = stats.work["token_layer"]
    full_call = (5 + 16) * llada.model.num_layers
    assert stats.model_calls == 16
    assert done == 16 * full_call and total == 4 * full_call and stats.compute_fraction == 4.0
    diffcache.remove(llada)


@pytest.mark.parametrize("method", ["easycache", "ertacache", "hyca", "invardiff"])
def test_latent_methods_are_refused_on_text_models(llada, method: str) -> None:
    from diffcache.errors import UnsupportedModelError

    refusal = f"{method} needs a latent denoiser but llada's adapter provides a masked-token"
    with pytest.raises(UnsupportedModelError, match=refusal):
        diffcache.profile(llada, method, PROMPTS, request=REQUEST)
    if method == "easycache":  # the others' plans need calibration: refused at load already
        with pytest.raises(UnsupportedModelError, match=refusal):
            diffcache.accelerate(llada, {"diffcache": 1, "model": "llada", "method": method})
    from diffcache.api import session_of

    assert session_of(llada) is None
    assert llada(PROMPTS[0], **KW).texts  # untouched: still runs plain


class _StepProfiling(Profiling):
    """Calibration runs without a model: the compute fraction is ``high`` when ``knob`` is
    above ``edge``, else ``low`` (a knob whose useful values crowd below 1)."""

    def __init__(self, knob: str, edge: float, target: float) -> None:
        self.knob, self.edge, self.target_compute, self.runs = knob, edge, target, 0

    def measure(self, config, calibration=None) -> dict:
        self.runs += 1
        return {"compute_fraction": 0.8 if getattr(config, self.knob) > self.edge else 0.2}


@pytest.mark.parametrize(
    "config, knob", [(FastDLLMConfig(), "threshold"), (ElasticCacheConfig(), "gamma")]
)
def test_a_knob_near_one_is_tuned_to_its_edge(config, knob: str) -> None:
    """A confidence threshold or a similarity bar is searched on its distance to 1, log-scaled:
    a target met up to 0.99999 only (compute 0.2 there, 0.8 above) gives a knob within 1e-5
    below that edge (a search on the knob itself, log-scaled over [lo, 1], resolves only
    ~3e-4 near 1), and knob 1 is tried first."""
    edge = 0.99999
    tuned = config.calibrate(_StepProfiling(knob, edge, target=0.5))
    value = getattr(tuned.config, knob)
    assert edge - 1e-5 <= value <= edge
    assert tuned.measured["search"][0] == [1.0, 0.8]
