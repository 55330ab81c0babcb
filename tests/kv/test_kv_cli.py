"""``diffcache kv``: a model config's KV cache, full vs a plan, from arithmetic alone
(research/var.md §2.1.8, Appendix A)."""

from __future__ import annotations

import re

import pytest

from diffcache.cli import main
from diffcache.kv.memory import MIB


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
    """What ``kv`` prints for ``n`` bytes: whole MiB from 1,000 MiB on, else one decimal."""
    return float(round(n / MIB)) if n >= 1000 * MIB else round(n / MIB, 1)


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
        (["--model", "var-d30", "--plan", "var-tiny-hack.yaml"], "method hack"),
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
