"""Caches under context parallelism: every rank takes the one-process run's decisions (EasyCache's
change-rate means are all-reduced as sums and counts before it decides), so outputs equal the
one-process run and Stats are equal on every rank.

diffusers' own context parallelism runs on CPU processes over gloo with Ulysses (ring attention
needs a backend returning the log-sum-exp, which no CPU backend does): the slow tests launch
``torchrun`` on wan2.1-tiny (split at ``blocks.0``: block sites see sharded tokens) and flux-tiny
(split at the root), each method's bundled plan."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import diffcache
from diffcache import distributed
from diffcache.kernels import l1_change
from diffcache.testing import context_parallel as cp
from diffcache.testing.toys import ToyPipeline


def test_mean_across_weighs_each_rank_by_its_element_count(monkeypatch) -> None:
    """This rank holds 2 of 7 columns, a fake second rank the other 5: the reduced means are
    the means over the whole tensors."""
    a, b = torch.randn(2, 7), torch.randn(2, 7)
    fake_group = object()

    def all_reduce(sums: torch.Tensor, group: object) -> None:  # adds the other rank's share
        assert group is fake_group
        theirs = l1_change(a[:, 2:], b[:, 2:]).double()
        sums += torch.cat((theirs * 10, torch.tensor([10.0], dtype=torch.float64)))

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    got = distributed.mean_across(fake_group, l1_change(a[:, :2], b[:, :2]), 4)
    torch.testing.assert_close(got, l1_change(a, b), rtol=1e-6, atol=0)


def test_no_context_parallel_group_without_diffusers_parallelism() -> None:
    assert distributed.context_parallel_group(ToyPipeline().transformer) is None


def test_sharded_easycache_takes_the_one_process_decisions_on_every_rank(tmp_path: Path) -> None:
    """Two gloo processes, each replaying its slice of latents that change at different rates:
    each slice alone would decide differently; with the reduction both ranks take the decisions
    of the one-process run and return its denoiser outputs, slice by slice."""
    mp.spawn(cp.sharded_toy_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    script = cp.toy_script(2)
    pipe = diffcache.accelerate(ToyPipeline(cfg="none", script=script), cp.TOY_PLAN)
    pipe(latents=script[0], steps=len(script))
    want = diffcache.stats(pipe).as_dict()
    assert 0 < want["compute_fraction"] < 1
    for rank in ranks:
        assert rank["stats"]["per_step_compute"] == want["per_step_compute"]
    for step, full in enumerate(pipe.scheduler.outputs):
        torch.testing.assert_close(
            torch.cat([r["outputs"][step] for r in ranks], dim=-1), full, rtol=1e-6, atol=0
        )


@pytest.mark.parametrize(
    ("model", "plan", "under_split"),
    [
        ("wan2.1-tiny", "wan2.1-tiny-hyca.yaml", "blocks.0"),
        ("flux-tiny", "flux-tiny-hyca.yaml", None),
    ],
)
def test_layers_see_input_and_output_sharded_alike(model: str, plan: str, under_split) -> None:
    """With diffusers' context-parallel hooks in place (no process group needed to place them),
    a layer goes directly under the input split of a module whose output stays sharded (Wan's
    ``blocks.0``) and outside one whose output is gathered inside it (FLUX's root, gathered at
    ``proj_out``); ``remove`` takes every layer out of diffusers' chain."""
    from diffusers import ContextParallelConfig
    from diffusers.hooks.context_parallel import apply_context_parallel

    from diffcache.hooks import Layer, layers
    from diffcache.models import load_model

    pipe = load_model(model)
    model_ = pipe.transformer
    apply_context_parallel(model_, ContextParallelConfig(ulysses_degree=2), model_._cp_plan)
    diffcache.accelerate(pipe, plan=plan)
    for name, module in model_.named_modules():
        registry = module.__dict__.get("_diffusers_hook")
        refs = [r.forward for r in getattr(registry, "_fn_refs", ())]
        if name == under_split:
            assert isinstance(refs[0], Layer) and not isinstance(module.forward, Layer), name
        else:
            assert not any(isinstance(f, Layer) for f in refs), name
    assert isinstance(model_.forward, Layer)  # the step site, outermost on the root
    from diffcache.hooks import hooked

    # parallelism enabled first: the run-start check finds no late split (it would raise)
    distributed.check_not_split_after({"transformer": model_}, None, hooked)
    diffcache.remove(pipe)
    assert not any(layers(m) for m in model_.modules())


