"""Tests for diffcache.eval.report: JSON round trip, Markdown table, self-contained HTML."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from diffcache.eval import report as rp


def _report() -> dict[str, Any]:
    return {
        "model": "wan2.1-tiny",
        "device": "cpu",
        "baseline": {"latency_s": 1.0, "peak_mem_bytes": 0},
        "runs": [
            {
                "plan": "wan2.1-tiny.yaml",
                "method": "easycache",
                "latency_s": 0.5,
                "speedup": 2.0,
                "compute_fraction": 0.5,
                "psnr": 31.2,
                "ssim": 0.95,
                "lpips": None,
                "accuracy": None,
                "agreement": None,
                "kv_bytes_peak": None,
                "samples": 4,
                "per_step_compute": [1.0, 1.0, 0.0, 1.0],
            },
            {
                "plan": "a<b>.yaml",
                "method": "teacache",
                "latency_s": 0.3333333,
                "speedup": 3.0000001,
                "compute_fraction": 0.25,
                "psnr": float("inf"),
                "ssim": 1.0,
                "lpips": None,
                "accuracy": None,
                "agreement": 1.0,
                "kv_bytes_peak": 123456,
                "samples": 4,
                "per_step_compute": [1.0, 0.5, 0.0, 0.0],
            },
        ],
        "notes": {"lpips": "torchvision is not installed & the AlexNet weights are missing"},
    }


def test_write_report_returns_three_paths(tmp_path: Path) -> None:
    paths = rp.write_report(_report(), tmp_path / "out")
    assert set(paths) == {"json", "md", "html"}
    assert [p.name for p in paths.values()] == ["report.json", "report.md", "report.html"]
    assert all(p.is_file() and p.parent == tmp_path / "out" for p in paths.values())


def test_json_round_trip_with_inf(tmp_path: Path) -> None:
    data = _report()
    data["runs"][0]["extra_metric"] = float("nan")
    paths = rp.write_report(data, tmp_path)
    text = paths["json"].read_text()
    raw = json.loads(text)  # strict JSON: no bare Infinity / NaN
    assert "Infinity" not in text and "NaN" not in text
    assert raw["runs"][1]["psnr"] == "inf"
    assert raw["runs"][0]["extra_metric"] == "nan"
    assert text.startswith('{\n  "model"')  # indent 2

    loaded = rp.load_report(paths["json"])
    assert loaded["runs"][1]["psnr"] == float("inf")
    assert math.isnan(loaded["runs"][0].pop("extra_metric"))
    data["runs"][0].pop("extra_metric")
    assert loaded == data


def test_json_keeps_text_fields_as_strings(tmp_path: Path) -> None:
    data = _report()
    data["runs"][0]["plan"] = "inf"
    data["notes"] = {"weird": "nan"}
    loaded = rp.load_report(rp.write_report(data, tmp_path)["json"])
    assert loaded["runs"][0]["plan"] == "inf"
    assert loaded["notes"] == {"weird": "nan"}


def test_json_handles_tuples_and_numpy(tmp_path: Path) -> None:
    import numpy as np

    data = _report()
    data["runs"][0]["per_step_compute"] = np.array([1.0, 0.0])
    data["runs"][0]["psnr"] = np.float32(30.5)
    data["runs"][0]["samples"] = np.int64(4)
    data["runs"][0]["shape"] = (1, 2)
    loaded = rp.load_report(rp.write_report(data, tmp_path)["json"])
    assert loaded["runs"][0]["per_step_compute"] == [1.0, 0.0]
    assert loaded["runs"][0]["psnr"] == 30.5
    assert loaded["runs"][0]["samples"] == 4
    assert loaded["runs"][0]["shape"] == [1, 2]


def test_markdown_rows_nulls_and_notes(tmp_path: Path) -> None:
    md = rp.write_report(_report(), tmp_path)["md"].read_text()
    assert "wan2.1-tiny" in md and "cpu" in md
    assert "baseline latency: 1 s" in md
    header = "| " + " | ".join(rp.COLUMNS) + " |"
    assert header in md
    rows = [line for line in md.splitlines() if line.startswith("| ") and line != header]
    assert len(rows) == 2
    first = [c.strip() for c in rows[0].strip("|").split("|")]
    assert first == [
        "wan2.1-tiny.yaml",
        "easycache",
        "0.5",
        "2",
        "0.5",
        "31.2",
        "0.95",
        "—",
        "—",
        "—",
        "—",
        "4",
    ]
    assert "inf" in rows[1]
    assert "0.3333" in rows[1] and "3" in rows[1] and "123456" in rows[1]
    assert "torchvision is not installed & the AlexNet weights are missing" in md
    assert "## Notes" in md
    assert "a\\<b\\>.yaml" in md  # angle brackets escaped for Markdown renderers


def test_markdown_without_runs_or_notes() -> None:
    md = rp.render_markdown({"model": "m", "device": "cpu", "baseline": {}, "runs": []})
    assert "No runs" in md and "Notes" not in md
    assert "baseline latency: —" in md


def test_fmt_value() -> None:
    assert rp.fmt_value(None) == "—"
    assert rp.fmt_value(float("inf")) == "inf"
    assert rp.fmt_value(float("nan")) == "nan"
    assert rp.fmt_value(31.23456) == "31.23"
    assert rp.fmt_value(0.000123456) == "0.0001235"
    assert rp.fmt_value(7) == "7"


def test_html_self_contained_with_two_svgs(tmp_path: Path) -> None:
    page = rp.write_report(_report(), tmp_path)["html"].read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert page.count("<svg") == 2
    assert "<script" not in page.lower()
    assert not re.search(r"(src|href)=\"(https?:)?//", page)  # no external assets
    assert "a&lt;b&gt;.yaml" in page
    assert "a<b>.yaml" not in page
    assert "&amp; the AlexNet weights" in page
    body = page.split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    assert body.count("<tr>") == 2  # one row per run
    assert "—" in page


def test_html_scatter_points_and_inf_marker() -> None:
    svg = rp.render_quality_svg(_report()["runs"])
    assert svg.count("<circle") == 1  # the finite-PSNR run
    assert svg.count("<polygon") == 1  # the inf-PSNR run, clipped with its own marker
    assert "PSNR inf" in svg
    assert "easycache (wan2.1-tiny.yaml)" in svg


def test_html_scatter_skips_runs_without_psnr() -> None:
    runs = [{"method": "x", "speedup": 2.0, "psnr": None}, {"method": "y", "psnr": 30.0}]
    svg = rp.render_quality_svg(runs)
    assert svg.startswith("<svg") and "<circle" not in svg
    only_inf = rp.render_quality_svg([{"method": "z", "speedup": 1.5, "psnr": float("inf")}])
    assert only_inf.count("<polygon") == 1


def test_html_per_step_cells() -> None:
    runs = _report()["runs"]
    svg = rp.render_steps_svg(runs)
    assert svg.count('class="cell"') == 8  # 2 runs x 4 steps
    assert 'fill-opacity="0.000"' in svg and 'fill-opacity="1.000"' in svg
    assert 'fill-opacity="0.500"' in svg
    missing = rp.render_steps_svg([{"method": "m", "per_step_compute": [1.0, None]}])
    assert 'class="cell missing"' in missing
    assert "<svg" in rp.render_steps_svg([{"method": "m"}])
