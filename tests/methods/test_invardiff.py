"""InvarDiff: the books from scores (quantiles, non-skip rows, step-first merge), the change-rate
scores and their re-sampling correction, and the plan followed exactly on every DiT family; the
reference code's JSON books imported."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import diffcache
from diffcache.adapter import Target
from diffcache.cli import main
from diffcache.errors import DiffCacheError, PlanError, TargetUnreachable
from diffcache.gated import DESCRIBED
from diffcache.generate import generate
from diffcache.methods.invardiff import InvarDiffConfig
from diffcache.methods.invardiff_calibrate import (
    _fit_quantile,
    _Recorder,
    books,
    import_reference_books,
    read_reference_books,
)
from diffcache.plan import Plan
from diffcache.registry import find_adapter
from diffcache.testing.toys import clean, tiny_request

STEPS = 8
PROMPTS = ["a cat", "a red fox"]


def _sites(n: int, role: str = "ff") -> list:
    stack = types.SimpleNamespace(attr="blocks")
    return [types.SimpleNamespace(expert=0, stack=stack, role=role) for _ in range(n)]


def test_books_follow_quantiles_nonskip_rows_and_step_first() -> None:
    cfg = InvarDiffConfig(nonskip_rate=0.2, step_quantile=0.5, module_quantiles={"ff": 0.5})
    step_scores = torch.tensor([1.0, 0.1, 0.9, 0.2, 0.8, 0.3, 0.7, 0.4, 0.6, 1.0])
    module_scores = torch.arange(20, dtype=torch.float64).reshape(10, 2) / 20
    step, module = books(cfg, step_scores, module_scores, _sites(2))
    # rows 1..8 scored; the median of step scores is 0.5: 0.1 0.2 0.3 0.4 are below, rows 0-1
    # are non-skip (int(0.2 * 10) = 2), the last row computes
    assert step.nonzero().flatten().tolist() == [3, 5, 7]
    assert module[[3, 5, 7]].all() and not module[[0, 1, 4, 6, 8, 9]].any()  # after a reused step
    # module scores rise with the row: rows 2 and 3 hold the 4 lowest of 16 (< the median)
    assert module[2].all()
    assert not books(InvarDiffConfig.identity(), step_scores, module_scores, _sites(2))[1].any()


def test_identity_and_aggressive_books() -> None:
    """20 steps (the default nonskip_rate 0.1 would keep 2 first rows, aggressive() keeps 1).
    Rising step scores: aggressive() reuses every scored step but the highest (row 18), and
    row 18 computes after the reused row 17. Equal step scores (none below their quantile)
    and rising module scores: every scored module entry but the highest is reused."""
    t, sites = 20, _sites(2)
    rising = torch.arange(t, dtype=torch.float64)
    modules = torch.arange(2 * t, dtype=torch.float64).reshape(t, 2)
    aggressive, identity = InvarDiffConfig.aggressive(), InvarDiffConfig.identity()
    step, module = books(aggressive, rising, torch.zeros(t, 2, dtype=torch.float64), sites)
    assert step.tolist() == [False] + [True] * 17 + [False, False]
    assert module.tolist() == [[s, s] for s in step.tolist()]
    step, module = books(aggressive, torch.ones(t, dtype=torch.float64), modules, sites)
    want = [[0 < r < t - 1, 0 < r < t - 2] for r in range(t)]
    assert not step.any() and module.tolist() == want
    for scores in ((rising, modules), (torch.ones(t, dtype=torch.float64), modules)):
        assert not any(b.any() for b in books(identity, *scores, sites))


def test_books_of_two_steps_compute_everything() -> None:
    """No row is scored (rows 1..T-2 are empty), so nothing is reused even at quantile 1."""
    step, module = books(InvarDiffConfig.aggressive(), torch.zeros(2), torch.zeros(2, 1), _sites(1))
    assert step.tolist() == [False, False] and module.tolist() == [[False], [False]]


def _fit(rows: list[list[float]], target: float) -> InvarDiffConfig:
    """``_fit_quantile`` on one module family whose scored rows (1..T-2) are ``rows``; the step
    scores are all equal (no step is reused) and only row 0 and the last row always compute."""
    scored = torch.tensor(rows, dtype=torch.float64)
    t, m = scored.shape[0] + 2, scored.shape[1]
    module_scores = torch.ones(t, m, dtype=torch.float64)
    module_scores[1:-1] = scored
    cfg = InvarDiffConfig(nonskip_rate=0.0, module_quantiles={"ff": 0.5})
    step_scores = torch.ones(t, dtype=torch.float64)
    return _fit_quantile(cfg, (step_scores, module_scores), _sites(m), t, target)


def test_a_compute_target_fits_the_smallest_readable_quantile() -> None:
    """Distinct scores 0..n-1 reuse the ceil(q (n - 1)) lowest at quantile q, so a target
    needing k reused entries holds for every q above (k - 1) / (n - 1): the fit is the
    smallest such q of 2 digits, else 3, else 4, else the bisection's own end (a multiple of
    2^-20) when the books change faster than every 1e-4."""
    six = [[float(k)] for k in range(6)]  # 8 rows of 1 module; rows 1..6 scored 0..5
    for target, q in ((0.5, 0.61), (0.375, 0.81)):  # 4 of 8 reused (q > 3/5), 5 (q > 4/5)
        fitted = _fit(six, target)
        assert (fitted.step_quantile, dict(fitted.module_quantiles)) == (q, {"ff": q})
    with pytest.raises(TargetUnreachable) as e:  # at most 5 of 8 calls are ever reused
        _fit(six, 0.25)
    assert str(e.value) == (
        "invardiff: even at quantile 1 the plan computes 0.375 of the module calls, above the "
        "target 0.250; lower nonskip_rate or ask for less"
    )
    assert e.value.least == 0.375

    def one_row(n: int, reused: int) -> float:
        """The fitted quantile of one scored row of n + 1 modules (3 rows in all) with a
        target that needs ``reused`` of them."""
        return _fit([[float(k) for k in range(n + 1)]], 1 - reused / (3 * (n + 1)) + 1e-6)

    assert one_row(400, 247).step_quantile == 0.616  # (246/400, 247/400] holds no 0.0x
    assert one_row(400, 400).step_quantile == 1.0  # (0.9975, 1]
    assert one_row(4000, 2462).step_quantile == 0.6153  # (0.61525, 0.6155]
    assert one_row(40000, 24005).step_quantile == math.ceil(0.6001 * 2**20) / 2**20


def _call(step: int, name: str = "m0", kind: str = "module") -> types.SimpleNamespace:
    site = types.SimpleNamespace(kind=kind, name=name, returns=("hidden",))
    return types.SimpleNamespace(site=site, step=step, branch=0)


def _record(plan=None) -> dict:
    target = types.SimpleNamespace(
        sites=lambda kind: [types.SimpleNamespace(name="m0")] if kind == "module" else []
    )
    rec = _Recorder(target, plan)
    for t in range(6):  # a straight line: every step changes the feature by the same amount
        rec.see(_call(t), torch.full((4,), float(t)))
    return rec.result()


def test_scores_are_centred_change_ratios_and_the_correction_freezes_references() -> None:
    plain = _record()
    assert torch.allclose(plain["module"][1:5, 0], torch.ones(4, dtype=torch.float64))
    # planned reuse at steps 2-4: at step 3 (after the first reuse of the run) the reference
    # refreshes once, then stays through the run: step 5 is measured against step 3's
    # feature, two steps back, so the rate stored at row 4 doubles
    module_book = torch.tensor([[False], [False], [True], [True], [True], [False]])
    fixed = _record((torch.zeros(6, dtype=torch.bool), module_book))
    assert fixed["module"][1:5, 0].tolist() == pytest.approx([1.0, 1.0, 1.0, 2.0], rel=1e-6)


class _Profiling:
    """What ``calibrate`` is handed: ``requests`` equal requests of ``len(block)`` steps where
    the last of three blocks outputs ``block[t]`` at step t (the other two ``module[t]``) and
    each of ``modules`` module sites (m0, m1...) outputs ``module[t]`` (one value each; with
    ``batch`` the last block outputs a batch of two rows, ``block[t]`` and ``module[t]``);
    ``record`` counts its passes."""

    def __init__(
        self,
        block: list[float],
        module: list[float],
        modules: int = 1,
        requests: int = 1,
        batch: bool = False,
    ) -> None:
        stack = types.SimpleNamespace(attr="blocks")
        self.modules = [
            types.SimpleNamespace(
                kind="module", name=f"m{i}", expert=0, stack=stack, role="ff", returns=("out",)
            )
            for i in range(modules)
        ]
        self.blocks = [
            types.SimpleNamespace(kind="block", name=f"b{i}", returns=("hidden",)) for i in range(3)
        ]
        found = {"module": self.modules, "block": self.blocks}
        self.target = types.SimpleNamespace(sites=lambda kind: found[kind])
        self.target_compute = None
        self.valid_for = {"num_inference_steps": len(block)}
        self.features, self.requests, self.batch = (block, module), requests, batch
        self.passes = 0

    def record(self, observer: Any) -> dict[str, torch.Tensor]:
        self.passes += 1
        b0, b1, last = self.blocks
        for _ in range(self.requests):
            for t, (b, m) in enumerate(zip(*self.features, strict=True)):
                hidden = [[b], [m]] if self.batch else [b]
                calls = [(b0, [m]), (b1, [m]), (last, hidden), *((s, [m]) for s in self.modules)]
                for site, x in calls:
                    call = types.SimpleNamespace(site=site, step=t, branch=0)
                    observer.see(call, torch.tensor(x))
            observer.end_request()
        return observer.result()


#: module outputs whose changes are 1, 1, 0.5, 1, 2 (steps 1..5); the block's change by 1 a step
_MODULE = [0.0, 1.0, 2.0, 2.5, 3.5, 5.5]
_BLOCK = [float(t) for t in range(6)]


def test_calibrate_scores_the_first_pass_without_correction_and_corrects_with_its_books() -> None:
    """Row k's score is change(k + 1) / change(k): the first pass gives 1, 0.5, 2, 2 (rows
    1..4) and equal step scores (no step is reused); the median 1.5 reuses modules at rows 1
    and 2. The correction pass freezes m0's reference at step 2's output through that run
    (refreshed at step 2, the first reuse): step 3 changes 0.5 from it over step 2's change
    1, step 4 changes 1.5 from it over 1, step 5 changes 2 over step 4's 1.5."""
    cfg = InvarDiffConfig(nonskip_rate=0.0, step_quantile=0.5, module_quantiles={"ff": 0.5})
    for correction, passes, rows in ((False, 1, [1, 0.5, 2, 2]), (True, 2, [1, 0.5, 1.5, 4 / 3])):
        profiling = _Profiling(_BLOCK, _MODULE)
        done = dataclasses.replace(cfg, correction=correction).calibrate(profiling)
        cal = done.calibration
        assert profiling.passes == passes and cal.sites == ("m0",)
        assert cal.step_book.dtype == cal.module_book.dtype == torch.bool
        assert cal.module_scores[:, 0].tolist() == pytest.approx([1, *rows, 1], rel=1e-6)
        assert cal.step_scores.tolist() == pytest.approx([1.0] * 6, rel=1e-6)
        assert not cal.step_book.any()
        assert cal.module_book[:, 0].tolist() == [False, True, True, False, False, False]
        assert done.measured == {"compute_fraction": round(4 / 6, 6), "reused_steps": []}


