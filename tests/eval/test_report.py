"""Tests for diffcache.eval.report: JSON round trip, Markdown table, self-contained HTML."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

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
                "macs_fraction": 0.55,
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
                "macs_fraction": None,
                "psnr": None,
                "ssim": 1.0,
                "lpips": None,
                "accuracy": None,
                "agreement": 1.0,
                "kv_bytes_peak": 123456,
                "samples": 4,
                "per_step_compute": [1.0, 0.5, 0.0, 0.0],
            },
        ],
        "notes": {
            "lpips": "torchvision is not installed & the AlexNet weights are missing",
            "psnr": "psnr is null for a<b>.yaml: its outputs equal the baseline exactly",
        },
        "requests": [{"prompt": "a cat", "negative_prompt": "blurry", "seed": 0, "steps": 4}],
    }


def test_write_report_returns_three_paths(tmp_path: Path) -> None:
    paths = rp.write_report(_report(), tmp_path / "out")
    assert set(paths) == {"json", "md", "html"}
    assert [p.name for p in paths.values()] == ["report.json", "report.md", "report.html"]
    assert all(p.is_file() and p.parent == tmp_path / "out" for p in paths.values())


def test_json_round_trip_numbers_and_nulls(tmp_path: Path) -> None:
    data = _report()
    paths = rp.write_report(data, tmp_path)
    text = paths["json"].read_text()
    raw = json.loads(text)
    assert raw["runs"][1]["psnr"] is None
    assert text.startswith('{\n  "model"')  # indent 2
    assert rp.load_report(paths["json"]) == data == raw


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_dumps_refuses_non_finite_numbers(value: float) -> None:
    data = _report()
    data["runs"][0]["psnr"] = value
    with pytest.raises(ValueError, match=r"runs\[0\]\.psnr: .* not finite"):
        rp.dumps_report(data)
    data = _report()
    data["runs"][1]["per_step_compute"][2] = value
    with pytest.raises(ValueError, match=r"per_step_compute\[2\]"):
        rp.dumps_report(data)


@pytest.mark.parametrize("value", ["inf", "31.2", True])
def test_dumps_refuses_text_and_booleans_in_numeric_fields(value: Any) -> None:
    data = _report()
    data["runs"][0]["psnr"] = value
    with pytest.raises(ValueError, match=r"runs\[0\]\.psnr: .* is not a number"):
        rp.dumps_report(data)
    data = _report()
    data["baseline"]["latency_s"] = value
    with pytest.raises(ValueError, match=r"baseline\.latency_s"):
        rp.dumps_report(data)


def test_write_report_with_a_bad_value_writes_nothing(tmp_path: Path) -> None:
    data = _report()
    data["runs"][0]["ssim"] = float("nan")
    with pytest.raises(ValueError):
        rp.write_report(data, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_json_keeps_text_fields_as_strings(tmp_path: Path) -> None:
    data = _report()
    data["runs"][0]["plan"] = "inf"
    data["notes"] = {"weird": "nan", "nested": ["a", {"b": "c"}]}
    data["requests"][0]["prompt"] = "nan"
    loaded = rp.load_report(rp.write_report(data, tmp_path)["json"])
    assert loaded["runs"][0]["plan"] == "inf"
    assert loaded["notes"] == {"weird": "nan", "nested": ["a", {"b": "c"}]}
    assert loaded["requests"][0] == {
        "prompt": "nan",
        "negative_prompt": "blurry",
        "seed": 0,
        "steps": 4,
    }


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
        "2.00×",  # no spread in this report
        "0.5",
        "0.55",
        "31.2",
        "0.95",
        "—",
        "—",
        "4",
    ]
    second = [c.strip() for c in rows[1].strip("|").split("|")]
    assert second[rp.COLUMNS.index("psnr")] == "—"
    assert "0.3333" in rows[1] and "3" in rows[1] and "123456" not in rows[1]  # a text column
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


class _Elements(HTMLParser):
    """Collects ids, img sources and svg elements of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.imgs: list[str] = []
        self.svgs = 0
        self.cells: list[str] = []
        self._cell = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        self.svgs += tag == "svg"
        self._cell = tag == "td"

    def handle_data(self, data: str) -> None:
        if self._cell:
            self.cells.append(data)
            self._cell = False


