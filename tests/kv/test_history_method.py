"""The method side of the next-scale KV store on synthetic q/k/v: what a metered generation
reports to the run's Stats (bytes, MACs, geometry) against the memory arithmetic, and the budget
options' refusal (research/var.md §2.1.8, §3.2 item 10)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import diffcache
from diffcache.adapter import Capabilities
from diffcache.errors import PlanError, UnsupportedModelError
from diffcache.kv import ScaleCall, Schedule
from diffcache.kv.baselines import UniformSelection
from diffcache.kv.budget import BudgetedHistory
from diffcache.kv.history_method import (
    KeepAll,
    MeteredHistory,
    _Generations,
    attach_selection,
    history_seam,
    target_shape,
    token_budget,
)
from diffcache.kv.memory import Geometry
from diffcache.pipelines.var import build_tiny
from diffcache.runstate import RunState

SCHED = Schedule.square((1, 2, 3, 4, 5))


def metered(check=lambda schedule: None) -> MeteredHistory:
    return MeteredHistory(BudgetedHistory(KeepAll()), RunState("h2o", kind="attn_pair"), check)


def sweep(store: MeteredHistory, geo: Geometry, scales: int | None = None) -> None:
    """Every layer of ``geo`` at each of its first ``scales`` scales (K fp32, V fp16)."""
    g = torch.Generator().manual_seed(0)
    for si in range(len(geo.schedule) if scales is None else scales):
        shape = (geo.rows, geo.heads, geo.schedule.tokens(si), geo.head_dim)
        for layer in range(geo.layers):
            q, k = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
            store.attend(ScaleCall(layer, si, geo.schedule, 1), q, k, torch.randn(shape).half())


@pytest.mark.parametrize("layers", [1, 3])
def test_a_generation_reports_the_geometry_and_the_arithmetic_of_its_model(layers):
    """The keep-all store's report is the plain cache's arithmetic: the geometry it read from
    the calls (every layer of the first sweep), history bytes, the sweep peak, the MACs."""
    geo = Geometry(layers, 2, 4, SCHED, rows=2, k_bytes=4, v_bytes=2)
    store = metered()
    sweep(store, geo)
    store.report()
    stats = store.run.stats
    assert stats.kv_geometry == {
        "layers": layers,
        "heads": 2,
        "head_dim": 4,
        "k_bytes": 4,
        "v_bytes": 2,
        "schedule": [[s, s] for s in (1, 2, 3, 4, 5)],
        "rows": 2,
    }
    assert Geometry.of(stats.kv_geometry) == geo
    assert stats.kv_history_bytes == geo.history_before()
    assert stats.kv_bytes_peak == geo.sweep_peak()
    assert stats.kv_attn_macs == geo.attention_macs()
    plain = sum(2 * 2 * SCHED.tokens(si) * SCHED.start(si + 1) * layers for si in range(5))
    assert stats.work["attn_pair"] == [plain, plain]


def test_a_generation_stopped_after_two_scales_reports_nothing_for_the_others():
    """A generation that ends early (an error at scale 2) reports the bytes and MACs of the
    scales it ran and 0 for the rest of its schedule."""
    geo = Geometry(3, 2, 4, SCHED, rows=2, k_bytes=4, v_bytes=2)
    store = metered()
    sweep(store, geo, scales=2)
    store.report()
    stats = store.run.stats
    assert stats.kv_history_bytes == geo.history_before()[:2] + [0, 0, 0]
    assert stats.kv_attn_macs == geo.attention_macs()[:2] + [0, 0, 0]


def test_a_generation_refused_at_its_first_attention_reports_empty_stats():
    """The pipeline reports in ``end_run`` (a ``finally``) even when the store refused the
    generation's schedule before attending: the refusal propagates, the report is empty."""

    def refuse(schedule):
        raise PlanError("p.yaml: budget too large")

    store = metered(refuse)
    with pytest.raises(PlanError, match="budget too large"):
        sweep(store, Geometry(3, 2, 4, SCHED, rows=2))
    store.report()
    stats = store.run.stats
    assert (stats.kv_history_bytes, stats.kv_attn_macs, stats.kv_geometry) == ([], [], {})
    assert stats.kv_bytes_peak == 0