def test_calibrating_a_model_without_module_sites_is_refused() -> None:
    profiling = _Profiling(_BLOCK, _MODULE, modules=0)
    with pytest.raises(DiffCacheError) as e:
        InvarDiffConfig().calibrate(profiling)
    assert str(e.value) == "invardiff: this model declares no module sites"
    assert profiling.passes == 0


def test_the_step_score_spans_the_batch_and_freezes_through_reused_steps() -> None:
    """The last block's two batch rows change by 1 + 1, 1 + 1, 1 + 0.5, 1 + 1, 1 + 2 (steps
    1..5): rows 1..4 score 1, 0.75, 4/3, 1.5 and the median reuses steps 1 and 2. Corrected,
    the reference freezes at step 2's output: step 3 changes 1.5 from it over 2, step 4 changes
    2 + 1.5 over 2, step 5 changes 3 over 3.5; the median of 1, 0.75, 1.75, 6/7 reuses steps
    2 and 4 (and their modules; the steps after them compute every module)."""
    cfg = InvarDiffConfig(nonskip_rate=0.0, step_quantile=0.5, module_quantiles={"ff": 0.0})
    for correction, rows, reused in (
        (False, [1, 0.75, 4 / 3, 1.5], [1, 2]),
        (True, [1, 0.75, 1.75, 6 / 7], [2, 4]),
    ):
        profiling = _Profiling(_BLOCK, _MODULE, batch=True)
        done = dataclasses.replace(cfg, correction=correction).calibrate(profiling)
        cal = done.calibration
        assert cal.step_scores.tolist() == pytest.approx([1, *rows, 1], rel=1e-6)
        book = [t in reused for t in range(6)]
        assert cal.step_book.tolist() == book and cal.module_book[:, 0].tolist() == book
        assert done.measured["reused_steps"] == reused