def _parse(page: str) -> _Elements:
    parser = _Elements()
    parser.feed(page)
    return parser


def test_html_self_contained_with_charts(tmp_path: Path) -> None:
    page = rp.write_report(_report(), tmp_path)["html"].read_text()
    assert page.startswith("<!DOCTYPE html>")
    found = _parse(page)
    assert {"runs", "quality", "timeline"} <= set(found.ids) and found.svgs == 2
    assert "<script" not in page.lower()
    assert not re.search(r"(src|href)=\"(https?:)?//", page)  # no external assets
    assert "a&lt;b&gt;.yaml" in page and "a<b>.yaml" not in page
    assert "&amp; the AlexNet weights" in page
    body = page.split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    assert body.count("<tr>") == 2  # one row per run
    assert "Not placed on the PSNR vs baseline (dB) panel (see the notes): a&lt;b&gt;.yaml" in page


def test_text_reports_show_text_metrics(tmp_path: Path) -> None:
    """A text model's table and charts show tokens/s, agreement, accuracy and its drop (no image
    metrics); the baseline's accuracy is in the header."""
    report = _report()
    report["baseline"].update(accuracy=0.9, tokens_per_s=50.0)
    for run in report["runs"]:
        run.update(tokens_per_s=100.0, accuracy=0.85, accuracy_drop=0.05, agreement=0.8)
    md = rp.write_report(report, tmp_path)["md"].read_text()
    assert "| " + " | ".join(rp.TEXT_COLUMNS) + " |" in md and "psnr" not in md.split("## Notes")[0]
    assert "baseline accuracy: 0.9" in md and "| 0.05 |" in md
    page = (tmp_path / "report.html").read_text()
    assert "agreement with no cache" in page and "Not placed" not in page
    assert "AlexNet" not in md and "AlexNet" not in page  # LPIPS is no column of a text table


def test_charts_are_deterministic() -> None:
    """Same report, same bytes (a copy, drawn after other charts), and other data, other
    bytes (a chart that ignored its runs would be deterministic too)."""
    import copy

    from diffcache.eval import plots

    runs = _report()["runs"]
    quality, timeline = plots.quality_svg(runs, {}), plots.timeline_svg(runs)
    other = copy.deepcopy(runs)
    other[0].update(psnr=20.0, per_step_compute=[0.0, 1.0, 1.0, 1.0])
    assert plots.quality_svg(other, {}) != quality and plots.timeline_svg(other) != timeline
    assert plots.quality_svg(copy.deepcopy(runs), {}) == quality
    assert plots.timeline_svg(copy.deepcopy(runs)) == timeline
    assert plots.left_out(runs, "psnr") == ["a<b>.yaml"]
    assert quality.startswith("<svg") and "wan2.1-tiny.yaml" in quality