def test_budget_and_ratio_together_are_refused():
    with pytest.raises(PlanError, match=r"^give budget \(5\) or ratio \(0.5\), not both$"):
        token_budget(5, 0.5, SCHED)
    assert token_budget(None, 0.5, SCHED) == int(0.5 * 30) == 15  # of the 30 before scale 4
    assert token_budget(None, 0.01, SCHED) == 1
    assert token_budget(7, None, SCHED) == 7 and token_budget(None, None, SCHED) is None


def _session(kv=None, kernels="auto", store=""):
    """The parts of a session the method side reads before attaching anything."""
    adapter = SimpleNamespace(name="dit-tiny", kv=kv, provides=Capabilities(kv_store=store))
    run = RunState("h2o", kind="attn_pair", kernels=kernels)
    return SimpleNamespace(target=SimpleNamespace(adapter=adapter), run=run, calibration=None)


def test_a_model_without_a_history_store_is_refused_naming_what_it_declares():
    with pytest.raises(UnsupportedModelError) as err:
        history_seam(_session(), "h2o")
    assert str(err.value) == (
        "h2o needs a model with a history KV store (Adapter.kv, provides.kv_store='history'); "
        "dit-tiny declares none"
    )
    rows = SimpleNamespace(policy="cache_policy")
    with pytest.raises(UnsupportedModelError, match=r"; dit-tiny declares a position store$"):
        history_seam(_session(rows, store="position"), "h2o")
    with pytest.raises(UnsupportedModelError, match=r"^scalekv needs a model with a history"):
        config = SimpleNamespace(name="scalekv", make=lambda calibration, *shape: None)
        attach_selection(_session(), config)
    history = SimpleNamespace(policy="history_store")
    assert history_seam(_session(history, store="history"), "h2o") == "history_store"


def test_each_generation_store_runs_the_plan_kernel_backend():
    session = _session(kernels="torch")
    store = _Generations(session, KeepAll, lambda schedule: None).new_store(lambda: None)
    assert store.store.kernels == "torch"


def test_the_model_shape_follows_the_default_request_where_the_schedule_does():
    """VAR has one schedule; Infinity's follows the image size: its default (None, None)."""
    config = SimpleNamespace(depth=3, num_heads=2)
    sizes = {(None, None): SCHED}

    def schedule(height, width):
        return sizes[height, width]

    for pipe_schedule in (SCHED, schedule):
        target = SimpleNamespace(
            denoiser=SimpleNamespace(config=config), pipe=SimpleNamespace(schedule=pipe_schedule)
        )
        assert target_shape(target) == (SCHED, 3, 2)


def test_a_new_schedule_that_fits_is_checked_once_against_the_model_depth(monkeypatch):
    """var-tiny (maps 1..4, 2 layers x 2 heads of 32): the default schedule is checked at
    accelerate; a generation on another schedule (maps 1..5) is checked at its first attention,
    against the model's depth, and not again by the next generation."""
    seen = []
    check = UniformSelection.check
    monkeypatch.setattr(
        UniformSelection,
        "check",
        lambda self, s, layers: (seen.append((s, layers)), check(self, s, layers)),
    )
    pipe = build_tiny()
    diffcache.accelerate(
        pipe, {"diffcache": 1, "model": "var", "method": "h2o", "options": {"budget": 20}}
    )
    try:
        bigger = Schedule.square((1, 2, 3, 4, 5))  # 55 tokens: a budget of 20 evicts
        q = torch.zeros(1, 2, 1, 32)
        for _ in range(2):
            pipe.history_store().attend(ScaleCall(0, 0, bigger, cond_rows=1), q, q, q)
    finally:
        diffcache.remove(pipe)
    assert seen == [(Schedule.square((1, 2, 3, 4)), 2), (bigger, 2)]
