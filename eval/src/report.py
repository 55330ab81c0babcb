"""Evaluation reports: one dict written as report.json, report.md and report.html.

The dict (extra keys are allowed and kept in the JSON)::

    {"model": str, "device": str, "baseline": {"latency_s": float, "peak_mem_bytes": int},
     "runs": [{"plan", "method", "latency_s", "speedup", "speedup_spread": [low, high],
               "compute_fraction", "macs_fraction", "psnr", "ssim",
               "lpips", "accuracy", "agreement", "kv_bytes_peak", "samples",
               "per_step_compute": [float, ...],
               # next-scale KV methods: the history before each scale, the plain model's, and
               # the geometry that gives the plain one (diffcache.kv.memory.Geometry); the
               # attention MACs (QK^T + AV over the key rows attended) per scale, the plain
               # cache's, and their sums' ratio (macs_fraction counts Linear layers only)
               "kv_cache_fraction", "kv_history_bytes": [...], "kv_history_plain": [...],
               "attn_macs_fraction", "kv_attn_macs": [...], "kv_attn_macs_plain": [...],
               "kv_geometry": {"layers", "heads", "head_dim", "rows", "k_bytes", "v_bytes",
                               "schedule": [[h, w], ...]}}, ...],
     "notes": {"psnr": "why it is null", "lpips": "why it is null", ...},
     "lora": {"adapters": {name: weight}, "fused": bool, "sha256": str},  # with a LoRA only
     "requests": [{"prompt": str, "seed": int, ...}, ...]}

Contract of report.json: every value is a JSON number or null, except strings under the
:data:`TEXT_KEYS` (and anything inside ``notes``). A metric that is not finite (the PSNR of an
output equal to its baseline) is null, and ``notes`` says why; the producer (the eval runner)
decides that. :func:`dumps_report` refuses inf/nan, booleans and strings in numeric fields with a
ValueError instead of converting them, so a bad value cannot reach a report file silently.
Markdown and HTML show null as "—" and floats with 4 significant digits; the speedup as
``1.38× (1.31–1.44)`` (median of the paired per-round ratios, and their range: ``eval/timing.py``),
flagged with "⚠" when it is above the ideal of its compute fraction (a measurement problem), and
a compute fraction above 1 flagged as costing more than no cache.
The HTML page is self-contained (no scripts): inline CSS, the matplotlib charts of
``eval/plots.py`` as inline SVG, and the sample grid of ``eval/samples.py`` as data URIs.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffcache.lora import describe

#: Table columns, in order, for both the Markdown and the HTML report of image / video models.
COLUMNS: tuple[str, ...] = (
    "plan",
    "method",
    "latency_s",
    "speedup",
    "compute_fraction",
    "macs_fraction",
    "psnr",
    "ssim",
    "lpips",
    "task_score",
    "samples",
)
#: The same for text models (their runs carry ``tokens_per_s``).
TEXT_COLUMNS: tuple[str, ...] = (
    "plan",
    "method",
    "latency_s",
    "speedup",
    "tokens_per_s",
    "compute_fraction",
    "macs_fraction",
    "agreement",
    "accuracy",
    "accuracy_drop",
    "kv_bytes_peak",
    "samples",
)


#: Columns of next-scale KV runs (VAR, Infinity), shown before ``samples``.
KV_COLUMNS: tuple[str, ...] = ("kv_cache_fraction", "kv_bytes_peak", "attn_macs_fraction")


def columns(runs: Sequence[dict[str, Any]]) -> tuple[str, ...]:
    """The table columns for these runs: text or image / video metrics, with the KV cache's
    for runs of a next-scale KV method."""
    from diffcache.eval.plots import is_text

    if is_text(runs):
        return TEXT_COLUMNS
    if any("kv_cache_fraction" in r for r in runs):
        return COLUMNS[:-1] + KV_COLUMNS + COLUMNS[-1:]
    return COLUMNS


#: Keys whose values are text (every other leaf of a report is a number or null). ``notes`` may
#: hold anything JSON-able; ``prompt`` and ``negative_prompt`` appear in ``requests``.
TEXT_KEYS = frozenset(
    {
        "model",
        "device",
        "plan",
        "method",
        "notes",
        "prompt",
        "negative_prompt",
        "run",
        "samples",
        "environment",
        "trace",
        "lora",
    }
)
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


def speedup_text(run: dict[str, Any]) -> str:
    """A run's speedup with its spread, ``1.38× (1.31–1.44)``; one above the ideal of its
    compute fraction is flagged as the measurement problem it is, not shown as a result."""
    from diffcache.eval.timing import above_ideal, ideal_speedup

    speedup, spread = run.get("speedup"), run.get("speedup_spread")
    if not _is_number(speedup):
        return fmt_value(speedup)
    text = f"{speedup:.2f}×"
    if isinstance(spread, (list, tuple)) and len(spread) == 2 and all(map(_is_number, spread)):
        text += f" ({spread[0]:.2f}–{spread[1]:.2f})"
    cf = run.get("compute_fraction")
    if above_ideal(speedup, cf):
        return f"⚠ {text} above the ideal {ideal_speedup(cf):.2f}×: a measurement problem"
    return text


def cell(run: dict[str, Any], col: str) -> str:
    """A run's table cell: the speedup with its spread, a compute fraction above 1 marked as
    costing more than no cache, anything else by :func:`fmt_value`."""
    value = run.get(col)
    if col == "speedup":
        return speedup_text(run)
    if col == "compute_fraction" and _is_number(value) and value > 1:
        return f"⚠ {fmt_value(value)}: costs more than no cache"
    return fmt_value(value)


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


#: metrics the page shows outside the table (header facts, the per-step chart), whose notes are
#: shown beside those of the table's columns
SHOWN_ELSEWHERE = ("latency_s", "peak_mem_bytes", "per_step_compute")


def _note_items(report: dict[str, Any]) -> list[tuple[str | None, str]]:
    """The notes as (key or None, text) pairs, whether given as a dict, a list or a string; of a
    dict, those of the metrics the page shows (report.json keeps every note)."""
    notes = report.get("notes")
    if not notes:
        return []
    if isinstance(notes, dict):
        shown = {*columns(_runs(report)), *SHOWN_ELSEWHERE}
        return [(str(k), str(v)) for k, v in notes.items() if k in shown]
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
        *([("adapters", describe(report["lora"]))] if report.get("lora") else []),
        ("baseline latency", fmt_value(latency) + (" s" if _is_number(latency) else "")),
    ]
    if "peak_mem_bytes" in base:
        mem = base.get("peak_mem_bytes")
        facts.append(("baseline peak memory", fmt_value(mem) + (" B" if _is_number(mem) else "")))
    for key in ("task_score", "accuracy", "tokens_per_s"):
        if _is_number(base.get(key)):
            facts.append((f"baseline {key.replace('_', ' ')}", fmt_value(base[key])))
    return facts


# ----------------------------------------------------------------------------- Markdown


def _md_cell(run: dict[str, Any], col: str, task: str, flips: dict[str, Any]) -> str:
    """A Markdown cell: the value, and beside the task measure the samples lost / won."""
    from diffcache.eval.paired import describe

    text = cell(run, col)
    if col == task and run.get("plan") in flips:
        text += f" ({describe(*flips[run['plan']])})"
    return text


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: header, one table row per run, then the notes."""
    lines = [f"# {_md_text(_title(report))}", ""]
    lines += [f"- {name}: {_md_text(text)}" for name, text in _header_facts(report)]
    lines += ["", "## Runs", ""]
    runs = _runs(report)
    if runs:
        cols = columns(runs)
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "|".join("---" for _ in cols) + "|")
        task, flips = _flips(report)
        for run in runs:
            cells = [_md_text(_md_cell(run, col, task, flips)) for col in cols]
            lines.append("| " + " | ".join(cells) + " |")
        if flips:
            lines += ["", FLIPS_NOTE]
    else:
        lines.append("_No runs._")
    notes = _note_items(report)
    if notes:
        lines += ["", "## Notes", ""]
        for key, text in notes:
            prefix = f"**{_md_text(key)}**: " if key is not None else ""
            lines.append(f"- {prefix}{_md_text(text)}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; }
figure svg { max-width: 100%; height: auto; }
img.sample { width: 128px; image-rendering: pixelated; }
img.strip { image-rendering: pixelated; }
table.grid th { font-weight: normal; overflow-wrap: anywhere; }
pre { white-space: pre-wrap; margin: 0; }
.flips { font-size: 0.8em; color: #555; }
span.flips { white-space: nowrap; }
table.grid { table-layout: fixed; width: 100%; }
table.grid th:first-child { width: 10em; }
table.grid img { max-width: 100%; }
img.strip { width: 100%; height: auto; }
table.grid pre { overflow-wrap: anywhere; }
"""


def _flips(report: dict[str, Any]) -> tuple[str, dict[str, tuple[int, int, float]]]:
    """The task measure's column and, per run, its samples lost / won against the baseline and
    the sign test's p (from the report's records; {} without them)."""
    from diffcache.eval.paired import flips
    from diffcache.eval.plots import task_metric

    task = task_metric(_runs(report))
    return task, flips(report, task)


#: what the lost / won beside a task measure means (shown under the table)
FLIPS_NOTE = (
    "lost / won: samples the run scores worse / better on than the baseline, same request and "
    "seed; p: two-sided exact sign test of that split (below 0.05: more than which samples "
    "happen to flip)."
)


def _table(runs: Sequence[dict[str, Any]], task: str = "", flips: Any = None) -> str:
    if not runs:
        return "<p>No runs.</p>"
    from diffcache.eval.paired import describe

    # a header may break after an underscore, so the wide runs table fits the page
    cols = columns(runs)
    heads = "".join(f"<th>{_esc(c).replace('_', '_<wbr>')}</th>" for c in cols)
    out = ['<table id="runs"><thead><tr>' + heads]
    out.append("</tr></thead><tbody>")
    for run in runs:
        cells = []
        for col in cols:
            value = run.get(col)
            cls = ' class="num"' if _is_number(value) or value is None else ""
            text = _esc(cell(run, col))
            if col == task and (flips or {}).get(run.get("plan")):
                text += f'<br><span class="flips">{_esc(describe(*flips[run["plan"]]))}</span>'
            cells.append(f"<td{cls}>{text}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    if flips:
        out.append(f'<p class="flips">{_esc(FLIPS_NOTE)}</p>')
    return "\n".join(out)


def _environment(report: dict[str, Any]) -> str:
    env = report.get("environment") or {}
    if not env:
        return ""
    rows = "".join(
        f"<tr><th>{_esc(k)}</th><td>{_esc(fmt_value(v))}</td></tr>" for k, v in env.items()
    )
    return f'<table id="environment">{rows}</table>'


def render_section(report: dict[str, Any], out_dir: Path | None = None, level: int = 2) -> str:
    """The body of one model's report: facts, environment, table, charts, samples, notes."""
    from diffcache.eval import plots
    from diffcache.eval.samples import grid_html

    runs, h = _runs(report), f"h{level}"
    out = ["<ul>"]
    out += [f"<li>{_esc(name)}: {_esc(text)}</li>" for name, text in _header_facts(report)]
    task, flips = _flips(report)
    out += ["</ul>", _environment(report), f"<{h}>Runs</{h}>", _table(runs, task, flips)]
    out += [f"<{h}>Quality vs speedup</{h}>", '<figure id="quality">']
    out += [plots.quality_svg(runs, _baseline(report), flips), "</figure>"]
    first = plots.panels(runs, _baseline(report))[0]
    skipped = plots.left_out(runs, first[0])
    if skipped:
        out.append(
            f"<p>Not placed on the {_esc(first[1])} panel (see the notes): "
            f"{_esc(', '.join(skipped))}</p>"
        )
    if any(r.get("kv_history_bytes") for r in runs):
        out += [f"<{h}>KV cache per scale</{h}>", '<figure id="kv">', plots.kv_svg(runs)]
        out += [f"<figcaption>{_esc(plots.KV_CAPTION)}</figcaption>", "</figure>"]
    out += [f"<{h}>Computed vs reused work per step</{h}>", '<figure id="timeline">']
    out += [plots.timeline_svg(runs), "</figure>"]
    if out_dir is not None and report.get("samples"):
        out += [f"<{h}>Samples</{h}>", grid_html(report, out_dir)]
    notes = _note_items(report)
    if notes:
        out += [f"<{h}>Notes</{h}>", "<ul>"]
        for key, text in notes:
            prefix = f"<strong>{_esc(key)}</strong>: " if key is not None else ""
            out.append(f"<li>{prefix}{_esc(text)}</li>")
        out.append("</ul>")
    return "\n".join(out)


def _page(title: str, body: str) -> str:
    head = '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
    head += f"<title>{_esc(title)}</title><style>{_CSS}</style></head>"
    return f"{head}<body><h1>{_esc(title)}</h1>\n{body}\n</body></html>\n"


def render_html(report: dict[str, Any], out_dir: str | Path | None = None) -> str:
    """The report as one self-contained HTML page (inline CSS, inline SVG charts, samples as
    data URIs read from ``out_dir``; no scripts)."""
    return _page(_title(report), render_section(report, Path(out_dir) if out_dir else None))


def render_index(reports: Sequence[tuple[str, dict[str, Any], Path]]) -> str:
    """One page with several models' reports: (title, report, folder of its report files)."""
    body = "\n".join(
        f'<section id="{_esc(title)}"><h2>{_esc(title)}</h2>\n'
        f"{render_section(r, folder, 3)}</section>"
        for title, r, folder in reports
    )
    return _page("diffcache demo", body)


# ----------------------------------------------------------------------------- entry point


def write_report(
    report: dict[str, Any], out_dir: str | Path, media: dict[tuple[str, int], Any] | None = None
) -> dict[str, Path]:
    """Write report.json, report.md and report.html (and ``samples/`` from ``media``: the output
    of (run or "baseline", request index)) into ``out_dir``, created if needed. The sample
    files of an earlier report there are removed first; other files are left alone.

    The JSON is checked first: a report that breaks its contract (ValueError) leaves no file
    and no folder behind. Returns the paths keyed "json", "md" and "html".
    """
    plain = json.loads(dumps_report(report))  # checked, and numpy / tuples made plain
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    from diffcache.eval.samples import remove_samples, write_samples

    remove_samples(directory)  # an earlier report's samples, which this one may not list
    if media:
        plain["samples"] = report["samples"] = write_samples(plain, media, directory)
    texts = {
        "json": dumps_report(plain),
        "md": render_markdown(plain),
        "html": render_html(plain, directory),
    }
    paths = {}
    for kind, text in texts.items():
        paths[kind] = directory / f"report.{kind}"
        paths[kind].write_text(text, encoding="utf-8")
    return paths
