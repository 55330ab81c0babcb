"""Evaluation reports: one dict written as report.json, report.md and report.html.

The dict (extra keys are allowed and kept in the JSON)::

    {"model": str, "device": str, "baseline": {"latency_s": float, "peak_mem_bytes": int},
     "runs": [{"plan", "method", "latency_s", "speedup", "compute_fraction", "psnr", "ssim",
               "lpips", "accuracy", "agreement", "kv_bytes_peak", "samples",
               "per_step_compute": [float, ...]}, ...],
     "notes": {"lpips": "why it is null", ...}}

JSON has no inf or nan, so the JSON writer stores those floats as the strings "inf", "-inf" and
"nan"; :func:`load_report` turns them back into floats (except under text keys and in "notes").
Markdown and HTML show None as "—", inf as "inf" and other floats with 4 significant digits.
The HTML page is self-contained: inline CSS and two inline SVG plots drawn here (no scripts).
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: Table columns, in order, for both the Markdown and the HTML report.
COLUMNS: tuple[str, ...] = (
    "plan",
    "method",
    "latency_s",
    "speedup",
    "compute_fraction",
    "psnr",
    "ssim",
    "lpips",
    "agreement",
    "accuracy",
    "kv_bytes_peak",
    "samples",
)
#: Keys whose string values are never turned into floats by :func:`load_report`.
TEXT_KEYS = frozenset({"model", "device", "plan", "method", "notes"})
NULL = "—"
_SPECIAL_FLOATS = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


# ----------------------------------------------------------------------------- JSON


def _to_jsonable(obj: Any) -> Any:
    """Copy ``obj`` with inf/nan floats as strings, tuples as lists, numpy/torch unwrapped."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        if math.isnan(obj):
            return "nan"
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return float(obj)
    if isinstance(obj, dict):
        return {str(k): _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy scalars/arrays, torch tensors
        return _to_jsonable(obj.tolist())
    return obj


def _from_jsonable(obj: Any, key: str | None = None) -> Any:
    """Undo :func:`_to_jsonable`'s inf/nan strings outside text keys."""
    if key in TEXT_KEYS:
        return obj
    if isinstance(obj, str):
        return _SPECIAL_FLOATS.get(obj, obj)
    if isinstance(obj, dict):
        return {k: _from_jsonable(v, k) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_jsonable(v, key) for v in obj]
    return obj


def dumps_report(report: dict[str, Any]) -> str:
    """The report as JSON text (indent 2; inf/nan as the strings "inf"/"-inf"/"nan")."""
    return json.dumps(_to_jsonable(report), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def load_report(path: str | Path) -> dict[str, Any]:
    """Read a report.json, turning "inf"/"-inf"/"nan" strings back into floats."""
    with open(path, encoding="utf-8") as fh:
        return _from_jsonable(json.load(fh))


# ----------------------------------------------------------------------------- formatting


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def fmt_value(value: Any) -> str:
    """A cell value as text: None -> "—", inf -> "inf", floats to 4 significant digits."""
    if value is None:
        return NULL
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt_value(v) for v in value)
    return str(value)


def _md_text(text: str) -> str:
    """Escape text for a Markdown table cell or list item (pipes, angle brackets, newlines)."""
    for char in ("\\", "|", "<", ">", "`"):
        text = text.replace(char, "\\" + char)
    return " ".join(text.splitlines())


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _runs(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in report.get("runs") or [] if isinstance(r, dict)]


def _baseline(report: dict[str, Any]) -> dict[str, Any]:
    base = report.get("baseline")
    return base if isinstance(base, dict) else {}


def _note_items(notes: Any) -> list[tuple[str | None, str]]:
    """Notes as (key or None, text) pairs, whether given as a dict, a list or a string."""
    if not notes:
        return []
    if isinstance(notes, dict):
        return [(str(k), str(v)) for k, v in notes.items()]
    if isinstance(notes, (list, tuple)):
        return [(None, str(v)) for v in notes]
    return [(None, str(notes))]


def _title(report: dict[str, Any]) -> str:
    return f"diffcache report: {report.get('model', 'unknown model')}"


def _header_facts(report: dict[str, Any]) -> list[tuple[str, str]]:
    base = _baseline(report)
    latency = base.get("latency_s")
    facts = [
        ("model", fmt_value(report.get("model"))),
        ("device", fmt_value(report.get("device"))),
        ("baseline latency", fmt_value(latency) + (" s" if _is_number(latency) else "")),
    ]
    if "peak_mem_bytes" in base:
        mem = base.get("peak_mem_bytes")
        facts.append(("baseline peak memory", fmt_value(mem) + (" B" if _is_number(mem) else "")))
    return facts


# ----------------------------------------------------------------------------- Markdown


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: header, one table row per run, then the notes."""
    lines = [f"# {_md_text(_title(report))}", ""]
    lines += [f"- {name}: {_md_text(text)}" for name, text in _header_facts(report)]
    lines += ["", "## Runs", ""]
    runs = _runs(report)
    if runs:
        lines.append("| " + " | ".join(COLUMNS) + " |")
        lines.append("|" + "|".join("---" for _ in COLUMNS) + "|")
        for run in runs:
            cells = [_md_text(fmt_value(run.get(col))) for col in COLUMNS]
            lines.append("| " + " | ".join(cells) + " |")
    else:
        lines.append("_No runs._")
    notes = _note_items(report.get("notes"))
    if notes:
        lines += ["", "## Notes", ""]
        for key, text in notes:
            prefix = f"**{_md_text(key)}**: " if key is not None else ""
            lines.append(f"- {prefix}{_md_text(text)}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- SVG plots


def _nice_step(span: float, target: int = 5) -> float:
    """A 1/2/5 x 10^k tick step giving about ``target`` ticks over ``span``."""
    raw = span / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw))
    for mult in (1, 2, 5, 10):
        if raw <= mult * mag:
            return mult * mag
    return 10 * mag


def _ticks(lo: float, hi: float) -> list[float]:
    step = _nice_step(hi - lo)
    first = math.ceil(lo / step) * step
    out: list[float] = []
    value = first
    while value <= hi + step * 1e-9 and len(out) < 50:
        out.append(round(value, 12))
        value += step
    return out


def _padded_range(
    values: Sequence[float], include: float | None, min_span: float
) -> tuple[float, float]:
    vals = list(values) + ([include] if include is not None else [])
    lo, hi = min(vals), max(vals)
    if hi - lo < min_span:
        mid = (lo + hi) / 2
        lo, hi = mid - min_span / 2, mid + min_span / 2
    pad = (hi - lo) * 0.08
    return lo - pad, hi + pad


def _run_label(run: dict[str, Any]) -> str:
    method = run.get("method")
    plan = run.get("plan")
    if method and plan:
        return f"{method} ({plan})"
    return str(method or plan or "run")


def _svg_message(width: int, height: int, title: str, message: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{_esc(title)}">'
        f'<text x="{width / 2:.1f}" y="{height / 2:.1f}" text-anchor="middle" '
        f'class="muted">{_esc(message)}</text></svg>'
    )


def render_quality_svg(runs: Sequence[dict[str, Any]]) -> str:
    """Scatter of PSNR (y) against speedup (x), one labelled point per run.

    Runs without a finite speedup or without a PSNR are skipped; an infinite PSNR (output equal
    to the baseline) is drawn at the highest finite PSNR with a triangle and an "inf" label.
    """
    width, height = 720, 400
    left, right, top, bottom = 64, 200, 24, 52
    title = "PSNR vs speedup"
    points: list[tuple[float, float, dict[str, Any]]] = []
    for run in runs:
        x, y = run.get("speedup"), run.get("psnr")
        if not (_is_number(x) and math.isfinite(x)) or not _is_number(y) or math.isnan(y):
            continue
        if y == -math.inf:
            continue
        points.append((float(x), float(y), run))
    if not points:
        return _svg_message(width, 120, title, "no run has both a speedup and a PSNR")

    finite_y = [y for _, y, _ in points if math.isfinite(y)]
    y_cap = max(finite_y) if finite_y else 40.0
    x_lo, x_hi = _padded_range([x for x, _, _ in points], 1.0, 0.5)
    y_lo, y_hi = _padded_range(finite_y or [y_cap], None, 2.0)
    plot_w, plot_h = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * plot_w

    def sy(y: float) -> float:
        return top + (1 - (y - y_lo) / (y_hi - y_lo)) * plot_h

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{_esc(title)}">',
        f"<title>{_esc(title)}</title>",
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" class="frame"/>',
    ]
    for tx in _ticks(x_lo, x_hi):
        px = sx(tx)
        parts.append(
            f'<line x1="{px:.1f}" y1="{top}" x2="{px:.1f}" y2="{top + plot_h}" class="grid"/>'
        )
        parts.append(
            f'<text x="{px:.1f}" y="{top + plot_h + 16}" text-anchor="middle" class="tick">'
            f"{_esc(fmt_value(tx))}</text>"
        )
    for ty in _ticks(y_lo, y_hi):
        py = sy(ty)
        parts.append(
            f'<line x1="{left}" y1="{py:.1f}" x2="{left + plot_w}" y2="{py:.1f}" class="grid"/>'
        )
        parts.append(
            f'<text x="{left - 6}" y="{py + 4:.1f}" text-anchor="end" class="tick">'
            f"{_esc(fmt_value(ty))}</text>"
        )
    if x_lo <= 1.0 <= x_hi:
        px = sx(1.0)
        parts.append(
            f'<line x1="{px:.1f}" y1="{top}" x2="{px:.1f}" y2="{top + plot_h}" class="base"/>'
            f'<text x="{px + 4:.1f}" y="{top + 12}" class="tick">baseline</text>'
        )
    parts.append(
        f'<text x="{left + plot_w / 2:.1f}" y="{height - 12}" text-anchor="middle" class="axis">'
        "speedup (×)</text>"
        f'<text x="16" y="{top + plot_h / 2:.1f}" text-anchor="middle" class="axis" '
        f'transform="rotate(-90 16 {top + plot_h / 2:.1f})">PSNR (dB)</text>'
    )
    for x, y, run in points:
        px = sx(x)
        is_inf = math.isinf(y)
        py = sy(y_cap if is_inf else y)
        label = _run_label(run) + (" [PSNR inf]" if is_inf else "")
        tip = f"{_run_label(run)}: speedup {fmt_value(x)}×, PSNR {fmt_value(y)} dB"
        if is_inf:
            shape = (
                f'<polygon points="{px:.1f},{py - 6:.1f} {px - 6:.1f},{py + 5:.1f} '
                f'{px + 6:.1f},{py + 5:.1f}" class="pt inf"/>'
            )
        else:
            shape = f'<circle cx="{px:.1f}" cy="{py:.1f}" r="5" class="pt"/>'
        parts.append(
            f"<g><title>{_esc(tip)}</title>{shape}"
            f'<text x="{px + 8:.1f}" y="{py - 6:.1f}" class="label">{_esc(label)}</text></g>'
        )
    parts.append("</svg>")
    return "".join(parts)


def render_steps_svg(runs: Sequence[dict[str, Any]]) -> str:
    """Per-step compute: one row of cells per run, each filled by the fraction computed.

    0 = the step was skipped (served from cache), 1 = fully computed; a missing value is drawn
    as a dashed empty cell. Runs without ``per_step_compute`` are left out.
    """
    title = "Per-step compute"
    rows = [
        (run, list(run["per_step_compute"]))
        for run in runs
        if isinstance(run.get("per_step_compute"), (list, tuple)) and run["per_step_compute"]
    ]
    if not rows:
        return _svg_message(720, 60, title, "no run recorded per-step compute")
    label_w, right, top, row_h, gap = 220, 56, 28, 14, 6
    n_steps = max(len(steps) for _, steps in rows)
    cell = max(3.0, min(16.0, 560.0 / n_steps))
    width = max(int(label_w + cell * n_steps + right), label_w + 480)  # room for the legend
    height = int(top + len(rows) * (row_h + gap) + 30)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{_esc(title)}">',
        f"<title>{_esc(title)}</title>",
    ]
    tick_every = next(k for k in (1, 2, 5, 10, 20, 50, 100, 10**9) if n_steps / k <= 12)
    for i in range(0, n_steps, tick_every):
        parts.append(
            f'<text x="{label_w + (i + 0.5) * cell:.1f}" y="{top - 8}" text-anchor="middle" '
            f'class="tick">{i}</text>'
        )
    for r, (run, steps) in enumerate(rows):
        y = top + r * (row_h + gap)
        parts.append(
            f'<text x="{label_w - 8}" y="{y + row_h - 3}" text-anchor="end" class="label">'
            f"{_esc(_run_label(run))}</text>"
        )
        known: list[float] = []
        for i, value in enumerate(steps):
            x = label_w + i * cell
            size = f'x="{x:.1f}" y="{y}" width="{cell:.1f}" height="{row_h}"'
            if _is_number(value) and math.isfinite(value):
                frac = min(1.0, max(0.0, float(value)))
                known.append(frac)
                parts.append(
                    f'<rect {size} class="cell" fill-opacity="{frac:.3f}">'
                    f"<title>step {i}: {_esc(fmt_value(float(value)))} computed</title></rect>"
                )
            else:
                parts.append(
                    f'<rect {size} class="cell missing"><title>step {i}: unknown</title></rect>'
                )
        if known:
            avg = sum(known) / len(known)
            parts.append(
                f'<text x="{label_w + cell * n_steps + 6:.1f}" y="{y + row_h - 3}" class="tick">'
                f"{_esc(fmt_value(avg))}</text>"
            )
    legend_y = top + len(rows) * (row_h + gap) + 14
    parts.append(
        f'<text x="{label_w}" y="{legend_y}" class="tick">step index →; fill = fraction computed '
        "(empty = skipped, full = computed); right: mean</text>"
    )
    parts.append("</svg>")
    return "".join(parts)


# ----------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.muted { fill: #777; font-size: 13px; }
svg text { font-family: system-ui, sans-serif; }
.frame { fill: none; stroke: #999; }
.grid { stroke: #eee; }
.base { stroke: #aaa; stroke-dasharray: 4 3; }
.tick { fill: #555; font-size: 11px; }
.axis { fill: #333; font-size: 12px; }
.label { fill: #222; font-size: 11px; }
.pt { fill: #2b6cb0; stroke: #fff; }
.pt.inf { fill: #c05621; }
.cell { fill: #2b6cb0; stroke: #bbb; stroke-width: 0.5; }
.cell.missing { fill: none; stroke-dasharray: 2 2; }
"""


def render_html(report: dict[str, Any]) -> str:
    """The report as one self-contained HTML page (inline CSS and SVG, no scripts)."""
    runs = _runs(report)
    title = _title(report)
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_esc(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head><body>",
        f"<h1>{_esc(title)}</h1>",
        "<ul>",
    ]
    out += [f"<li>{_esc(name)}: {_esc(text)}</li>" for name, text in _header_facts(report)]
    out += ["</ul>", "<h2>Runs</h2>"]
    if runs:
        out.append("<table><thead><tr>" + "".join(f"<th>{_esc(c)}</th>" for c in COLUMNS))
        out.append("</tr></thead><tbody>")
        for run in runs:
            cells = []
            for col in COLUMNS:
                value = run.get(col)
                cls = ' class="num"' if _is_number(value) or value is None else ""
                cells.append(f"<td{cls}>{_esc(fmt_value(value))}</td>")
            out.append("<tr>" + "".join(cells) + "</tr>")
        out.append("</tbody></table>")
    else:
        out.append("<p>No runs.</p>")
    out += ["<h2>Quality vs speedup</h2>", render_quality_svg(runs)]
    out += ["<h2>Per-step compute</h2>", render_steps_svg(runs)]
    notes = _note_items(report.get("notes"))
    if notes:
        out += ["<h2>Notes</h2>", "<ul>"]
        for key, text in notes:
            prefix = f"<strong>{_esc(key)}</strong>: " if key is not None else ""
            out.append(f"<li>{prefix}{_esc(text)}</li>")
        out.append("</ul>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- entry point


def write_report(report: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write report.json, report.md and report.html into ``out_dir`` (created if needed).

    Returns the paths keyed "json", "md" and "html".
    """
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": directory / "report.json",
        "md": directory / "report.md",
        "html": directory / "report.html",
    }
    paths["json"].write_text(dumps_report(report), encoding="utf-8")
    paths["md"].write_text(render_markdown(report), encoding="utf-8")
    paths["html"].write_text(render_html(report), encoding="utf-8")
    return paths
