"""``diffcache kv``: a model config's KV cache, full vs a plan, from arithmetic alone
(research/var.md §2.1.8, Appendix A)."""

from __future__ import annotations

import re

import pytest

import diffcache
from diffcache.cli import main
from diffcache.kv.memory import MIB
from diffcache.models import load_model
from diffcache.plan import Plan


def kv(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["kv", *args])
    out, err = capsys.readouterr()
    return code, out, err


def summary(out: str, what: str) -> tuple[float, float]:
    """The full and plan MiB of the summary line starting with ``what``."""
    line = next(line for line in out.splitlines() if line.startswith(what))
    full, kept = re.findall(r"([\d,.]+) MiB", line)
    return float(full.replace(",", "")), float(kept.replace(",", ""))


def mib(n: float) -> float:
    """What ``kv`` prints for ``n`` bytes: whole MiB from 1,000 MiB on, else one decimal, the
    bytes themselves below 1 MiB."""
    if n < MIB:
        return float(n)
    return float(round(n / MIB)) if n >= 1000 * MIB else round(n / MIB, 1)


def in_bytes(value: str) -> int:
    """A figure ``kv`` printed for a cache below 1 MiB (``12,345 B``) as bytes."""
    number, unit = value.rsplit(" ", 1)
    assert unit == "B", value
    return int(number.replace(",", ""))


def plan_columns(out: str) -> tuple[list[int], list[int]]:
    """The plan's bytes before each scale and its layer-sweep peak at each scale, as printed."""
    cells = [
        re.findall(r"[\d,.]+ M?i?B", line)
        for line in out.splitlines()
        if re.match(r"\s+\d+\s+\d+\s", line)
    ]
    return [in_bytes(c[1]) for c in cells], [in_bytes(c[3]) for c in cells]


@pytest.mark.parametrize(
    ("model", "layers", "width", "printed"),
    [
        ("infinity-8b", 40, 3584, "84,328 MiB -> 8,531 MiB"),
        ("infinity-2b", 32, 2048, "38,550 MiB -> 3,900 MiB"),
    ],
)
def test_infinity_scalekv_at_batch_8_is_scalekv_table_1(capsys, model, layers, width, printed):
    code, out, err = kv(capsys, "--model", model, "--plan", f"{model}-scalekv.yaml", "--batch", "8")
    assert code == 0, err
    assert printed in out
    # 6425 tokens before the 64x64 map, 16 rows (CFG), K fp32 + V bf16; the plans average 650
    row = layers * width * 16 * (4 + 2)
    assert summary(out, "KV cache before") == (mib(6425 * row), mib(650 * row))


def test_var_d30_appendix_a_and_dtype(capsys):
    """VAR-d30 at 256 px, one image with CFG: 424 tokens before the last scale, 680 at the end
    (the full cache's peak); fp32 makes V 4 bytes."""
    for dtype, v_bytes in (("bf16", 2), ("fp32", 4)):
        code, out, err = kv(
            capsys, "--model", "var-d30", "--plan", "var-d30-streaming.yaml", "--dtype", dtype
        )
        assert code == 0, err
        row = 30 * 1920 * 2 * (4 + v_bytes)
        kept = int(0.1 * 424)  # the plan's ratio of the history before the last scale
        assert summary(out, "KV cache before") == (mib(424 * row), mib(kept * row))
        assert summary(out, "layer-sweep peak")[0] == mib(680 * row)
        if dtype == "bf16":  # Appendix A: "≈ 448 MiB per image (280 MiB for the 424-token history)"
            assert "metric): 279.5 MiB -> " in out and "layer-sweep peak: 448.2 MiB -> " in out


def test_per_scale_rows_follow_the_schedule(capsys):
    code, out, err = kv(capsys, "--model", "var-d16", "--plan", "var-d30-streaming.yaml")
    assert code == 0, err
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s+\d+\s", line)]
    sides = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    assert [int(r[1]) for r in rows] == [s * s for s in sides]
    row = 16 * 1024 * 2 * 6
    before = [sum(s * s for s in sides[:si]) for si in range(len(sides))]
    assert [float(r[2].replace(",", "")) for r in rows] == [mib(t * row) for t in before]


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--model", "var-d31", "--plan", "var-d30-streaming.yaml"], "--model var-d31"),
        (["--model", "var-d30", "--plan", "infinity-8b-scalekv.yaml"], "'infinity'"),
        (["--model", "infinity-8b", "--plan", "var-d30-scalekv.yaml"], "'var'"),
        (["--model", "var-d30", "--plan", "var-d30-h2o.yaml", "--batch", "0"], "--batch 0"),
        (["--model", "var-d30", "--plan", "var-tiny-hack.yaml"], "30 layers x 30 heads"),
        (["--model", "var-d30", "--plan", "var-d30-hack.yaml"], "--method hack"),
        (["--model", "var-d30", "--plan", "var-d30-h2o.yaml", "--guidance", "-1"], "--guidance -1"),
        (["--model", "infinity-2b", "--plan", "infinity-8b-scalekv.yaml"], "40 layers"),
        (["--model", "var-d30", "--plan", "var-d30-h2o.yaml", "--height", "512"], "--height 512"),
        (["--model", "var-d30", "--plan", "var-d30-h2o.yaml", "--width", "0"], "--width 0"),
        (
            ["--model", "infinity-8b", "--plan", "infinity-8b-scalekv.yaml", "--height", "999"],
            "999",
        ),
    ],
)
def test_bad_input_is_one_line(capsys, args, names):
    code, out, err = kv(capsys, *args)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("diffcache: error: ") and names in err


