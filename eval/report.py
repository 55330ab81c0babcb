"""Evaluation reports: one dict written as report.json, report.md and report.html.

The dict (extra keys are allowed and kept in the JSON)::

    {"model": str, "device": str, "baseline": {"latency_s": float, "peak_mem_bytes": int},
     "runs": [{"plan", "method", "latency_s", "speedup", "compute_fraction", "psnr", "ssim",
               "lpips", "accuracy", "agreement", "kv_bytes_peak", "samples",
               "per_step_compute": [float, ...]}, ...],
     "notes": {"psnr": "why it is null", "lpips": "why it is null", ...},
     "requests": [{"prompt": str, "seed": int, ...}, ...]}

Contract of report.json: every value is a JSON number or null, except strings under the
:data:`TEXT_KEYS` (and anything inside ``notes``). A metric that is not finite (the PSNR of an
output equal to its baseline) is null, and ``notes`` says why; the producer (the eval runner)
decides that. :func:`dumps_report` refuses inf/nan, booleans and strings in numeric fields with a
ValueError instead of converting them, so a bad value cannot reach a report file silently.
Markdown and HTML show null as "—" and floats with 4 significant digits.
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
#: Keys whose values are text (every other leaf of a report is a number or null). ``notes`` may
#: hold anything JSON-able; ``prompt`` and ``negative_prompt`` appear in ``requests``.
TEXT_KEYS = frozenset({"model", "device", "plan", "method", "notes", "prompt", "negative_prompt"})
NULL = "—"


# ----------------------------------------------------------------------------- JSON


def _to_jsonable(obj: Any, where: str = "report", text: bool = False) -> Any:
    """Copy ``obj`` as plain JSON data (tuples as lists, numpy/torch unwrapped), checking the
    contract: numbers are finite, strings and booleans only where text is allowed."""
    if hasattr(obj, "tolist") and not isinstance(obj, (int, float, str)):  # numpy, torch
        obj = obj.tolist()
    if isinstance(obj, Path):
        obj = str(obj)
    if obj is None:
        return None
    if isinstance(obj, dict):
        return {
            str(k): _to_jsonable(v, f"{where}.{k}", text or str(k) in TEXT_KEYS)
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v, f"{where}[{i}]", text) for i, v in enumerate(obj)]
    if isinstance(obj, (str, bool)):
        if text:
            return obj
        raise ValueError(
            f"{where}: {obj!r} is not a number; report values are numbers or null (text only "
            f"under {', '.join(sorted(TEXT_KEYS))})"
        )
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError(
                f"{where}: {obj} is not finite; write null and explain it in notes instead"
            )
        return float(obj)
    raise ValueError(f"{where}: cannot store a {type(obj).__name__} in a report")


def dumps_report(report: dict[str, Any]) -> str:
    """The report as JSON text (indent 2). ValueError on a non-finite number, or a string or
    boolean outside the text keys."""
    return json.dumps(_to_jsonable(report), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def load_report(path: str | Path) -> dict[str, Any]:
    """Read a report.json (plain JSON: numbers, null and text)."""
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


# ----------------------------------------------------------------------------- formatting


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def fmt_value(value: Any) -> str:
    """A cell value as text: None -> "—", floats to 4 significant digits (inf/nan, which a
    report file never holds, as "inf"/"nan")."""
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


def _plottable(run: dict[str, Any]) -> bool:
    x, y = run.get("speedup"), run.get("psnr")
    return all(_is_number(v) and math.isfinite(v) for v in (x, y))


def unplotted(runs: Sequence[dict[str, Any]]) -> list[str]:
    """Labels of the runs the PSNR scatter leaves out (no speedup or no PSNR)."""
    return [_run_label(run) for run in runs if not _plottable(run)]


def render_quality_svg(runs: Sequence[dict[str, Any]]) -> str:
    """Scatter of PSNR (y) against speedup (x), one labelled point per run.

    Runs without a finite speedup and a finite PSNR are left out (:func:`unplotted` names them).
    """
    width, height = 720, 400
    left, right, top, bottom = 64, 200, 24, 52
    title = "PSNR vs speedup"
    points = [(float(run["speedup"]), float(run["psnr"]), run) for run in runs if _plottable(run)]
    if not points:
        return _svg_message(width, 120, title, "no run has both a speedup and a PSNR")

    x_lo, x_hi = _padded_range([x for x, _, _ in points], 1.0, 0.5)
    y_lo, y_hi = _padded_range([y for _, y, _ in points], None, 2.0)
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
        px, py = sx(x), sy(y)
        label = _run_label(run)
        tip = f"{label}: speedup {fmt_value(x)}×, PSNR {fmt_value(y)} dB"
        parts.append(
            f"<g><title>{_esc(tip)}</title>"
            f'<circle cx="{px:.1f}" cy="{py:.1f}" r="5" class="pt"/>'
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
    left_out = unplotted(runs)
    if left_out:
        out.append(
            f"<p>Not plotted (PSNR or speedup is null, see the notes): {_esc(', '.join(left_out))}"
            "</p>"
        )
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

    Everything is rendered first: a report that breaks the JSON contract (ValueError) leaves no
    file and no folder behind. Returns the paths keyed "json", "md" and "html".
    """
    texts = {
        "json": dumps_report(report),
        "md": render_markdown(report),
        "html": render_html(report),
    }
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for kind, text in texts.items():
        paths[kind] = directory / f"report.{kind}"
        paths[kind].write_text(text, encoding="utf-8")
    return paths
