"""Profiling the next-scale KV methods on var-digits (scales 1-2-3-4-6-8: 66 tokens before the
last scale; 4 layers x 4 heads): the HACK calibrator's head statistic and classes against
diffcache.kv.head_stats on tensors captured by an independent store, ``--target-kv`` budgets
against the plain run's own history bytes, and the refusals (one line, exit 2, nothing built)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import diffcache
from diffcache.adapter import Target
from diffcache.cli import main
from diffcache.errors import DiffCacheError
from diffcache.generate import Request, expand, generate
from diffcache.kv.head_stats import (
    classify_heads,
    drafters,
    selectivity_table,
    variance_table,
    zscore,
)
from diffcache.kv.history import FullHistory, ScaleCall
from diffcache.kv.memory import Geometry
from diffcache.kv.recorder import HistoryRecorder
from diffcache.methods.hack import HACKConfig
from diffcache.methods.hack_calibrate import ALPHA, last_scale_variance
from diffcache.methods.scalekv import ScaleKVConfig
from diffcache.methods.scalekv_calibrate import DRAFTERS, TOP_K
from diffcache.models import builtin_models, load_model
from diffcache.plan import Plan
from diffcache.profile import record_trace
from diffcache.profiles import bundled_plans
from diffcache.profiles.make import KV_PLANS, make
from diffcache.registry import find_adapter, get_method

LABELS = ["1", "7"]
HACK_FITS = {"recent_cap": 8}  # at 30% the structural heads cannot keep the whole 4x4 map


@pytest.fixture(scope="module")
def pipe() -> Any:
    return load_model("var-digits")


def _requests(pipe: Any) -> list[Request]:
    request = Request(seed=0).merged(builtin_models()["var-digits"].defaults)
    return expand(find_adapter(pipe), LABELS, 1, request)


class _Capture(FullHistory):
    """The plain store, keeping each last-scale call's q and whole key set."""

    def __init__(self, seen: list, every_scale: bool = False) -> None:
        super().__init__()
        self.seen, self.every_scale = seen, every_scale

    def attend(self, call: ScaleCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        out = super().attend(call, q, k, v)
        keys = self.k[call.layer].clone()
        if self.every_scale:
            self.seen.append((call.layer, call.si, q.clone(), keys, call.scale))
        elif call.si == len(call.schedule) - 1:
            self.seen.append((call.layer, q.clone(), keys, call.scale))
        return out


def _captured(pipe: Any) -> torch.Tensor:
    """variance_table of each generation's last scale, summed over the generations, on the
    tensors ``_Capture`` kept."""
    seen: list = []
    pipe.history_store = lambda: _Capture(seen)
    try:
        for req in _requests(pipe):
            generate(pipe, req)
    finally:
        del pipe.history_store
    layers = max(layer for layer, *_ in seen) + 1
    table = torch.zeros(layers, seen[0][1].shape[1], dtype=torch.float64)
    for i in range(0, len(seen), layers):  # one generation: every layer in order
        group = seen[i : i + layers]
        assert [layer for layer, *_ in group] == list(range(layers))
        table += variance_table([(q, k) for _, q, k, _ in group], group[0][3])
    return table


def test_recorder_sums_the_head_variance_of_the_captured_tensors(pipe: Any) -> None:
    expected = _captured(pipe)
    target = Target.resolve(find_adapter(pipe), pipe)
    recorder = HistoryRecorder("hack", last_scale_variance)
    trace, _, _ = record_trace(pipe, target, None, _requests(pipe), False, recorder)
    got = trace.observed["sums"]
    assert got.shape == expected.shape == (4, 4)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=0)
    assert recorder.calls == 2 * 6 * 4  # generations x scales x layers


def test_hack_profile_classifies_the_heads_as_head_stats_does(pipe: Any) -> None:
    expected = _captured(pipe)
    plan = diffcache.profile(
        pipe,
        HACKConfig(**HACK_FITS),
        LABELS,
        target_kv=0.3,
        request=Request(seed=0),
    )
    classes = torch.tensor(plan.calibration["classes"])
    assert torch.equal(classes, classify_heads(expected, ALPHA))
    measured = plan.provenance["measured"]
    assert measured["contextual_heads"] == round(ALPHA * 16) == int((classes == 0).sum())
    assert measured["calibration_generations"] == len(LABELS)


def _kept_fraction(pipe: Any, plan: Any) -> tuple[float, int]:
    """The history KV before the last scale with ``plan``, over the plain run's (measured by
    each store), and the rows the plain history holds there."""
    req = _requests(pipe)[0]
    generate(pipe, req)
    full = pipe.last_history.history_nbytes()  # the plain store after the last scale
    schedule = pipe.schedule
    history = schedule.start(len(schedule) - 1)  # rows before the last scale (66)
    plain_last = full * history // schedule.total  # every layer holds the same rows
    diffcache.accelerate(pipe, plan)
    try:
        generate(pipe, req)
        kept = diffcache.stats(pipe).kv_history_bytes[-1]
    finally:
        diffcache.remove(pipe)
    return kept / plain_last, history


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("hack", HACK_FITS),
        ("h2o", {}),
        ("snapkv", {"window": 4}),
        ("streaming", {}),
        ("pyramidkv", {"window": 4}),
    ],
)
def test_target_kv_keeps_that_fraction_of_the_history_within_a_token(
    pipe: Any, method: str, options: dict[str, Any]
) -> None:
    config = get_method(method)[0].from_options(options)
    target = 0.3
    plan = diffcache.profile(pipe, config, LABELS[:1], target_kv=target, request=Request(seed=0))
    kept, history = _kept_fraction(pipe, plan)
    assert abs(kept - target) <= 1 / history
    assert plan.provenance["measured"]["kv_history_fraction"] == pytest.approx(kept, abs=1e-6)
    assert plan.provenance["target_kv"] == target