def test_a_change_norm_adds_1e_8_per_element_and_each_step_counts_once() -> None:
    """The last block's two rows change by 0, 0, 2e-8, 0 (steps 1..4): norms 2e-8, 2e-8,
    4e-8, 2e-8 with 1e-8 added per element, so rows 1..3 score 1, 2, 0.5; two module sites
    do not count as more steps."""
    block = [0.0, 0.0, 0.0, 2e-8, 2e-8]
    cal = (
        InvarDiffConfig(correction=False)
        .calibrate(_Profiling(block, [0.0] * 5, modules=2, batch=True))
        .calibration
    )
    assert cal.step_scores.tolist() == pytest.approx([1, 1, 2, 0.5, 1], rel=1e-6)
    assert cal.module_scores.tolist() == [[1.0, 1.0]] * 5


def test_a_module_quantile_is_its_stack_roles_else_its_roles_else_zero() -> None:
    """m0 (stack ``blocks``, role ``ff``) scores 1, 0.5, 2, 2 (rows 1..4): quantile 0.5 (1.5)
    reuses rows 1 and 2, quantile 0 none."""
    quantiles = [
        ({"attn": 0.5}, []),
        ({"ff": 0.5}, [1, 2]),
        ({"blocks.ff": 0.5, "ff": 0.0}, [1, 2]),
        ({"blocks.ff": 0.0, "ff": 0.5}, []),
    ]
    for module_quantiles, reused in quantiles:
        cfg = InvarDiffConfig(nonskip_rate=0.0, step_quantile=0.0, correction=False)
        cfg = dataclasses.replace(cfg, module_quantiles=module_quantiles)
        cal = cfg.calibrate(_Profiling(_BLOCK, _MODULE)).calibration
        assert cal.module_book[:, 0].tolist() == [t in reused for t in range(6)], module_quantiles


def test_calibration_scores_are_float64_means_over_the_requests() -> None:
    """Outputs 0, 0, 0, s, s with s = 2e-16 change by 0, 0, s, 0, each plus 1e-8: rows 1..3
    score 1, 1 + 2e-8 and 1 - 2e-8 (float32 rounds all three to 1), so the median 1 reuses
    row 3 only; two equal requests score as one."""
    tiny = [0.0, 0.0, 0.0, 2e-16, 2e-16]
    steps_only = InvarDiffConfig(nonskip_rate=0.0, step_quantile=0.5, module_quantiles={})
    modules_only = InvarDiffConfig(
        nonskip_rate=0.0, step_quantile=0.0, module_quantiles={"ff": 0.5}
    )
    for cfg, block, module in ((steps_only, tiny, [0.0] * 5), (modules_only, [0.0] * 5, tiny)):
        profiling = _Profiling(block, module, requests=2)
        cal = dataclasses.replace(cfg, correction=False).calibrate(profiling).calibration
        assert cal.step_scores.tolist() == [1.0] * 5 and cal.module_scores.tolist() == [[1.0]] * 5
        reused = [False, False, False, True, False]
        assert cal.step_book.tolist() == (reused if cfg is steps_only else [False] * 5)
        assert cal.module_book[:, 0].tolist() == reused


def test_calibrating_fewer_than_three_steps_names_the_step_count() -> None:
    """A change rate needs three steps (two changes): two steps record nothing."""
    with pytest.raises(DiffCacheError) as e:
        InvarDiffConfig().calibrate(_Profiling([0.0, 1.0], [0.0, 1.0]))
    assert str(e.value) == (
        "invardiff: no change rate was recorded over 2 steps (rates need at least 3 steps and "
        "module sites that run)"
    )


FAMILIES = ["wan2.1-tiny", "hunyuanvideo-tiny", "flux-tiny", "qwenimage-tiny", "dit-tiny"]


@pytest.mark.parametrize("model", [*FAMILIES, "cogvideox-tiny"])
def test_every_family_computes_exactly_the_planned_modules(model: str) -> None:
    pipe = diffcache.load_model(model)
    req, prompts, one = tiny_request(model, STEPS)
    base = generate(pipe, one)
    plan = diffcache.profile(pipe, InvarDiffConfig(nonskip_rate=0.2), prompts, request=req)
    cal = plan.calibration_data
    planned = int((~cal.module_book).sum())
    diffcache.accelerate(pipe, plan)
    try:
        out = generate(pipe, one)
        stats = diffcache.stats(pipe)
    finally:
        diffcache.remove(pipe)
    branches = stats.work["module"][1] / cal.module_book.numel()
    assert branches in (1, 2) and stats.work["module"][0] == branches * planned
    assert stats.compute_fraction == pytest.approx(planned / cal.module_book.numel())
    assert torch.isfinite(torch.as_tensor(out)).all() and not (out == base).all()
    assert clean(pipe.transformer) and (generate(pipe, one) == base).all()


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    pipe = diffcache.load_model("wan2.1-tiny")
    req, prompts, one = tiny_request("wan2.1-tiny", STEPS)
    out = tmp_path_factory.mktemp("inv") / "wan-inv.yaml"
    diffcache.profile(pipe, InvarDiffConfig(nonskip_rate=0.2), prompts, request=req, out=out)
    return pipe, req, one, Plan.load(out)


def test_identity_equals_the_baseline(wan) -> None:
    pipe, req, one, plan = wan
    base = generate(pipe, one)
    cal = plan.calibration_data
    none = torch.zeros_like(cal.module_book)
    ident = dataclasses.replace(
        plan, tensors={**plan.tensors, "module_book": none, "step_book": none[:, 0]}
    )
    diffcache.accelerate(pipe, ident)
    try:
        assert (generate(pipe, one) == base).all() and diffcache.stats(pipe).skipped == 0
    finally:
        diffcache.remove(pipe)


def test_round_trip_and_deterministic_profiling(wan, tmp_path) -> None:
    pipe, req, _, plan = wan
    again = Plan.load(plan.save(tmp_path / "again.yaml"))
    first = Path(plan.source)
    assert (
        first.with_suffix(".safetensors").read_bytes()
        == (tmp_path / "again.safetensors").read_bytes()
    )
    assert first.read_text().replace(first.stem, "X") == Path(again.source).read_text().replace(
        "again", "X"
    )
    other = diffcache.profile(pipe, InvarDiffConfig(nonskip_rate=0.2), PROMPTS, request=req)
    assert all(torch.equal(other.tensors[k], plan.tensors[k]) for k in plan.tensors)


def test_a_plan_for_other_modules_is_refused(wan) -> None:
    pipe, _, _, plan = wan
    sites = list(plan.calibration["sites"])
    bad = dataclasses.replace(plan, calibration={**plan.calibration, "sites": sites[:-1]})
    with pytest.raises(PlanError, match="module sites are not this model"):
        diffcache.accelerate(pipe, bad)
    assert clean(pipe.transformer, pipe.scheduler)


