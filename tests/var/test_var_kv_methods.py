"""The next-scale KV methods end to end on var-tiny (scales 1, 2, 3, 4; 2 layers x 2 heads of 32;
K and V fp32): the unlimited budget is the plain model bit for bit, every layer and head group
holds at every scale the rows its rule allows (an explicit loop over the rules of
research/var.md §2.1-§2.3), the measured bytes are diffcache.kv.memory's arithmetic, the work is
the attention pairs kept, remove() leaves the pipeline plain, and a plan that does not fit the
model is refused before anything runs (CLI: exit 2, one line)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import diffcache
from diffcache.cli import main
from diffcache.kv.budget import BudgetedHistory
from diffcache.kv.history import FullHistory, Schedule
from diffcache.kv.memory import Geometry
from diffcache.pipelines.var import VARPipeline, build_tiny
from diffcache.registry import methods

LABELS, CFG, SEED = [1, 2], 2.0, 0
SCHEDULE = Schedule.square((1, 2, 3, 4))  # 30 tokens; 14 before the last scale
LAYERS, HEADS, HEAD_DIM, ROWS = 2, 2, 32, 4  # ROWS: 2 labels and their CFG twins
GEOMETRY = Geometry(LAYERS, HEADS, HEAD_DIM, SCHEDULE, ROWS, k_bytes=4, v_bytes=4)
CLASSES = [[0, 1], [1, 0]]  # var-tiny-hack.yaml's head classes


def _plan(method: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    plan = {"diffcache": 1, "model": "var", "method": method, "options": options or {}}
    return {**plan, "calibration": {"classes": CLASSES}} if method == "hack" else plan


def _run(pipe: VARPipeline) -> Any:
    return pipe(LABELS, cfg=CFG, seed=SEED)


def _same(a: Any, b: Any) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.indices, b.indices, strict=True)) and all(
        np.array_equal(x, y) for x, y in zip(a.images, b.images, strict=True)
    )


@pytest.fixture(scope="module")
def plain() -> tuple[VARPipeline, Any]:
    pipe = build_tiny()
    return pipe, _run(pipe)


KV_METHODS = ["scalekv", "hack", "h2o", "snapkv", "streaming", "pyramidkv"]


@pytest.mark.parametrize("method", KV_METHODS)
def test_unlimited_budget_is_the_plain_run_bit_for_bit(method: str, plain) -> None:
    pipe, base = plain
    config = methods()[method].identity()
    diffcache.accelerate(pipe, _plan(method, config.to_options()))
    try:
        out, stats = _run(pipe), diffcache.stats(pipe)
    finally:
        diffcache.remove(pipe)
    assert _same(out, base)
    assert stats.compute_fraction == 1.0 and stats.kind == "attn_pair"
    assert stats.kv_history_bytes == GEOMETRY.history_before(None)
    assert stats.kv_bytes_peak == GEOMETRY.sweep_peak(None) == 30 * LAYERS * GEOMETRY.row_bytes


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, list[int], int, int]]:
    """Every group call of the budgeted store: (scale, layer, heads, rows attended, rows held
    after it)."""
    seen = []
    inner = BudgetedHistory._attend_group

    def attend_group(self, call, g, q, k, v):
        before = self.pairs
        out = inner(self, call, g, q, k, v)
        attended = (self.pairs - before) // (q.shape[0] * q.shape[1] * q.shape[2])
        seen.append(
            (
                call.si,
                call.layer,
                self.groups[call.layer][g],
                attended,
                self.held(call.layer, g)[0].shape[2],
            )
        )
        return out

    monkeypatch.setattr(BudgetedHistory, "_attend_group", attend_group)
    return seen


def _pyramid(budget: int, window: int, layer: int, length: int, beta: int = 20) -> int:
    """PyramidKV's cap, written from its reference formula (research/var.md §2.3)."""
    n = budget - window
    if length < 2 * n:
        return budget
    low, high = n // beta, 2 * n - n // beta
    if high >= length - window:
        high, low = length - window, 2 * n - (length - window)
    return high - layer * ((high - low) // (LAYERS - 1)) + window


def _expected(
    when: str, budget: Callable[[int, int, int], int | None]
) -> list[tuple[int, int, list[int], int, int]]:
    """The rows each (scale, layer) attends and holds, one group of every head (HACK's plan
    keeps B_C = B_S: both classes in one group): a post-attention rule attends history + new
    rows, then keeps min(budget, all); a pre-attention rule keeps first and attends what it
    kept. ``budget(si, layer, length)``: None = keep all."""
    out, held = [], [0] * LAYERS
    for si in range(len(SCHEDULE)):
        for layer in range(LAYERS):
            total = held[layer] + SCHEDULE.tokens(si)
            b = budget(si, layer, total)
            kept = total if b is None else min(b, total)
            out.append((si, layer, list(range(HEADS)), kept if when == "pre" else total, kept))
            held[layer] = kept
    return out


#: each bundled var-tiny plan: when it selects, and its budget by (scale, layer, rows) as the
#: plan's provenance describes it
RULES: dict[str, tuple[str, Callable[[int, int, int], int | None]]] = {
    "h2o": ("post", lambda si, layer, n: 7),  # ratio 0.5 of the 14 history rows
    "snapkv": ("post", lambda si, layer, n: 7),
    "streaming": ("post", lambda si, layer, n: 8),
    "pyramidkv": ("post", lambda si, layer, n: _pyramid(10, 2, layer, n)),
    # ScaleKV compresses after scale 2 only (the cache first exceeds 8 there; none after the
    # last scale): the drafter layer 0 keeps 12, the refiner 4
    "scalekv": ("post", lambda si, layer, n: (12, 4)[layer] if si == 2 else None),
    "hack": ("pre", lambda si, layer, n: 15),  # B = 0.5 x 30, alpha 1/2, B_C = B_S
}


@pytest.mark.parametrize("method", sorted(RULES))
def test_every_layer_and_head_group_holds_its_budget_at_every_scale(
    method: str, plain, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe, _ = plain
    seen = _spy(monkeypatch)
    diffcache.accelerate(pipe, f"var-tiny-{method}.yaml")
    try:
        _run(pipe)
        stats = diffcache.stats(pipe)
    finally:
        diffcache.remove(pipe)
    when, budget = RULES[method]
    expect = _expected(when, budget)
    assert seen == expect
    pairs = sum(ROWS * len(h) * SCHEDULE.tokens(si) * att for si, _, h, att, _ in expect)
    plain_pairs = sum(
        ROWS * HEADS * SCHEDULE.tokens(si) * SCHEDULE.start(si + 1) * LAYERS
        for si in range(len(SCHEDULE))
    )
    assert stats.work["attn_pair"] == [pairs, plain_pairs]
    assert stats.compute_fraction == pytest.approx(pairs / plain_pairs, rel=1e-12)
    assert stats.compute_fraction < 1.0


@pytest.mark.parametrize("ratio", [0.5, 0.3, 0.1])
def test_measured_history_bytes_are_the_memory_arithmetic(ratio: float, plain) -> None:
    pipe, _ = plain
    diffcache.accelerate(pipe, _plan("h2o", {"ratio": ratio}))
    try:
        _run(pipe)
        stats = diffcache.stats(pipe)
    finally:
        diffcache.remove(pipe)
    budget = int(ratio * 14)  # the history before the last scale: 1 + 4 + 9 rows
    assert stats.kv_history_bytes == GEOMETRY.history_before(lambda si, layer: budget)
    assert stats.kv_bytes_peak == GEOMETRY.sweep_peak(lambda si, layer: budget)
    assert Geometry(**{**stats.kv_geometry, "schedule": SCHEDULE}) == GEOMETRY
    # the papers' "KV cache": both layers hold min(budget, 14) rows of 2 x 4 x 32 x (4 + 4) bytes
    assert stats.kv_history_bytes[-1] == LAYERS * min(budget, 14) * ROWS * HEADS * HEAD_DIM * 8


@pytest.mark.parametrize(
    ("method", "options", "keys"),
    [
        # "post": each scale's queries read the history (capped at 7 after each scale) + the map
        ("h2o", {"ratio": 0.5}, [1, 1 + 4, 5 + 9, 7 + 16]),
        # "pre": they read the rows kept from history + map, at most B = 15 (B_C = B_S)
        ("hack", {"budget": 15, "recent_cap": 4}, [1, 5, 14, 15]),
    ],
)
def test_attention_macs_are_those_of_the_rows_attended(method, options, keys, plain) -> None:
    """QK^T and AV each cost head_dim MACs per (query, key) pair, in every layer, head and row;
    the plain cache's queries read all 1, 5, 14, 30 rows."""
    pipe, _ = plain
    diffcache.accelerate(pipe, _plan(method, options))
    try:
        _run(pipe)
        stats = diffcache.stats(pipe)
    finally:
        diffcache.remove(pipe)
    queries = [1, 4, 9, 16]
    per_pair = 2 * HEAD_DIM * HEADS * ROWS * LAYERS
    assert stats.kv_attn_macs == [per_pair * n * k for n, k in zip(queries, keys, strict=True)]
    full = [per_pair * n * k for n, k in zip(queries, [1, 5, 14, 30], strict=True)]
    assert GEOMETRY.attention_macs() == full
    assert sum(stats.kv_attn_macs) / sum(full) == pytest.approx(stats.compute_fraction)
    assert stats.as_dict()["kv_attn_macs"] == stats.kv_attn_macs


def test_scalekv_roles_give_the_memory_arithmetic_per_layer(plain) -> None:
    pipe, _ = plain
    diffcache.accelerate(pipe, "var-tiny-scalekv.yaml")
    try:
        _run(pipe)
        stats = diffcache.stats(pipe)
    finally:
        diffcache.remove(pipe)
    roles = {2: (12, 4)}
    assert stats.kv_history_bytes == GEOMETRY.history_before(
        lambda si, layer: roles[si][layer] if si in roles else None
    )
    assert stats.kv_history_bytes[-1] == (12 + 4) * GEOMETRY.row_bytes


def test_under_bf16_autocast_the_history_keeps_k_fp32_and_v_bf16(plain) -> None:
    """VAR's attn_l2_norm under upstream's autocast: K fp32, V 16-bit (research/var.md §1.1.3),
    on CPU too."""
    pipe, _ = plain
    diffcache.accelerate(pipe, _plan("h2o", {"ratio": 0.5}))
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _run(pipe)
        stats = diffcache.stats(pipe)
    finally:
        diffcache.remove(pipe)
    mixed = Geometry(LAYERS, HEADS, HEAD_DIM, SCHEDULE, ROWS, k_bytes=4, v_bytes=2)
    assert Geometry(**{**stats.kv_geometry, "schedule": SCHEDULE}) == mixed
    assert stats.kv_history_bytes == mixed.history_before(lambda si, layer: 7)


def test_remove_leaves_the_pipeline_plain(plain) -> None:
    pipe, base = plain
    diffcache.accelerate(pipe, "var-tiny-hack.yaml")
    assert not _same(_run(pipe), base), "the plan must change this output to test anything"
    assert isinstance(pipe.last_history.store, BudgetedHistory)
    diffcache.remove(pipe)
    assert "history_store" not in vars(pipe) and "end_run" not in vars(pipe)
    assert _same(_run(pipe), base)
    assert type(pipe.last_history) is FullHistory


BAD = [
    (
        "scalekv",
        {
            "average": 8,
            "window": 4,
            "scales": [{"after_scale": 2, "roles": "DRR", "drafter": 12, "refiner": 6}],
        },
        None,
        "have roles for 3 layers, the model has 2",
    ),
    (
        "hack",
        {"budget": 10},
        [[0, 1, 1], [1, 0, 0]],
        "head classes are for 2 layers x 3 heads, the model has 2 layers x 2 heads",
    ),
    (
        "scalekv",
        {
            "average": 8,
            "window": 4,
            "scales": [{"after_scale": 5, "roles": "DR", "drafter": 12, "refiner": 4}],
        },
        None,
        "after scale 5, but the model's schedule has 4 scales",
    ),
    ("h2o", {"budget": 30}, None, "not below the whole cache of this schedule (30 tokens)"),
    ("streaming", {"budget": 3}, None, "budget of 3 tokens per head is below the 5 tokens"),
    ("hack", {"budget": 8}, None, "budget_structural=8 is below the 14 rows"),
]


@pytest.mark.parametrize(("method", "options", "classes", "message"), BAD)
def test_a_plan_that_does_not_fit_the_model_is_refused_before_anything_runs(
    method: str, options: dict, classes: list | None, message: str, tmp_path: Path, capsys
) -> None:
    import yaml

    plan = _plan(method, options)
    if classes is not None:
        plan["calibration"] = {"classes": classes}
    path, out = tmp_path / "bad.yaml", tmp_path / "x.png"
    path.write_text(yaml.safe_dump(plan))
    argv = ["generate", "--model", "var-tiny", "--plan", str(path), "--out", str(out)]
    assert main([*argv, "--class-label", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"diffcache: error: {path}: "), err
    assert message in err and not out.exists()


def test_generate_and_eval_run_the_bundled_plans_as_a_user_would(
    tmp_path: Path, plain, capsys
) -> None:
    import json

    pipe, _ = plain
    out = tmp_path / "x.png"
    argv = ["generate", "--model", "var-tiny", "--plan", "var-tiny-scalekv.yaml"]
    assert main([*argv, "--class-label", "3", "--out", str(out)]) == 0
    import imageio.v3 as iio

    diffcache.accelerate(pipe, "var-tiny-scalekv.yaml")
    try:
        image = pipe([3], cfg=1.5, seed=0).images[0]
    finally:
        diffcache.remove(pipe)
    assert np.array_equal(iio.imread(out), (np.clip(image, 0, 1) * 255).round().astype(np.uint8))
    report = tmp_path / "v"
    assert (
        main(
            [
                "eval",
                "--model",
                "var-tiny",
                "--plan",
                "var-tiny-hack.yaml",
                "--plan",
                "var-tiny-h2o.yaml",
                "--out",
                str(report),
            ]
        )
        == 0
    )
    data = json.loads((report / "report.json").read_text())
    run, h2o = data["runs"]
    record = next(r for r in data["records"] if r["run"] == "var-tiny-hack.yaml")
    geometry = dataclasses.replace(GEOMETRY, rows=2)  # one label and its CFG twin
    assert record["kv_history_bytes"] == geometry.history_before(lambda si, layer: 15)
    # the plain run's history, by the arithmetic the unlimited-budget test checks is measured
    assert record["kv_history_plain"] == geometry.history_before(None)
    assert run["kv_cache_fraction"] == 14 / 14  # B = 15 >= the 14 rows before the last scale
    assert h2o["kv_cache_fraction"] == 7 / 14  # H2O keeps half the history
    assert run["kv_bytes_peak"] == record["kv_bytes_peak"] > 0
    # per scale in report.json (one sample: its own), the plain one recomputable from the geometry
    assert run["kv_history_bytes"] == record["kv_history_bytes"]
    assert h2o["kv_history_bytes"][-1] == h2o["kv_history_plain"][-1] * 7 / 14
    plain = Geometry(**{**run["kv_geometry"], "schedule": Schedule(run["kv_geometry"]["schedule"])})
    assert run["kv_history_plain"] == plain.history_before() == geometry.history_before(None)
    assert 'id="kv"' in (report / "report.html").read_text()
    # attention MACs by hand: 1, 4, 9, 16 queries per scale; HACK (pre, B = 15) reads 1, 5, 14,
    # 15 keys, H2O (post, 7 kept) 1, 5, 14, 23, the plain cache 1, 5, 14, 30; QK^T + AV cost
    # 2 x 32 MACs per pair in 2 layers x 2 heads x 2 rows
    per_pair = 2 * 32 * 2 * 2 * 2
    assert record["kv_attn_macs"] == [per_pair * m for m in (1 * 1, 4 * 5, 9 * 14, 16 * 15)]
    assert run["kv_attn_macs_plain"] == [per_pair * m for m in (1, 4 * 5, 9 * 14, 16 * 30)]
    plain_pairs = 1 + 4 * 5 + 9 * 14 + 16 * 30
    assert run["attn_macs_fraction"] == pytest.approx((1 + 20 + 126 + 16 * 15) / plain_pairs)
    assert h2o["attn_macs_fraction"] == pytest.approx((1 + 20 + 126 + 16 * 23) / plain_pairs)
    assert run["macs_fraction"] == pytest.approx(1.0)  # the Linear layers: all computed
    assert "attn_macs_fraction" in data["notes"]
    header = next(x for x in (report / "report.md").read_text().splitlines() if "| plan" in x)
    assert "attn_macs_fraction" in header
    printed = capsys.readouterr().out
    assert f"KV cache {run['kv_cache_fraction']:.1%} of plain" in printed
    assert "var-tiny-h2o.yaml: " in printed and "KV cache 50.0% of plain" in printed
    assert 0 < run["compute_fraction"] < 1


def test_var_d30_plans_give_the_published_budgets_on_the_d30_schedule() -> None:
    """VAR-d30 at 256 px: 680 tokens, 424 before the last scale; 50% and 10% of that history
    (HACK: 50% of the final 680), checked against the real depth without building the model."""
    from diffcache.pipelines.var.config import PATCH_NUMS_256
    from diffcache.plan import Plan

    d30 = Schedule.square(PATCH_NUMS_256)
    assert (d30.total, d30.start(len(d30) - 1)) == (680, 424)
    want = {"h2o": 212, "snapkv": 212, "streaming": 42, "pyramidkv": 42}
    for method, tokens in want.items():
        selection = Plan.load(f"var-d30-{method}.yaml").config.make(None, d30, 30, 30)
        assert selection.tokens == tokens
        selection.check(d30, 30)
    scalekv = Plan.load("var-d30-scalekv.yaml").config.make(None, d30, 30, 30)
    scalekv.check(d30, 30)
    assert {scalekv.budgets.budget(si, layer) for si in range(9) for layer in range(30)} == {42}
    hack = Plan.load("var-d30-hack.yaml", template=True)
    assert hack.is_template and hack.config.average(d30) == 340


def test_plans_import_scalekv_reads_the_released_format(tmp_path: Path, capsys) -> None:
    """'Scale s' sets the cache after 0-based scale s - 2; 'Block b' 1 is a drafter (Max)."""
    import json

    from diffcache.plan import Plan

    budget = tmp_path / "budget.json"
    entry = {"Max": 12, "Min": 4, "High": 1, "Limit": 14, "Block 0": 1, "Block 1": 0}
    budget.write_text(json.dumps({"Scale 4": entry}))
    out = tmp_path / "plan.yaml"
    argv = ["plans", "import", str(budget), "--method", "scalekv", "--out", str(out)]
    assert main([*argv, "--depth", "2", "--family", "var", "--average", "8"]) == 0
    plan = Plan.load(out)
    assert plan.options["scales"] == [
        {"after_scale": 2, "roles": "DR", "drafter": 12, "refiner": 4}
    ]
    assert plan.options["average"] == 8 and str(budget) in plan.provenance["source"]
    capsys.readouterr()
    again = ["plans", "import", str(budget), "--method", "scalekv", "--family", "var"]
    assert main([*again, "--out", str(tmp_path / "b.yaml"), "--depth", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'Block 0'..'Block 2' each 0 or 1" in err


def test_a_generation_whose_schedule_the_plan_does_not_fit_is_refused_before_attending() -> None:
    """Where the schedule follows the request (Infinity's image sizes) the store checks each
    generation's schedule at its first attention, before any row is attended."""
    from diffcache.errors import PlanError
    from diffcache.kv.history import ScaleCall

    pipe = build_tiny()
    diffcache.accelerate(pipe, _plan("h2o", {"budget": 20}))
    try:
        store = pipe.history_store()
        small = Schedule.square((1, 2, 3))  # 14 tokens: a budget of 20 would keep them all
        q = torch.zeros(1, HEADS, 1, HEAD_DIM)
        with pytest.raises(PlanError, match=r"^<dict>: h2o budget of 20 .* \(14 tokens\)"):
            store.attend(ScaleCall(0, 0, small, cond_rows=1), q, q, q)
        assert store.store.pairs == 0 and store.nbytes() == 0
    finally:
        diffcache.remove(pipe)


@pytest.mark.parametrize(
    ("method", "options", "ops"),
    [
        ("scalekv", {"ratio": 0.5, "window": 4}, ["kv_compact", "window_scores"]),
        ("snapkv", {"ratio": 0.5, "window": 4, "kernel": 3}, ["kv_compact", "window_scores"]),
        ("streaming", {"ratio": 0.5}, ["kv_compact"]),
    ],
)
def test_stats_name_the_kernel_backend_of_each_store_op(method, options, ops, plain) -> None:
    """The plan's kernels: reach the store's compaction and the window scoring; Stats name
    the backend each ran (torch here: CPU)."""
    pipe, _ = plain
    diffcache.accelerate(pipe, {**_plan(method, options), "kernels": "auto"})
    try:
        _run(pipe)
        stats = diffcache.stats(pipe)
    finally:
        diffcache.remove(pipe)
    assert stats.kernels == dict.fromkeys(ops, "torch")


def test_each_schedule_is_checked_once_per_session(monkeypatch, plain) -> None:
    """The selection is checked against a schedule once (the default one at accelerate), not
    again at each generation's first attention; a schedule it refuses stays refused."""
    from diffcache.errors import PlanError
    from diffcache.kv.baselines import UniformSelection
    from diffcache.kv.history import ScaleCall

    pipe, _ = plain
    seen: list[Schedule] = []
    check = UniformSelection.check
    monkeypatch.setattr(
        UniformSelection, "check", lambda self, s, layers: (seen.append(s), check(self, s, layers))
    )
    diffcache.accelerate(pipe, _plan("h2o", {"budget": 20}))
    try:
        _run(pipe)
        _run(pipe)
        small = Schedule.square((1, 2, 3))  # 14 tokens: a budget of 20 would keep them all
        q = torch.zeros(1, HEADS, 1, HEAD_DIM)
        for _ in range(2):
            with pytest.raises(PlanError, match="h2o budget of 20"):
                pipe.history_store().attend(ScaleCall(0, 0, small, cond_rows=1), q, q, q)
    finally:
        diffcache.remove(pipe)
    assert seen == [SCHEDULE, small, small]


#: each method's aggressive() on var-tiny, by hand: when it selects and its rows by (scale,
#: layer, rows), as in RULES (DESIGN.md §8's contract: an aggressive setting skips work)
AGGRESSIVE: dict[str, tuple[str, Callable[[int, int, int], int | None]]] = {
    "h2o": ("post", lambda si, layer, n: 2),  # budget 2: one recent row, one heavy hitter
    "snapkv": ("post", lambda si, layer, n: 2),  # budget 2: a 1-row window and one top row
    "streaming": ("post", lambda si, layer, n: 6),  # the 5 sinks and the newest row
    "pyramidkv": ("post", lambda si, layer, n: _pyramid(3, 1, layer, n)),
    # average 4, base capacity 4: first exceeded by the 5 rows after scale 1; none after the
    # last scale
    "scalekv": ("post", lambda si, layer, n: 4 if si in (1, 2) else None),
    "hack": ("pre", lambda si, layer, n: 3),  # B = round(0.1 x 30), alpha 1/2: B_C = B_S = 3
}


@pytest.mark.parametrize("method", sorted(AGGRESSIVE))
def test_aggressive_keeps_its_hand_budget_and_repeats(
    method: str, plain, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every next-scale KV method's aggressive(): every layer holds the rows worked out by hand
    above, the output changes but stays the same from one call to the next, and remove()
    leaves the plain pipeline (test_contracts.py's contract, on var-tiny)."""
    pipe, base = plain
    seen = _spy(monkeypatch)
    diffcache.accelerate(pipe, _plan(method, methods()[method].aggressive().to_options()))
    try:
        first = _run(pipe)
        stats = diffcache.stats(pipe).as_dict()
        calls = list(seen)
        second = _run(pipe)
    finally:
        diffcache.remove(pipe)
    assert calls == _expected(*AGGRESSIVE[method])
    assert stats["compute_fraction"] < 1.0
    assert stats["kv_history_bytes"][-1] < GEOMETRY.history_before(None)[-1]
    assert not _same(first, base) and _same(first, second)
    assert _same(_run(pipe), base)


def _held_positions(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, list[list[int]]]]:
    """(scale, layer, the positions each head of the first batch row holds after it)."""
    seen = []
    inner = BudgetedHistory._attend_group

    def attend_group(self, call, g, q, k, v):
        out = inner(self, call, g, q, k, v)
        if self.groups[call.layer][g] == list(range(HEADS)):
            seen.append((call.si, call.layer, self.positions(call.layer, g)[0].tolist()))
        return out

    monkeypatch.setattr(BudgetedHistory, "_attend_group", attend_group)
    return seen


def test_scalekv_aggressive_keeps_the_centroids_of_a_2x2_grid(plain, monkeypatch) -> None:
    """aggressive()'s budget is its window: after scales 1 (the 2x2 map, positions 1-4) and
    2 (the 3x3 map from 5: patches of 1, centroids at its (0,0), (0,1), (1,0), (1,1)) every
    head keeps those 4 centroids only (research/var.md §2.1.3's grid)."""
    pipe, _ = plain
    seen = _held_positions(monkeypatch)
    diffcache.accelerate(pipe, _plan("scalekv", methods()["scalekv"].aggressive().to_options()))
    try:
        _run(pipe)
    finally:
        diffcache.remove(pipe)
    held = {(si, layer): rows for si, layer, rows in seen if si in (1, 2)}
    want = {1: [1, 2, 3, 4], 2: [5, 6, 8, 9]}
    assert held == {(si, layer): [want[si]] * HEADS for si in (1, 2) for layer in range(LAYERS)}


def test_hack_aggressive_structural_heads_must_keep_the_first_map_and_the_newest_row(
    plain, monkeypatch
) -> None:
    """aggressive()'s mandatory set is two rows: the 1x1 map (position 0) and the newest row of
    the current map. At a budget of 2 the structural heads (CLASSES: layer 0 head 1, layer 1
    head 0) hold exactly those after every scale; at 1 the plan is refused naming the 2."""
    from diffcache.errors import PlanError

    pipe, _ = plain
    config = dataclasses.replace(methods()["hack"].aggressive(), compression=None, budget=2)
    seen = _held_positions(monkeypatch)
    diffcache.accelerate(pipe, _plan("hack", config.to_options()))
    try:
        _run(pipe)
    finally:
        diffcache.remove(pipe)
    structural = {(si, layer): rows[1 - layer] for si, layer, rows in seen}
    assert structural == {
        (si, layer): [0, SCHEDULE.start(si + 1) - 1] if si else [0]
        for si in range(len(SCHEDULE))
        for layer in range(LAYERS)
    }
    one = dataclasses.replace(config, budget=1)
    with pytest.raises(PlanError, match="below the 2 rows structural heads must keep"):
        diffcache.accelerate(pipe, _plan("hack", one.to_options()))
    assert not diffcache.is_accelerated(pipe)


def test_snapkv_aggressive_keeps_a_one_row_window(plain, monkeypatch) -> None:
    """aggressive()'s observation window is the newest row alone: at a budget of 1 every head
    holds exactly that row after every scale (position 0, then 4, 13, 29)."""
    pipe, _ = plain
    config = dataclasses.replace(methods()["snapkv"].aggressive(), budget=1)
    seen = _held_positions(monkeypatch)
    diffcache.accelerate(pipe, _plan("snapkv", config.to_options()))
    try:
        _run(pipe)
    finally:
        diffcache.remove(pipe)
    assert seen == [
        (si, layer, [[SCHEDULE.start(si + 1) - 1]] * HEADS)
        for si in range(len(SCHEDULE))
        for layer in range(LAYERS)
    ]