def test_scalekv_profile_budgets_are_eq4_on_the_roles_of_the_recorded_asi(pipe: Any) -> None:
    """Eq. 4 holds at every compression, the roles are those of the ASI of captured tensors,
    and the history KV is what diffcache.kv.memory's arithmetic gives for these budgets: at
    most the target (a drafter that was a refiner before holds fewer rows than its budget)."""
    seen: list = []
    pipe.history_store = lambda: _Capture(seen, every_scale=True)
    try:
        generate(pipe, _requests(pipe)[0])
    finally:
        del pipe.history_store
    schedule = pipe.schedule
    maps = {(layer, si): (q, k) for layer, si, q, k, _ in seen}
    asi, _ = selectivity_table(maps, schedule, TOP_K)
    config = ScaleKVConfig(window=4)
    plan = diffcache.profile(pipe, config, LABELS[:1], target_kv=0.3, request=Request(seed=0))
    scales = plan.options["scales"]
    average = int(0.3 * schedule.start(len(schedule) - 1))
    assert plan.provenance["measured"]["average"] == average
    roles = drafters(zscore(asi[:, 1:]), round(DRAFTERS * asi[:, 1:].numel()))
    for k, s in enumerate(scales):
        assert s["after_scale"] == k
        assert s["roles"] == "".join("D" if d else "R" for d in roles[:, k].tolist())
        n_d = s["roles"].count("D")
        assert n_d * s["drafter"] + (4 - n_d) * s["refiner"] == 4 * average
    assert [s["refiner"] for s in scales] == sorted((s["refiner"] for s in scales), reverse=True)

    def budget(si: int, layer: int) -> int | None:
        if si == len(schedule) - 1 or schedule.start(si + 1) <= average:
            return None  # no compression after the last scale, nor before the cache exceeds
        return scales[si]["drafter" if scales[si]["roles"][layer] == "D" else "refiner"]

    geometry = Geometry(4, 4, 16, schedule, 4)
    expected = geometry.history_before(budget)[-1] / geometry.history_before()[-1]
    kept, history = _kept_fraction(pipe, plan)
    assert kept == pytest.approx(expected, abs=1e-12)
    assert kept <= 0.3 + 1 / history


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (HACKConfig(), "budget_structural=20 is below the 21 rows structural heads must keep"),
        (ScaleKVConfig(window=25), "below the 25-token observation window"),
    ],
)
def test_a_budget_that_does_not_fit_is_refused_before_any_generation(
    pipe: Any, config: Any, message: str, monkeypatch
) -> None:
    profiling = sys.modules["diffcache.profile"]  # the module: diffcache.profile is the function
    monkeypatch.setattr(profiling, "generate", lambda *a: pytest.fail("generated"))
    with pytest.raises(DiffCacheError, match=message):
        diffcache.profile(pipe, config, LABELS, target_kv=0.3)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "hack", "--target-kv", "0"], "--target-kv must be in (0, 1], got 0.0"),
        (["--method", "h2o", "--target-kv", "1.5"], "--target-kv must be in (0, 1], got 1.5"),
        (
            ["--method", "easycache", "--target-kv", "0.3"],
            "--target-kv sets the history KV budget of h2o, hack, pyramidkv, scalekv, snapkv, "
            "streaming; --method easycache has none",
        ),
    ],
)
def test_bad_target_kv_is_one_line_before_any_model(
    argv: list[str], message: str, tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.setattr(diffcache, "load_model", lambda *a, **k: pytest.fail("model built"))
    out = str(tmp_path / "p.yaml")
    assert main(["profile", "--model", "var-digits", *argv, "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"diffcache: error: {message}"]


@pytest.mark.parametrize("name", KV_PLANS)
def test_make_rewrites_the_var_digits_kv_plans_byte_for_byte(name: str, tmp_path: Path) -> None:
    model, method, options, target, inputs, seed = KV_PLANS[name]
    new = make(name, tmp_path)
    old = bundled_plans()[name]
    assert new.read_text() == old.read_text()
    plan = Plan.load(name)
    assert (plan.method, plan.provenance["seeds"], plan.provenance["target_kv"]) == (
        method,
        [seed],
        target,
    )
    assert all(plan.options[k] == v for k, v in options.items())
    digest = hashlib.sha256("\n".join(inputs()).encode()).hexdigest()
    assert plan.provenance["prompts_sha256"] == digest
    assert plan.provenance["measured"]["kv_history_fraction"] <= target + 1 / 66


def test_cli_profile_var_digits_starts_from_its_bundled_plan_without_a_step_count(
    tmp_path: Path, capsys
) -> None:
    """var models take no --steps: the bundled var-digits-hack.yaml's options are the start,
    its recorded scale count is not turned into a --steps the family refuses."""
    out = tmp_path / "hack.yaml"
    argv = ["profile", "--model", "var-digits", "--method", "hack", "--num-prompts", "10"]
    assert main([*argv, "--target-kv", "0.3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "history KV before the last scale: 0.3030 of the plain model's (measured)" in printed
    plan = Plan.load(out)
    assert plan.options["recent_cap"] == Plan.load("var-digits-hack.yaml").options["recent_cap"]
    assert plan.calibration == Plan.load("var-digits-hack.yaml").calibration
