"""The samplers' fused confidence path (``token_confidence`` under the Triton interpreter)
against their float64 path: same tokens, confidences equal to float32 accuracy, the EOS/EoT
demotion kept, and the float64 path wherever the kernel does not apply; end to end, a plan's
``kernels:`` reaches the sampler and the store and the run names what ran."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import diffcache
from diffcache import kernels
from diffcache.pipelines import arith
from diffcache.pipelines.arith import data
from diffcache.pipelines.sampling import dream, llada
from diffcache.pipelines.sampling.stats import token_stats
from diffcache.plan import Plan
from diffcache.testing.kernels import needs_interpreter

EOS, EOT = 3, 5


def spread_logits() -> torch.Tensor:
    """[2, 4, 40] logits with distinct confidences (no near-ties), row 0 / candidate 1 choosing
    EOS and row 1 / candidate 2 choosing EoT."""
    logits = 4 * torch.randn(2, 4, 40, generator=torch.Generator().manual_seed(3))
    logits[0, 1, EOS] = 30.0
    logits[1, 2, EOT] = 30.0
    return logits


@needs_interpreter
@pytest.mark.parametrize("demote", [False, True])
@pytest.mark.parametrize("eos_inf", [False, True])
def test_llada_fused_matches_fp64(demote: bool, eos_inf: bool) -> None:
    logits = spread_logits()
    kw = dict(eos_id=EOS, eot_id=EOT, logits_eos_inf=eos_inf, confidence_eos_eot_inf=demote)
    plain: dict[str, str] = {}
    want_t, want_c = llada.llada_candidates(logits, 0.0, "low_confidence", record=plain, **kw)
    assert plain == {"token_confidence": "torch"}
    fused: dict[str, str] = {}
    got_t, got_c = llada.llada_candidates(
        logits, 0.0, "low_confidence", backend="triton", record=fused, **kw
    )
    assert fused == {"token_confidence": "triton"}
    assert torch.equal(got_t, want_t) and got_c.dtype == torch.float64
    torch.testing.assert_close(got_c, want_c, rtol=1e-5, atol=1e-7)
    if demote:  # a candidate that chose EoT (or EOS when it may be chosen) has confidence 0
        assert got_c[1, 2] == 0 and (eos_inf or got_c[0, 1] == 0)
    assert torch.equal(got_c.argsort(-1), want_c.argsort(-1))


@needs_interpreter
@pytest.mark.parametrize("alg", dream.ALGS)
def test_dream_fused_matches_fp32_reference(alg: str) -> None:
    logits = spread_logits()
    want_t, want_c = dream.dream_confidence(alg, logits, 0.0)
    record: dict[str, str] = {}
    got_t, got_c = dream.dream_confidence(alg, logits, 0.0, backend="triton", record=record)
    assert record == {"token_confidence": "triton"}
    assert torch.equal(got_t, want_t)
    torch.testing.assert_close(got_c, want_c, rtol=1e-5, atol=1e-6)


@needs_interpreter
@pytest.mark.parametrize(
    "setting", [dict(temperature=0.5), dict(top_p=0.9), dict(top_k=5), dict(remasking="random")]
)
def test_sampling_settings_the_kernel_does_not_cover_keep_the_fp64_path(setting: dict) -> None:
    logits = spread_logits()
    record: dict[str, str] = {}
    if "remasking" in setting:  # random confidences: no statistics at all
        llada.llada_candidates(
            logits,
            0.0,
            "random",
            torch.Generator(),
            eos_id=EOS,
            eot_id=EOT,
            backend="triton",
            record=record,
        )
        assert record == {}
        return
    gen = torch.Generator().manual_seed(0)
    args = (setting.get("temperature", 0.0), setting.get("top_p"), setting.get("top_k"), gen)
    dream.dream_confidence("maskgit_plus", logits, *args, backend="triton", record=record)
    assert record == {"token_confidence": "torch"}


def test_plain_pipeline_and_torch_backend_never_call_the_kernel(monkeypatch) -> None:
    """The references' float64 numerics: ``torch`` (and the plain pipeline's default) never
    reach the op, on any machine."""

    def refuse(*args, **kwargs):
        raise AssertionError("token_confidence called")

    monkeypatch.setattr(kernels, "token_confidence", refuse)
    llada.llada_candidates(spread_logits(), 0.0, "low_confidence", eos_id=EOS, eot_id=EOT)
    dream.dream_confidence("entropy", spread_logits(), 0.0)


@needs_interpreter
def test_plan_kernels_reach_the_sampler_and_the_store() -> None:
    """llada-arith (confident predictions) with Fast-dLLM's dual cache: ``kernels: triton`` runs
    the fused statistics and the K/V scatter in the interpreter and decodes the same answers as
    ``kernels: torch``; the run's stats name the backends."""
    pipe = arith.load()
    prompts = [ex.prompt for ex in data.read_task_file()[:3]]
    base = Plan.load("llada-tiny-fast_dllm.yaml")
    texts, used = {}, {}
    for backend in ("torch", "triton"):
        diffcache.accelerate(pipe, dataclasses.replace(base, kernels=backend))
        try:
            texts[backend] = pipe(prompts, **arith.DEFAULTS).texts
            used[backend] = diffcache.stats(pipe).kernels
        finally:
            diffcache.remove(pipe)
    assert texts["triton"] == texts["torch"]
    assert used["torch"] == {"kv_scatter": "torch", "token_confidence": "torch"}
    assert used["triton"] == {"kv_scatter": "triton", "token_confidence": "triton"}


def test_token_stats_auto_on_cpu_is_none() -> None:
    """auto never runs the kernel off CUDA: no statistics, the caller's torch path runs."""
    record: dict[str, str] = {}
    assert token_stats(torch.randn(1, 2, 5), "auto", record) is None
    assert record == {"token_confidence": "torch"}