@pytest.mark.parametrize(
    ("model", "plan", "guidance", "rows_per_image", "options"),
    [
        ("var-tiny", "var-tiny-hack.yaml", None, 2, {}),  # default guidance 1.5: CFG rows
        ("var-tiny", "var-tiny-hack.yaml", 0.0, 1, {}),  # VAR unguided: no null-class twins
        ("var-digits", "var-digits-hack.yaml", None, 2, {}),  # profiled classes, 30% history
        # contextual heads keep a quarter of the structural heads' rows: B_C 8, B_S 32
        ("var-digits", "var-digits-hack.yaml", None, 2, {"contextual_ratio": 0.25}),
        ("var-digits", "var-digits-scalekv.yaml", 0.0, 1, {}),
        # infinity-tiny on its own templates (maps 1, 2, 4, 6, 8): default guidance 3, and 1
        ("infinity-tiny", "infinity-tiny-hack.yaml", None, 2, {}),
        ("infinity-tiny", "infinity-tiny-scalekv.yaml", 1.0, 1, {}),
    ],
)
def test_kv_figures_are_the_bytes_a_real_run_measures(
    capsys, tmp_path, model, plan, guidance, rows_per_image, options
):
    """``diffcache kv`` from the config alone equals the budgeted store's own byte counts in a
    generation of two images with the same plan (fp32 as the run: K and V 4 bytes), HACK's
    head classes with their own budgets included, with and without CFG rows."""
    if options:
        data = Plan.load(plan).to_dict()
        data["options"].update(options)
        plan = str(tmp_path / "plan.yaml")
        Plan.from_dict(data).save(plan)
    flags = [] if guidance is None else ["--guidance", str(guidance)]
    code, out, err = kv(
        capsys, "--model", model, "--plan", plan, "--batch", "2", "--dtype", "fp32", *flags
    )
    assert code == 0, err
    assert f"batch 2 = {2 * rows_per_image} rows" in out
    pipe = load_model(model)
    diffcache.accelerate(pipe, plan)
    try:
        inputs = ["a red fox", "a cat"] if model.startswith("infinity") else [1, 2]
        pipe(inputs, seed=0, **({} if guidance is None else {"cfg": guidance}))
        stats = diffcache.stats(pipe)
    finally:
        diffcache.remove(pipe)
    assert stats.kv_geometry["rows"] == 2 * rows_per_image
    history, peaks = plan_columns(out)
    assert history == stats.kv_history_bytes
    assert max(peaks) == stats.kv_bytes_peak
    kept_peak = re.search(r"layer-sweep peak: .* -> ([\d,]+ B)", out).group(1)
    assert in_bytes(kept_peak) == stats.kv_bytes_peak
    assert stats.kv_history_bytes[-1] < stats.kv_bytes_peak  # something was compressed


def test_infinity_tiny_other_aspect_ratio_uses_its_own_template(capsys):
    """64 x 128 px on infinity-tiny is its 1:2 template (maps 1x1, 1x2, 2x4, 3x6, 4x8): 29
    tokens before the last map; 4 layers x width 64, CFG rows, K fp32 + V bf16."""
    flags = ["--plan", "infinity-tiny-h2o.yaml", "--height", "64", "--width", "128"]
    code, out, err = kv(capsys, "--model", "infinity-tiny", *flags)
    assert code == 0, err
    assert "5 scales (4x8 tokens)" in out
    row = 4 * 64 * 2 * (4 + 2)
    full = re.search(r"metric\): ([\d,]+ B) ->", out).group(1)
    assert in_bytes(full) == (1 + 2 + 8 + 18) * row


def test_guidance_sets_the_rows_infinity_runs_without_cfg_at_1(capsys):
    """Infinity runs its unconditional twins at every scale but 1: half the bytes there."""
    with_cfg = kv(capsys, "--model", "infinity-2b", "--plan", "infinity-2b-scalekv.yaml")[1]
    without = kv(
        capsys, "--model", "infinity-2b", "--plan", "infinity-2b-scalekv.yaml", "--guidance", "1"
    )[1]
    assert "batch 1 = 2 rows with CFG" in with_cfg and "batch 1 = 1 row without CFG" in without
    row = 32 * 2048 * (4 + 2)  # one attention row of every layer, K fp32 + V bf16
    assert summary(with_cfg, "KV cache before") == (mib(6425 * 2 * row), mib(650 * 2 * row))
    assert summary(without, "KV cache before") == (mib(6425 * row), mib(650 * row))


def test_plan_memory_is_the_arithmetic_kv_prints():
    """``kv.memory.plan_memory`` alone, VAR-d30 at 256 px with CFG (Appendix A): the full cache
    holds 424 tokens before the last scale and peaks at 680; the streaming plan keeps a tenth of
    the 424; a plan whose method keeps no KV history is one PlanError naming the plan."""
    from diffcache.errors import PlanError
    from diffcache.kv.memory import plan_memory
    from diffcache.pipelines.kv_configs import kv_config

    geo = kv_config("var-d30").geometry(1, "bf16")
    memory = plan_memory(Plan.load("var-d30-streaming.yaml"), geo)
    row = 30 * 1920 * 2 * (4 + 2)
    assert (memory.full[-1], memory.kept[-1]) == (424 * row, int(0.1 * 424) * row)
    assert max(memory.full_peaks) == 680 * row
    assert max(memory.kept_peaks) < max(memory.full_peaks)
    plan = Plan.from_dict({"diffcache": 1, "model": "var", "method": "easycache"}, source="p.yaml")
    with pytest.raises(PlanError, match=r"^p\.yaml: method easycache keeps no budgeted KV history"):
        plan_memory(plan, geo)
