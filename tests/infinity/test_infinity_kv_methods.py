"""The next-scale KV methods end to end on infinity-tiny (maps 1, 2, 4, 6, 8: 121 tokens, 57 before
the last map; 4 layers x 2 heads of 32; K and V fp32): the unlimited budget is the plain model
bit for bit, the measured bytes are diffcache.kv.memory's arithmetic for the budgets the plans
state, the work is the attention pairs kept, remove() leaves the pipeline plain, a plan that does
not fit is refused before anything runs, and the released ScaleKV tables give ScaleKV's
published KV memory on the real sizes (research/var.md §2.1.8)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

import diffcache
from diffcache.cli import main
from diffcache.kv.history import FullHistory, Schedule
from diffcache.kv.memory import MIB, Geometry
from diffcache.pipelines.infinity.schedule import SQUARE_1M
from diffcache.plan import Plan
from diffcache.registry import methods

SCHEDULE = Schedule.square((1, 2, 4, 6, 8))
LAYERS, HEADS, HEAD_DIM, ROWS = 4, 2, 32, 2  # ROWS: one prompt and its CFG twin
GEOMETRY = Geometry(LAYERS, HEADS, HEAD_DIM, SCHEDULE, ROWS, k_bytes=4, v_bytes=4)
CLASSES = [[0, 1], [1, 0], [0, 1], [1, 0]]  # infinity-tiny-hack.yaml's head classes


def _plan(method: str, options: dict[str, Any]) -> dict[str, Any]:
    plan = {"diffcache": 1, "model": "infinity", "method": method, "options": options}
    return {**plan, "calibration": {"classes": CLASSES}} if method == "hack" else plan


def _run(pipe: Any) -> Any:
    return pipe("a cat", seed=0)


def _same(a: Any, b: Any) -> bool:
    """Images, codes and every scale's logits equal (the tiny model's bits often agree even
    where the logits move)."""
    tensors = [(a.codes, b.codes), (a.logits, b.logits)]
    return all(np.array_equal(x, y) for x, y in zip(a.images, b.images, strict=True)) and all(
        torch.equal(x, y) for xs, ys in tensors for x, y in zip(xs, ys, strict=True)
    )


def _accelerated(pipe: Any, plan: Any) -> tuple[Any, Any]:
    diffcache.accelerate(pipe, plan)
    try:
        return _run(pipe), diffcache.stats(pipe)
    finally:
        diffcache.remove(pipe)


@pytest.mark.parametrize("method", ["scalekv", "hack", "h2o", "snapkv", "streaming", "pyramidkv"])
def test_unlimited_budget_is_the_plain_run_bit_for_bit(method: str, pipe) -> None:
    base = _run(pipe)
    out, stats = _accelerated(pipe, _plan(method, methods()[method].identity().to_options()))
    assert _same(out, base)
    assert stats.compute_fraction == 1.0
    assert stats.kv_history_bytes == GEOMETRY.history_before(None)


def _pairs(budget: Any) -> tuple[int, int]:
    """(kept, plain) query x key pairs of a post-attention rule: at scale si a layer attends
    its history plus the new map (the plain model: every earlier row)."""
    lengths = GEOMETRY.history_lengths(budget)
    kept = plain = 0
    for si in range(len(SCHEDULE)):
        n = SCHEDULE.tokens(si)
        kept += sum(ROWS * HEADS * n * (held + n) for held in lengths[si])
        plain += LAYERS * ROWS * HEADS * n * SCHEDULE.start(si + 1)
    return kept, plain


@pytest.mark.parametrize("ratio", [0.5, 0.3, 0.1])
def test_h2o_bytes_and_work_are_the_arithmetic(ratio: float, pipe) -> None:
    _, stats = _accelerated(pipe, _plan("h2o", {"ratio": ratio}))
    budget = int(ratio * 57)

    def rule(si: int, layer: int) -> int:
        return budget

    assert stats.kv_history_bytes == GEOMETRY.history_before(rule)
    assert stats.kv_bytes_peak == GEOMETRY.sweep_peak(rule)
    assert stats.work["attn_pair"] == list(map(float, _pairs(rule)))
    assert Geometry(**{**stats.kv_geometry, "schedule": SCHEDULE}) == GEOMETRY


def test_bundled_scalekv_and_hack_plans_hold_their_stated_budgets(pipe) -> None:
    roles = {2: (28, 12, 12, 12), 3: (24, 8, 8, 24)}  # infinity-tiny-scalekv.yaml's D / R

    def scalekv(si: int, layer: int) -> int | None:
        return roles[si][layer] if si in roles else None

    _, stats = _accelerated(pipe, "infinity-tiny-scalekv.yaml")
    assert stats.kv_history_bytes == GEOMETRY.history_before(scalekv)
    assert stats.kv_history_bytes[-1] == 4 * 16 * GEOMETRY.row_bytes  # 16 rows per layer
    _, stats = _accelerated(pipe, "infinity-tiny-hack.yaml")
    # B = round(0.5 x 121) = 60 for both head classes (alpha 1/2, B_C / B_S = 1); selecting
    # before attention, each group holds min(60, history + new map) like a post rule would
    assert stats.kv_history_bytes == GEOMETRY.history_before(lambda si, layer: 60)
    assert stats.kv_bytes_peak < GEOMETRY.sweep_peak(None)


def test_under_bf16_autocast_the_history_keeps_k_fp32_and_v_bf16(pipe) -> None:
    """Upstream's inference runs under bf16 autocast, where cosine attention's F.normalize
    makes K fp32 while V stays bf16 (research/var.md §1.2.4): the store holds that and
    measures 6 bytes per element pair, on CPU too (whose autocast keeps normalize in bf16)."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, stats = _accelerated(pipe, _plan("h2o", {"ratio": 0.5}))
    mixed = Geometry(LAYERS, HEADS, HEAD_DIM, SCHEDULE, ROWS, k_bytes=4, v_bytes=2)
    assert Geometry(**{**stats.kv_geometry, "schedule": SCHEDULE}) == mixed
    assert stats.kv_history_bytes == mixed.history_before(lambda si, layer: 28)