def test_samples_are_written_and_embedded(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    report = _report()
    report["requests"] = [{"prompt": "a cat", "seed": 0}]
    video = np.linspace(0, 1, 5 * 8 * 6 * 3, dtype=np.float32).reshape(5, 8, 6, 3)
    media = {("baseline", 0): video}
    media.update({(r["plan"], 0): video[::-1].copy() for r in report["runs"]})
    rp.write_report(report, tmp_path, media=media)
    section = rp.load_report(tmp_path / "report.json")["samples"]
    assert section["runs"] == ["baseline", *(r["plan"] for r in report["runs"])]
    gif = tmp_path / section["files"]["baseline"][0]
    with Image.open(gif) as im:
        assert im.n_frames == 5
    with Image.open(tmp_path / section["strips"]["baseline"][0]) as strip:
        assert strip.size == (6 * 5, 8)
    found = _parse((tmp_path / "report.html").read_text())
    assert "samples" in found.ids
    assert len(found.imgs) == 2 * 3 and all(s.startswith("data:image/") for s in found.imgs)


def test_reused_folder_keeps_no_stale_samples(tmp_path: Path) -> None:
    """A second report in the same folder removes the samples of the first that it does not
    list, and leaves the user's own files there (beside the report and inside samples/)."""
    import numpy as np

    image = np.full((4, 4, 3), 0.5, dtype=np.float32)
    report = _report()
    report["requests"] = [{"prompt": "a cat", "seed": 0}, {"prompt": "a dog", "seed": 0}]
    runs = ["baseline", *(r["plan"] for r in report["runs"])]
    rp.write_report(report, tmp_path, media={(run, i): image for run in runs for i in (0, 1)})
    first = set((tmp_path / "samples").iterdir())
    assert len(first) == 2 * len(runs)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "samples" / "mine.png").write_bytes(b"mine")
    rp.write_report(report, tmp_path, media={(run, 0): image for run in runs})
    section = rp.load_report(tmp_path / "report.json")["samples"]
    listed = {tmp_path / f for files in section["files"].values() for f in files}
    assert set((tmp_path / "samples").iterdir()) == listed | {tmp_path / "samples" / "mine.png"}
    assert all(p.name.startswith("r0-") for p in listed) and len(listed) == len(runs)
    rp.write_report(_report(), tmp_path)  # no samples at all: none of ours is left
    assert [p.name for p in (tmp_path / "samples").iterdir()] == ["mine.png"]
    assert (tmp_path / "notes.txt").read_text() == "mine"
    (tmp_path / "samples" / "mine.png").unlink()
    rp.write_report(_report(), tmp_path)
    assert not (tmp_path / "samples").exists()  # our own folder goes once it is empty
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "notes.txt", "report.html", "report.json", "report.md",
    ]  # fmt: skip


def test_index_holds_every_model(tmp_path: Path) -> None:
    a, b = _report(), {**_report(), "model": "other"}
    page = rp.render_index([("one", a, tmp_path), ("two", b, tmp_path)])
    found = _parse(page)
    assert found.ids.count("quality") == 2 and {"one", "two"} <= set(found.ids)