def test_a_plan_for_other_module_sites_names_the_first_that_differs() -> None:
    from diffcache.methods.invardiff import InvarDiffCalibration, _check

    sites = [types.SimpleNamespace(name=n) for n in ("a.attn", "a.ff", "b.attn")]
    books = torch.zeros(2, dtype=torch.bool), torch.zeros(2, 3, dtype=torch.bool)
    cal = InvarDiffCalibration(("a.attn", "a.mlp", "b.attn"), *books)
    with pytest.raises(PlanError) as e:
        _check(cal, sites, 2)
    assert str(e.value) == (
        "invardiff: the plan's 3 module sites are not this model's 3 (site 1: a.mlp vs a.ff); "
        "profile this model"
    )


def test_books_that_do_not_fit_the_model_or_the_plan_are_refused_with_every_problem() -> None:
    """Another site count, books of the wrong shape, step 0 reused and another step count
    are all named; a single step is checked for step 0 too; empty books pass."""
    from diffcache.methods.invardiff import InvarDiffCalibration, _check

    sites = [types.SimpleNamespace(name=n) for n in ("a.attn", "a.ff")]
    step = torch.tensor([True, False])
    with pytest.raises(PlanError) as e:
        _check(
            InvarDiffCalibration(("a.attn",), step, torch.zeros(2, 1, dtype=torch.bool)), sites, 3
        )
    assert str(e.value) == (
        "invardiff: the plan's 1 module sites are not this model's 2 (count); books have shapes "
        "(2,) and (2, 1); want (T,) and (T, 2); step 0 cannot be a reused step (nothing is "
        "cached yet); the books have 2 steps but the plan is valid for 3; profile this model"
    )
    names = ("a.attn", "a.ff")
    with pytest.raises(PlanError) as e:
        _check(
            InvarDiffCalibration(names, step[:1], torch.zeros(1, 2, dtype=torch.bool)), sites, None
        )
    assert str(e.value) == (
        "invardiff: step 0 cannot be a reused step (nothing is cached yet); profile this model"
    )
    _check(InvarDiffCalibration(names, step[:0], torch.zeros(0, 2, dtype=torch.bool)), sites, None)


def test_a_plan_profiled_on_the_pipeline_runs_on_its_bare_transformer() -> None:
    """Site names do not depend on how the model was handed to accelerate."""
    plan = Plan.load("flux-tiny-invardiff.yaml")
    req, _, _ = tiny_request("flux-tiny", plan.valid_for["num_inference_steps"])
    req = req.replace(prompt="a cat")
    outs = []
    for bare in (False, True):
        pipe = diffcache.load_model("flux-tiny")
        target = pipe.transformer if bare else pipe
        diffcache.accelerate(target, plan)
        outs.append((generate(pipe, req), diffcache.stats(target).compute_fraction))
        diffcache.remove(target)
    assert (outs[0][0] == outs[1][0]).all() and outs[0][1] == outs[1][1] < 1


def test_compute_target_sets_one_quantile(wan) -> None:
    pipe, req, _, _ = wan
    plan = diffcache.profile(pipe, InvarDiffConfig(nonskip_rate=0.2), PROMPTS, request=req,
                             target_compute=0.6)  # fmt: skip
    q = plan.options["step_quantile"]
    assert set(plan.options["module_quantiles"].values()) == {q} and 0 < q <= 1
    assert plan.provenance["measured"]["compute_fraction"] < 0.75


def test_reference_wan_books_import_and_run(wan, tmp_path) -> None:
    pipe, req, one, _ = wan
    target = Target.resolve(find_adapter(pipe), pipe)
    layers = len(target.sites("block"))
    g = torch.Generator().manual_seed(0)
    book = {
        key: (torch.rand(STEPS, layers, generator=g) < 0.5).tolist()
        for key in ("self_attn", "cross_attn", "ffn")
    }
    for key in book:
        book[key][0] = [False] * layers
    steps = [False, False, True, False, False, True, False, False]
    path = tmp_path / "invardiff_t2v_stp8.json"
    path.write_text(json.dumps({"step_cache_bool": steps, "module_cache_book": book}))
    plan = import_reference_books(path, pipe, tmp_path / "imported.yaml")
    cal = plan.calibration_data
    assert cal.step_book.tolist() == steps
    col = [s.name for s in target.sites("module")].index("transformer.blocks.1.attn2")
    want = [r[1] for r in book["cross_attn"]]
    want[2] = want[5] = True  # step first: a reused step reuses every module ...
    want[3] = want[6] = False  # ... and the step after it computes them
    assert cal.module_book[:, col].tolist() == want
    diffcache.accelerate(pipe, plan)
    try:
        generate(pipe, one)
        stats = diffcache.stats(pipe)
    finally:
        diffcache.remove(pipe)
    assert cal.module_book[[2, 5]].all() and not cal.module_book[[3, 6]].any()  # step first
    computed = int((~cal.module_book).sum())
    assert stats.work["module"][0] == 2 * computed  # both CFG branches follow the book
    with pytest.raises(PlanError, match="not an InvarDiff book"):
        import_reference_books(tmp_path / "imported.yaml", pipe)
    from diffcache.cli import main

    cli = ["plans", "import", str(path), "--model", "wan2.1-tiny"]
    assert main([*cli, "--out", str(tmp_path / "cli.yaml")]) == 0
    assert Plan.load(tmp_path / "cli.yaml").calibration == plan.calibration
    assert main([*cli[:2], str(tmp_path / "none.json"), *cli[3:], "--out", "x.yaml"]) == 2