def test_remove_leaves_the_pipeline_plain(pipe) -> None:
    base = _run(pipe)
    out, _ = _accelerated(pipe, "infinity-tiny-h2o.yaml")
    assert not _same(out, base), "the plan must change this output to test anything"
    assert "history_store" not in vars(pipe) and "end_run" not in vars(pipe)
    assert _same(_run(pipe), base) and type(pipe.history_store()) is FullHistory


def test_cli_generate_with_a_bundled_plan_and_a_refused_one(tmp_path: Path, pipe, capsys) -> None:
    import imageio.v3 as iio

    out = tmp_path / "x.png"
    argv = ["generate", "--model", "infinity-tiny", "--prompt", "a cat", "--out", str(out)]
    assert main([*argv, "--plan", "infinity-tiny-scalekv.yaml"]) == 0
    image = _accelerated(pipe, "infinity-tiny-scalekv.yaml")[0].images[0]
    assert np.array_equal(iio.imread(out), (np.clip(image, 0, 1) * 255).round().astype(np.uint8))
    capsys.readouterr()
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump({**_plan("hack", {"budget": 60}), "calibration": {"classes": CLASSES[:2]}})
    )
    other = tmp_path / "y.png"
    argv = ["generate", "--model", "infinity-tiny", "--prompt", "a cat", "--out", str(other)]
    assert main([*argv, "--plan", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"diffcache: error: {bad}: "), err
    assert "classes are for 2 layers x 2 heads, the model has 4 layers x 2 heads" in err
    assert not other.exists()


@pytest.mark.parametrize(
    ("plan", "layers", "heads", "width", "full_mib", "kept_mib"),
    [
        ("infinity-2b-scalekv.yaml", 32, 16, 2048, 38550.0, 3900.0),
        ("infinity-8b-scalekv.yaml", 40, 28, 3584, 84328.125, 8531.25),
    ],
)
def test_released_scalekv_tables_give_the_published_kv_memory(
    plan: str, layers: int, heads: int, width: int, full_mib: float, kept_mib: float
) -> None:
    """ScaleKV Table 1 at batch 8 (16 rows with CFG), K fp32 and V bf16, at 1M: the history
    before the last map is 6425 rows per layer in full and 650 on average at 10%."""
    schedule = Schedule.square(SQUARE_1M)
    selection = Plan.load(plan).config.make(None, schedule, layers, heads)
    selection.check(schedule, layers)
    geometry = Geometry(layers, heads, width // heads, schedule, rows=16, k_bytes=4, v_bytes=2)

    def rule(si: int, layer: int) -> int | None:
        return selection.budgets.budget(si, layer) if schedule.start(si + 1) > 650 else None

    assert geometry.history_before()[-1] == full_mib * MIB
    assert geometry.history_before(rule)[-1] == kept_mib * MIB