def _leaves(obj: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    if isinstance(obj, dict):
        return [leaf for k, v in obj.items() for leaf in _leaves(v, (*path, k))]
    if isinstance(obj, list):
        return [leaf for v in obj for leaf in _leaves(v, path)]
    return [(path, obj)]


def test_real_report_holds_numbers_nulls_and_text_only_under_text_keys(tmp_path: Path) -> None:
    """A tiny eval with an identity plan (outputs equal the baseline: PSNR infinite) and a plan
    that reuses steps: the JSON has numbers or null everywhere but under the text keys."""
    from diffcache.eval.runner import evaluate
    from diffcache.generate import Request

    def plan(threshold: float, warmup: int) -> dict[str, Any]:
        options = {"threshold": threshold, "warmup_steps": warmup}
        return {"diffcache": 1, "model": "dit", "method": "easycache", "options": options}

    evaluate(
        "dit-tiny",
        [plan(0.0, 0), plan(5.0, 1)],
        tmp_path / "ev",
        prompts=["1", "2"],
        seeds=2,
        request=Request(steps=4),
        warmup=False,
    )
    text = (tmp_path / "ev" / "report.json").read_text()
    raw = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    leaves = _leaves(raw)
    assert len(leaves) > 30
    text_keys = {"model", "device", "plan", "method", "prompt", "negative_prompt", "run"}
    for path, value in leaves:
        if path[0] == "notes":
            assert isinstance(value, str), path
        elif path[0] in ("environment", "samples"):
            assert isinstance(value, (str, int)) or value is None, path
        elif path[-1] in text_keys:
            assert isinstance(value, str) or value is None, path
        else:
            ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
            assert ok, (path, value)
    same, reused = raw["runs"]
    assert same["psnr"] is None and same["ssim"] == pytest.approx(1.0)
    assert "psnr is null for dit-easycache(threshold=0.0,warmup_steps=0)" in raw["notes"]["psnr"]
    assert "equal the baseline exactly" in raw["notes"]["psnr"]
    assert isinstance(reused["psnr"], float) and reused["psnr"] > 10
    assert reused["compute_fraction"] < 1 and "threshold=5.0" not in raw["notes"]["psnr"]


def test_plan_names_tell_files_apart_and_number_repeats(tmp_path: Path) -> None:
    from diffcache.eval.runner import plan_names
    from diffcache.plan import Plan

    text = "diffcache: 1\nmodel: dit\nmethod: easycache\n"
    for folder in ("a/x", "b/x", "c"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "p.yaml").write_text(text)
    a, b, c = (Plan.load(tmp_path / f / "p.yaml") for f in ("a/x", "b/x", "c"))
    assert plan_names([a, b]) == ["a/x/p.yaml", "b/x/p.yaml"]
    assert plan_names([a, c]) == ["x/p.yaml", "c/p.yaml"]
    assert plan_names([c, c]) == ["p.yaml #1", "p.yaml #2"]
    d = {"diffcache": 1, "model": "dit", "method": "easycache"}
    assert plan_names([Plan.load(d), Plan.load(d), c]) == [
        "dit-easycache #1",
        "dit-easycache #2",
        "p.yaml",
    ]


def _kv_report() -> dict[str, Any]:
    """Two next-scale KV runs on a 2-layer model (maps 1, 2x2, 3x3, 4x4) whose plain history
    before each scale is 0, 1, 5, 14 rows x 1 KiB."""
    report = _report()
    plain = [0, 1024, 5 * 1024, 14 * 1024]
    for run, kept in zip(report["runs"], ([0, 1024, 5 * 1024, 7 * 1024], plain), strict=True):
        run.update(
            kv_cache_fraction=kept[-1] / plain[-1],
            kv_history_bytes=[float(b) for b in kept],
            kv_history_plain=plain,
        )
    return report


def test_kv_runs_get_a_per_scale_chart_and_kv_columns(tmp_path: Path) -> None:
    from diffcache.eval import plots

    report = _kv_report()
    fig = plots.kv_figure(report["runs"])
    lines = {line.get_label(): list(line.get_ydata()) for line in fig.axes[0].get_lines()}
    assert lines["no compression"] == [0.0, 1.0, 5.0, 14.0]  # KiB
    assert lines["wan2.1-tiny.yaml, KV 50% of plain, PSNR 31.2 dB"] == [0.0, 1.0, 5.0, 7.0]
    assert lines["a<b>.yaml, KV 100% of plain"] == [0.0, 1.0, 5.0, 14.0]
    assert fig.axes[0].get_ylabel() == "history KV (KiB)"
    found = _parse(rp.write_report(report, tmp_path)["html"].read_text())
    assert "kv" in found.ids and found.svgs == 3
    assert rp.columns(report["runs"])[-4:] == (
        "kv_cache_fraction",
        "kv_bytes_peak",
        "attn_macs_fraction",
        "samples",
    )
    assert "kv_cache_fraction" not in rp.columns(_report()["runs"])


@pytest.mark.parametrize(
    ("most", "unit"), [(1023, (1.0, "B")), (1024, (1024.0, "KiB")), (3 * 2**30, (2**30, "GiB"))]
)
def test_byte_unit(most: int, unit: tuple[float, str]) -> None:
    from diffcache.eval.plots import byte_unit

    assert byte_unit(most) == unit