def test_reference_books_import_for_a_pipeline_variant(tmp_path, capsys, monkeypatch) -> None:
    """``plans import --model wan-tiny-i2v``: the books of the variant's base family (Wan2.1)
    make a wan2.1 plan that runs on the image-to-video pipeline, each module computed where the
    books say (a reused step reuses all, the step after computes all), in both CFG branches; a
    variant whose family has no reference books is refused before the model is built."""
    from PIL import Image

    from diffcache.generate import Request

    steps = [False, False, True, False, False, True, False, False]
    layers = len(diffcache.load_model("wan-tiny-i2v").transformer.blocks)
    books = _wan_books(layers)
    path = tmp_path / "books.json"
    path.write_text(json.dumps({"step_cache_bool": steps, "module_cache_book": books}))
    out = tmp_path / "i2v.yaml"
    cli = ["plans", "import", str(path), "--method", "invardiff", "--out", str(out)]
    assert main([*cli, "--model", "wan-tiny-i2v"]) == 0
    plan = Plan.load(out)
    assert plan.model == "wan2.1" and plan.valid_for["num_inference_steps"] == STEPS

    def reused(k: int, key: str, layer: int) -> bool:
        return steps[k] or (books[key][k][layer] and not steps[k - 1])

    computed = sum(
        not reused(k, key, layer) for k in range(STEPS) for key in books for layer in range(layers)
    )
    Image.new("RGB", (32, 32), (200, 40, 40)).save(tmp_path / "in.png")
    req = Request(prompt="a cat", image=str(tmp_path / "in.png"), steps=STEPS, height=32, width=32)
    pipe = diffcache.load_model("wan-tiny-i2v")
    diffcache.accelerate(pipe, out)
    try:
        assert np.isfinite(generate(pipe, req)).all()
        stats = diffcache.stats(pipe)
    finally:
        diffcache.remove(pipe)
    assert (stats.steps, stats.model_calls) == (STEPS, 2 * STEPS)
    assert stats.work["module"][0] == 2 * computed

    def built(name: str) -> None:
        raise AssertionError(f"{name} was built")

    monkeypatch.setattr(diffcache, "load_model", built)
    capsys.readouterr()
    assert main([*cli, "--model", "hunyuanvideo-tiny-i2v"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "diffcache: error: invardiff: no reference book layout for hunyuanvideo models "
        "(--model hunyuanvideo-tiny-i2v); known: wan2.1, flux"
    ), err


def _wan_books(layers: int, keys: tuple[str, ...] = ("self_attn", "cross_attn", "ffn")) -> dict:
    rows = [[t > 0 and (t + layer) % 2 == 0 for layer in range(layers)] for t in range(STEPS)]
    return {key: rows for key in keys}


@pytest.mark.parametrize(
    "data, match",
    [
        (
            {"module_cache_bok": _wan_books(2)},
            r"unknown section 'module_cache_bok' \(did you mean 'module_cache_book'\?\); wan2.1 "
            r"books have step_cache_bool, step_cache_book, module_cache_book\)$",
        ),
        (
            {"module_cache_book": _wan_books(2, ("self_atn", "cross_attn", "ffn"))},
            r"module_cache_book.self_atn: unknown module \(did you mean 'self_attn'\?\); wan2.1 "
            r"module_cache_book has self_attn, cross_attn, ffn\)$",
        ),
        (
            {"transformer_cache_book": {"attn": _wan_books(2)["ffn"]}},
            r"unknown section 'transformer_cache_book'",  # FLUX's books on a Wan2.1 model
        ),
        (
            {"module_cache_book": _wan_books(7)},
            r"module_cache_book.self_attn has books for 7 layers but the model has {blocks} "
            r"blocks; import books made for this model$",
        ),
    ],
    ids=["section-typo", "key-typo", "another-family", "layer-count"],
)
def test_malformed_reference_books_are_refused(tmp_path, capsys, data: dict, match: str) -> None:
    """A misspelled section or module key dropped those books silently (and still wrote the
    plan); books for another number of layers were imported onto the model."""
    blocks = len(diffcache.load_model("wan2.1-tiny").transformer.blocks)
    path = tmp_path / "books.json"
    path.write_text(json.dumps({"step_cache_bool": [False] * STEPS, **data}))
    out = tmp_path / "p.yaml"
    assert main(["plans", "import", str(path), "--model", "wan2.1-tiny", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert re.search(match.format(blocks=blocks), err), err
    assert "\n" not in err and not out.exists()
    # the metadata later reference releases write beside the books is no section
    path.write_text(json.dumps({"step_cache_bool": [False] * STEPS, "cache_version": 2,
                                "module_cache_book": _wan_books(blocks)}))  # fmt: skip
    assert main(["plans", "import", str(path), "--model", "wan2.1-tiny", "--out", str(out)]) == 0


_STEP_ROWS = "step_cache_bool / step_cache_book is not a non-empty list of 0/1 flags"
_SECTION_ROWS = (
    "module_cache_book is not an object of 0/1 lists per layer, one list per step (2 steps)"
)


@pytest.mark.parametrize(
    "text, why",
    [
        ("[]", "the top level is not an object"),
        (
            '{"step_cache_bool": [0, 0], "bogus": {}}',
            "unknown section 'bogus'; books have step_cache_bool, step_cache_book, "
            "module_cache_book, transformer_cache_book, single_transformer_cache_book",
        ),
        ('{"step_cache_bool": [false, 2]}', _STEP_ROWS),
        ('{"step_cache_bool": [false, 1.0]}', _STEP_ROWS),
        ('{"step_cache_book": []}', _STEP_ROWS),
        ('{"step_cache_bool": [0, 0], "module_cache_book": [1]}', _SECTION_ROWS),
        ('{"step_cache_bool": [0, 0], "module_cache_book": {"ffn": [[0]]}}', _SECTION_ROWS),
        ('{"step_cache_bool": [0, 0], "module_cache_book": {"ffn": [[0], [0, 1]]}}', _SECTION_ROWS),
        ('{"step_cache_bool": [0, 0], "module_cache_book": {"ffn": [[0], [2]]}}', _SECTION_ROWS),
    ],
    ids=[
        "not-object",
        "any-family",
        "flag-2",
        "flag-float",
        "no-steps",
        "section-list",
        "step-count",
        "ragged",
        "row-flag-2",
    ],  # fmt: skip
)
def test_reference_book_files_are_checked_before_any_model(tmp_path, text: str, why: str) -> None:
    """Each malformed file is refused with the whole reason; without a family the reason lists
    every family's sections and names no family."""
    path = tmp_path / "books.json"
    path.write_text(text)
    with pytest.raises(PlanError) as e:
        read_reference_books(path)
    assert str(e.value) == f"{path}: not an InvarDiff book file ({why})"


def test_a_reference_book_file_that_is_no_json_names_the_parse_error(tmp_path) -> None:
    path = tmp_path / "books.json"
    path.write_text("{")
    try:
        json.loads("{")
    except ValueError as parse:
        why = f"JSONDecodeError: {parse}"
    with pytest.raises(PlanError) as e:
        read_reference_books(path)
    assert str(e.value) == f"{path}: not an InvarDiff book file ({why})"


def test_reference_flux_books_map_both_stacks(tmp_path) -> None:
    pipe = diffcache.load_model("flux-tiny")
    target = Target.resolve(find_adapter(pipe), pipe)
    double, single = (
        len(pipe.transformer.transformer_blocks),
        len(pipe.transformer.single_transformer_blocks),
    )
    rows = STEPS

    def book(layers: int, every: int) -> list[list[bool]]:
        return [
            [t > 0 and (t + layer) % every == 0 for layer in range(layers)] for t in range(rows)
        ]

    data = {
        "step_cache_book": [False] * rows,
        "transformer_cache_book": {
            "attn": book(double, 2), "context_attn": book(double, 4), "ip_attn": book(double, 1),
            "ff": book(double, 3), "context_ff": book(double, 5),
        },
        "single_transformer_cache_book": {"attn": book(single, 2), "mlp": book(single, 3)},
    }  # fmt: skip
    path = tmp_path / "cache_books_stp8.json"
    path.write_text(json.dumps(data))
    cal = import_reference_books(path, pipe).calibration_data
    names = [s.name for s in target.sites("module")]

    def column(name: str) -> list[bool]:
        return cal.module_book[:, names.index(name)].tolist()

    both = [a and c for a, c in zip(book(double, 2), book(double, 4), strict=True)]
    assert column("transformer.transformer_blocks.0.attn") == [r[0] for r in both]
    assert column("transformer.transformer_blocks.0.ff_context") == [r[0] for r in book(double, 5)]
    last = f"transformer.single_transformer_blocks.{single - 1}.proj_mlp"
    assert column(last) == [r[single - 1] for r in book(single, 3)]


def test_imported_books_plan_only_what_they_book(tmp_path) -> None:
    """A module key the file leaves out is always computed; the first step is never reused
    (nothing is cached before it); the plan is valid for the book's step count and the
    pipeline's scheduler, says which file it came from, and carries placeholder scores (ones)
    of the calibration's shapes."""
    pipe = diffcache.load_model("wan2.1-tiny")
    target = Target.resolve(find_adapter(pipe), pipe)
    names = [s.name for s in target.sites("module")]
    ffn = _wan_books(len(target.sites("block")))["ffn"]
    steps = [True, True, False, False, True, False, False, False]
    path = tmp_path / "books.json"
    path.write_text(json.dumps({"step_cache_bool": steps, "module_cache_book": {"ffn": ffn}}))
    plan = import_reference_books(path, pipe)
    cal = plan.calibration_data
    reused_steps = [False, True, False, False, True, False, False, False]
    assert cal.step_book.tolist() == reused_steps
    for m, name in enumerate(names):
        block, attr = int(name.split(".")[2]), name.rsplit(".", 1)[1]
        booked = [row[block] for row in ffn] if attr == "ffn" else [False] * STEPS
        # step first: a reused step (1, 4) reuses every module, the step after computes them
        want = [r in (1, 4) or (booked[r] and r not in (2, 5)) for r in range(STEPS)]
        assert cal.module_book[:, m].tolist() == want, name
    assert dict(plan.valid_for) == {
        "num_inference_steps": STEPS,
        "scheduler": "UniPCMultistepScheduler",
        "fingerprint": plan.valid_for[
            "fingerprint"
        ],  # the model's (MethodConfig.as_plan's own rule)
    }
    assert plan.provenance == {"imported_from": "books.json"}
    assert cal.step_scores.tolist() == [1.0] * STEPS
    assert cal.module_scores.tolist() == [[1.0] * len(names)] * STEPS


def test_imported_books_reuse_the_last_steps_as_booked(tmp_path) -> None:
    """A reused last step reuses every module; a reused step before it makes the last step
    compute every module, even where the file books them reused."""
    pipe = diffcache.load_model("wan2.1-tiny")
    layers = len(Target.resolve(find_adapter(pipe), pipe).sites("block"))
    every = [[True] * layers] * STEPS
    cases = [(STEPS - 1, [[False] * layers] * STEPS), (STEPS - 2, every)]
    for reused, booked in cases:
        path = tmp_path / "books.json"
        steps = [t == reused for t in range(STEPS)]
        path.write_text(
            json.dumps({"step_cache_bool": steps, "module_cache_book": {"ffn": booked}})
        )
        cal = import_reference_books(path, pipe).calibration_data
        for m, name in enumerate(cal.sites):
            ffn = name.endswith(".ffn") and reused == STEPS - 2
            want = [t == reused or (ffn and t < reused) for t in range(STEPS)]
            assert cal.module_book[:, m].tolist() == want, (reused, name)


def test_imported_flux_attention_is_reused_where_context_attention_is_too(tmp_path) -> None:
    """``attn`` and ``context_attn`` books that are no subset of each other: the attention
    site is reused where both are; a section the file leaves out is always computed."""
    pipe = diffcache.load_model("flux-tiny")
    target = Target.resolve(find_adapter(pipe), pipe)
    double = len(pipe.transformer.transformer_blocks)

    def book(every: int) -> list[list[bool]]:
        return [[t > 0 and (t + layer) % every == 0 for layer in range(double)] for t in range(8)]

    path = tmp_path / "books.json"
    path.write_text(json.dumps({"step_cache_book": [False] * 8, "transformer_cache_book": {
        "attn": book(2), "context_attn": book(3)}}))  # fmt: skip
    cal = import_reference_books(path, pipe).calibration_data
    for m, site in enumerate(target.sites("module")):
        every_sixth = site.stack.attr == "transformer_blocks" and site.name.endswith(".attn")
        want = [every_sixth and t > 0 and (t + site.index) % 6 == 0 for t in range(8)]
        assert cal.module_book[:, m].tolist() == want, site.name


def test_books_are_imported_only_for_a_family_with_a_reference_layout(tmp_path) -> None:
    """Called directly (not through ``plans import``, which checks the file first), the file is
    read for the model's family: FLUX's sections are refused on a Wan2.1 model."""
    path = tmp_path / "books.json"
    path.write_text(json.dumps({"step_cache_book": [False, False]}))
    with pytest.raises(DiffCacheError) as e:
        import_reference_books(path, diffcache.load_model("dit-tiny"))
    assert str(e.value) == "invardiff: no reference book layout for dit models; known: wan2.1, flux"
    path.write_text(json.dumps({"step_cache_book": [0, 0], "transformer_cache_book": {}}))
    with pytest.raises(PlanError) as e:
        import_reference_books(path, diffcache.load_model("wan2.1-tiny"))
    assert str(e.value) == (
        f"{path}: not an InvarDiff book file (unknown section 'transformer_cache_book' (did you "
        "mean 'step_cache_book'?); wan2.1 books have step_cache_bool, step_cache_book, "
        "module_cache_book)"
    )


#: families whose blocks are described (``diffcache.gated.describe``): a block whose every module is
#: reused is skipped as input + gated cached outputs (FLUX's and HunyuanVideo's single-stream
#: blocks gate ``proj_out`` of their concatenated outputs, so they keep running)
GATED = [
    "wan2.1-tiny",
    "flux-tiny",
    "hunyuanvideo-tiny",
    "qwenimage-tiny",
    "cogvideox-tiny",
    "dit-tiny",
]


@pytest.mark.parametrize("model", GATED)
def test_a_block_whose_modules_are_all_reused_is_skipped_exactly(model: str) -> None:
    from diffcache.methods import invardiff

    pipe = diffcache.load_model(model)
    req, prompts, one = tiny_request(model, STEPS)
    quantiles = dict.fromkeys(invardiff.ROLE_DEFAULTS, 0.8)
    cfg = InvarDiffConfig(nonskip_rate=0.2, step_quantile=0.0, module_quantiles=quantiles)
    plan = diffcache.profile(pipe, cfg, prompts, request=req)
    cal = plan.calibration_data
    target = Target.resolve(find_adapter(pipe), pipe)
    columns = {s.name: m for m, s in enumerate(target.sites("module"))}
    fused = 0  # (step, block) pairs whose every module is planned reused
    for b in target.sites("block"):
        if type(b.module).__name__ not in DESCRIBED:
            continue
        cols = [c for name, c in columns.items() if name.startswith(b.name + ".")]
        fused += int(cal.module_book[:, cols].all(1).sum())
    assert fused > 0 and not cal.step_book.any()
    runs = {}
    for fuse in (False, True):
        diffcache.accelerate(
            pipe, dataclasses.replace(plan, options={**plan.options, "fuse_blocks": fuse})
        )
        try:
            runs[fuse] = generate(pipe, one), diffcache.stats(pipe)
        finally:
            diffcache.remove(pipe)
    (plain, plain_stats), (skipped, stats) = runs[False], runs[True]
    assert torch.equal(torch.as_tensor(skipped), torch.as_tensor(plain))  # bit for bit
    assert stats.work["module"] == plain_stats.work["module"]  # the plan's module work
    branches = stats.work["module"][1] / cal.module_book.numel()
    done, total = stats.work["block"]
    assert total - done == branches * fused and "block" not in plain_stats.work
    assert stats.kernels["gated_apply"] in ("torch", "triton")
    assert clean(pipe.transformer)


# ---------------------------------------------------------------------------------------------
# reference tests (issue 21): the runtime rule written out here, compared step by step
#
# The rule (paper §3.3, zihaowu25/InvarDiff's cached forward): at a step the step book marks,
# every block but the last returns its input and the last returns its output of the last
# computed step; otherwise each module the module book marks for that step returns its raw
# output of the last step it was computed at (a reused or skipped step refreshes nothing), and
# every other module computes. The trace names the book entry and the calibration score behind
# each call.

TOY_GAINS = {"attn": (0.5, -0.25), "ff": (0.5, -0.25)}  # ToyBlock k scales by 0.5, then -0.25


def _toy_plan(step_book: list[int], module_book: list[list[int]], sites: list[str]) -> Plan:
    steps = len(step_book)
    return Plan(
        model="toy",
        method="invardiff",
        options={},
        calibration={"sites": sites},
        tensors={
            "step_book": torch.tensor(step_book, dtype=torch.bool),
            "module_book": torch.tensor(module_book, dtype=torch.bool),
            "step_scores": torch.arange(steps, dtype=torch.float32) / 4 + 0.5,
            "module_scores": torch.arange(steps * len(sites), dtype=torch.float32).reshape(
                steps, len(sites)
            )
            / 8,
        },
    )


def _plain_toy(xs: list[float], step_book: list[int], module_book: list[list[int]]) -> tuple:
    """The toy denoiser ``2 h + 1`` after two blocks ``h + attn(h) + ff(h)`` under the rule:
    its output per step and each call's action, keyed (step, site)."""
    cache: dict[str, float] = {}
    last: float | None = None
    outputs, actions = [], {}
    for t, x in enumerate(xs):
        if step_book[t] and last is not None:
            outputs.append(2 * last + 1)
            actions.update({(t, f"transformer.blocks.{b}"): "reused" for b in (0, 1)})
            continue
        h = x
        for b in (0, 1):
            parts = []
            for j, kind in enumerate(("attn", "ff")):
                name = f"transformer.blocks.{b}.{kind}"
                reuse = bool(module_book[t][2 * b + j]) and name in cache
                if not reuse:
                    cache[name] = TOY_GAINS[kind][b] * h
                actions[t, name] = "reused" if reuse else "computed"
                parts.append(cache[name])
            h = h + sum(parts)
            actions[t, f"transformer.blocks.{b}"] = "computed"
        last = h
        outputs.append(2 * h + 1)
    return outputs, actions


def _decisions(trace: list[dict]) -> dict:
    return {(e["step"], e["site"]): e for e in trace}


def test_toy_calls_follow_the_books_and_reuse_the_last_computed_values() -> None:
    """Scripted latents ``x_t = t² + 1`` (exact arithmetic): each step's denoiser output equals
    the plain rule's, and each call's traced action, book entry and score are the plan's.
    Module reuse reaches back over a reused step (step 7's ``blocks.1.attn`` comes from step 5)."""
    from diffcache.testing.toys import ToyPipeline

    steps, dims = 8, 2
    xs = [float(t * t + 1) for t in range(steps)]
    sites = [f"transformer.blocks.{b}.{k}" for b in (0, 1) for k in ("attn", "ff")]
    step_book = [0, 0, 0, 1, 0, 0, 1, 0]
    module_book = [[0, 0, 0, 0], [1, 0, 1, 0], [0, 1, 0, 1], [1, 1, 1, 1],
                   [0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 1, 1]]  # fmt: skip
    plan = _toy_plan(step_book, module_book, sites)
    want, actions = _plain_toy(xs, step_book, module_book)
    assert want[3] == want[2] != want[4] and len(set(want)) == steps - 2  # reuse shows
    pipe = ToyPipeline(cfg="none", script=[torch.full((1, 2, dims), x) for x in xs])
    diffcache.accelerate(pipe, plan, trace=True)
    try:
        pipe(torch.full((1, 2, dims), xs[0]), steps=steps)
        trace = diffcache.stats(pipe).trace
    finally:
        diffcache.remove(pipe)
    assert [o.flatten().tolist() for o in pipe.scheduler.outputs] == [[w] * 2 * dims for w in want]
    got = _decisions(trace)
    assert {k: e["action"] for k, e in got.items()} == actions and len(got) == len(trace)
    scores = plan.tensors["module_scores"].tolist()
    for (t, site), e in got.items():
        if site in sites:
            m = sites.index(site)
            assert e["values"] == {"book": bool(module_book[t][m]), "score": scores[t][m]}, e
        else:
            assert e["values"] == {"book": bool(step_book[t]), "score": t / 4 + 0.5}, e


def _plain_replay(pipe, one, cal) -> tuple:
    """``one`` generated with the rule applied by wrapping the DiT's own block and module
    forwards (no diffcache layer): the output, each call's action keyed (step, site) and the
    (step, block) pairs whose every module was reused."""
    import functools

    tr = pipe.transformer
    blocks = list(tr.transformer_blocks)
    sites, step_book, module_book = list(cal.sites), cal.step_book, cal.module_book
    step, cache, last = [-1], {}, {}
    actions: dict = {}

    def module(name, original, *args, **kwargs):
        t, m = step[0], sites.index(name)
        reuse = bool(module_book[t, m]) and name in cache
        if not reuse:
            cache[name] = original(*args, **kwargs)
        actions[t, name] = "reused" if reuse else "computed"
        return cache[name]

    def block(index, original, *args, **kwargs):
        t, name = step[0], f"transformer.transformer_blocks.{index}"
        is_last = index == len(blocks) - 1
        if bool(step_book[t]) and not (is_last and "out" not in last):
            actions[t, name] = "reused"
            return last["out"] if is_last else (args[0] if args else kwargs["hidden_states"])
        cols = [sites.index(s) for s in sites if s.startswith(name + ".")]
        fused = bool(module_book[t, cols].all()) and all(sites[c] in cache for c in cols)
        out = original(*args, **kwargs)
        actions[t, name] = ("reused", True) if fused else "computed"
        for c in cols if fused else ():  # the method skips a fused block: no module calls
            del actions[t, sites[c]]
        if is_last:
            last["out"] = out
        return out

    def count(*_):
        step[0] += 1

    wrapped = []
    for index, b in enumerate(blocks):
        b.forward = functools.partial(block, index, b.forward)
        wrapped.append(b)
        for kind in ("attn1", "ff"):
            mod = getattr(b, kind)
            name = f"transformer.transformer_blocks.{index}.{kind}"
            mod.forward = functools.partial(module, name, mod.forward)
            wrapped.append(mod)
    hook = tr.register_forward_pre_hook(count)
    try:
        out = generate(pipe, one)
    finally:
        hook.remove()
        for mod in wrapped:
            del mod.forward
    return out, actions


def test_dit_tiny_bundled_plan_follows_its_books_step_by_step() -> None:
    """dit-tiny with its bundled plan (reused steps 9-14, blocks whose every module is reused
    at steps 2, 3, 5, 6): each call's traced action, book entry and score are the plan's, the
    fused blocks are exactly those, and the output equals a plain replay of the rule on the
    model's own forwards bit for bit (so every reused value is the one the rule names)."""
    plan = Plan.load("dit-tiny-invardiff.yaml")
    cal = plan.calibration_data
    pipe = diffcache.load_model("dit-tiny")
    req, _, one = tiny_request("dit-tiny", plan.valid_for["num_inference_steps"])
    want, actions = _plain_replay(pipe, one, cal)
    assert clean(pipe.transformer)
    diffcache.accelerate(pipe, plan, trace=True)
    try:
        got = generate(pipe, one)
        trace = diffcache.stats(pipe).trace
    finally:
        diffcache.remove(pipe)
    assert np.array_equal(got, want) and not np.array_equal(got, generate(pipe, one))
    assert any(a == ("reused", True) for a in actions.values())  # fused blocks happen
    assert {e["branch"] for e in trace} == {0} and len(_decisions(trace)) == len(trace)
    decisions = {
        k: (e["action"], True) if e["values"].get("fused") else e["action"]
        for k, e in _decisions(trace).items()
    }
    assert decisions == actions
    sites = list(cal.sites)
    step_scores, module_scores = cal.step_scores.tolist(), cal.module_scores.tolist()
    for (t, site), e in _decisions(trace).items():
        if site in sites:
            m = sites.index(site)
            want_values = {"book": bool(cal.module_book[t, m]), "score": module_scores[t][m]}
        else:
            want_values = {"book": bool(cal.step_book[t]), "score": step_scores[t]}
            if decisions[t, site] == ("reused", True):
                want_values["fused"] = True
        assert e["values"] == want_values, e


def test_a_block_booked_fused_before_its_modules_ran_computes_them() -> None:
    """Books may reuse every module of a block at step 0 (imported books are not checked for
    it): nothing is cached yet, so the block and its modules compute, and the run equals the
    same plan with row 0 computing."""
    plan = Plan.load("dit-tiny-invardiff.yaml")
    module_book = plan.tensors["module_book"].clone()
    assert not module_book[0].any()
    module_book[0] = True
    early = dataclasses.replace(plan, tensors={**plan.tensors, "module_book": module_book})
    pipe = diffcache.load_model("dit-tiny")
    _, _, one = tiny_request("dit-tiny", plan.valid_for["num_inference_steps"])
    outs = []
    for p in (plan, early):
        diffcache.accelerate(pipe, p)
        try:
            outs.append(generate(pipe, one))
        finally:
            diffcache.remove(pipe)
    assert np.array_equal(outs[0], outs[1])


def test_a_plan_valid_for_another_step_count_than_its_books_is_refused_at_accelerate() -> None:
    plan = Plan.load("dit-tiny-invardiff.yaml")
    steps = plan.valid_for["num_inference_steps"]
    assert plan.tensors["step_book"].shape == (steps,)
    other = dataclasses.replace(
        plan, valid_for={**plan.valid_for, "num_inference_steps": steps + 1}
    )
    pipe = diffcache.load_model("dit-tiny")
    with pytest.raises(PlanError) as e:
        diffcache.accelerate(pipe, other)
    assert str(e.value) == (
        f"invardiff: the books have {steps} steps but the plan is valid for {steps + 1}; "
        "profile this model"
    )
    assert clean(pipe.transformer)


def test_a_reused_step_hands_the_head_the_last_blocks_output_of_the_step_before() -> None:
    """flux-tiny (three blocks: one double, two single): with every module computed and only
    step 3 reused, the output head's input at step 3 is the one it had at step 2 of the plain
    run, which is the last single block's output (not an earlier block's)."""
    plan = Plan.load("flux-tiny-invardiff.yaml")
    steps = plan.valid_for["num_inference_steps"]
    step_book = torch.zeros(steps, dtype=torch.bool)
    step_book[3] = True
    tensors = {**plan.tensors, "step_book": step_book}
    tensors["module_book"] = torch.zeros_like(plan.tensors["module_book"])
    pipe = diffcache.load_model("flux-tiny")
    req, _, _ = tiny_request("flux-tiny", steps)
    req = req.replace(prompt="a cat")
    heads: list[torch.Tensor] = []
    hook = pipe.transformer.norm_out.register_forward_pre_hook(
        lambda _, args: heads.append(args[0].clone())
    )
    try:
        generate(pipe, req)
        plain = heads[:]
        heads.clear()
        diffcache.accelerate(pipe, dataclasses.replace(plan, tensors=tensors))
        try:
            generate(pipe, req)
        finally:
            diffcache.remove(pipe)
    finally:
        hook.remove()
    assert len(heads) == len(plain) == steps
    assert torch.equal(heads[3], plain[2]) and not torch.equal(plain[3], plain[2])
    assert all(torch.equal(heads[t], plain[t]) for t in range(3))