def test_parallelism_enabled_after_accelerate_is_one_error_before_any_step() -> None:
    """FLUX splits its input at the root: diffusers' split, registered after ``accelerate``, would
    hand the step hook a shard while the model returns the whole output. The run stops at its
    start with one line saying what to do, and diffcache is detached."""
    from diffusers import ContextParallelConfig
    from diffusers.hooks.context_parallel import apply_context_parallel

    from diffcache.errors import RunError
    from diffcache.generate import Request, generate
    from diffcache.hooks import layers
    from diffcache.models import load_model

    pipe = diffcache.accelerate(load_model("flux-tiny"), plan="flux-tiny.yaml")
    model = pipe.transformer
    apply_context_parallel(model, ContextParallelConfig(ulysses_degree=2), model._cp_plan)
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    want = (
        r"^context parallelism was enabled on transformer \(FluxTransformer2DModel\) after "
        r"diffcache.accelerate, .*call diffcache.accelerate\(\) again "
        r"\(after enable_parallelism\).$"
    )
    with pytest.raises(RunError, match=want):
        generate(pipe, Request(prompt="a red ball", steps=2))
    assert calls == [] and not diffcache.is_accelerated(pipe)
    assert not any(layers(m) for m in model.modules())


PLANS = {
    "wan2.1-tiny": ["wan2.1-tiny.yaml", "wan2.1-tiny-ertacache.yaml"],
    "flux-tiny": ["flux-tiny.yaml", "flux-tiny-ertacache.yaml"],
}
for _model in PLANS:
    PLANS[_model] += [f"{_model}-invardiff.yaml", f"{_model}-hyca.yaml"]


@pytest.mark.slow
@pytest.mark.parametrize("model", list(PLANS))
def test_ulysses_over_two_cpu_processes_equals_one_process(tmp_path: Path, model: str) -> None:
    """``torchrun`` 2 processes, Ulysses degree 2, every method's bundled plan in turn on one
    pipeline (accelerate, generate, remove), then uncached: media within 1e-4 of one process
    (Ulysses reorders the attention arithmetic; measured ~1e-6 on [0, 1] media), the same Stats
    on every rank and as one process (wall time aside), and ``remove`` back to uncached."""
    plans = [*PLANS[model], "none"]  # none last: after every remove
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["-m", "diffcache.testing.context_parallel", "--model", model, "--ulysses", "2"]
    cmd += [a for p in plans for a in ("--plan", p)] + ["--out", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert res.returncode == 0, f"torchrun failed:\n{res.stderr[-3000:]}"
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    one = cp.run_plans(model, plans)
    assert cp.mismatches(ranks, one, atol=1e-4) == []
    for plan in PLANS[model]:
        assert ranks[0][plan]["stats"]["compute_fraction"] < 1, plan


def test_ring_without_a_half_precision_gpu_backend_is_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Ring attention merges the log-sum-exp that only half-precision GPU backends return: the
    script says which flags are missing (or that there is no GPU) before any model or process
    group, in one argparse error."""
    import torch.distributed as dist

    args = ["--model", "flux-tiny", "--plan", "none", "--out", str(tmp_path / "out")]
    refusals = {
        "got --attention-backend None, --dtype float32": ["--ring", "2"],
        "got --attention-backend _native_cudnn, --dtype float32": [
            *("--ring", "2", "--attention-backend", "_native_cudnn"),
        ],
    }
    if not torch.cuda.is_available():
        refusals["--ring 2 --attention-backend _native_cudnn: no GPU"] = [
            *("--ring", "2", "--attention-backend", "_native_cudnn", "--dtype", "bfloat16"),
        ]
    for want, ring in refusals.items():
        with pytest.raises(SystemExit) as e:
            cp.main([*args, *ring])
        err = capsys.readouterr().err
        assert e.value.code == 2 and want in err.splitlines()[-1]
    assert not (tmp_path / "out").exists() and not dist.is_initialized()


def test_run_plans_in_bfloat16_runs_the_bundled_calibrated_plans() -> None:
    """The half-precision check (ring) runs the float32 plans: refused on bfloat16 weights by
    accelerate, run here, where context parallel is compared with one process on the same
    plan."""
    from diffcache.errors import PlanError
    from diffcache.models import cast, load_model

    plan = "flux-tiny-ertacache.yaml"
    pipe = load_model("flux-tiny")
    cast(pipe, torch.bfloat16)
    with pytest.raises(PlanError, match="valid_for.weights"):
        diffcache.accelerate(pipe, plan)
    got = cp.run_plans("flux-tiny", [plan], dtype="bfloat16")[plan]
    assert 0 < got["stats"]["compute_fraction"] < 1 and torch.isfinite(got["media"]).all()


def test_cast_keeps_the_modules_a_model_lists_in_float32() -> None:
    """As from_pretrained(torch_dtype=...): Wan's time embedder and norms stay float32, the
    attention projections and the text encoder take the dtype."""
    from diffcache.models import cast, load_model

    pipe = load_model("wan2.1-tiny")
    cast(pipe, torch.bfloat16)
    params = dict(pipe.transformer.named_parameters())
    time_embedder = [
        p for n, p in params.items() if n.startswith("condition_embedder.time_embedder.")
    ]
    assert time_embedder and {p.dtype for p in time_embedder} == {torch.float32}
    assert params["blocks.0.norm2.weight"].dtype == torch.float32
    assert params["blocks.0.attn1.to_q.weight"].dtype == torch.bfloat16
    assert pipe.text_encoder.get_input_embeddings().weight.dtype == torch.bfloat16
