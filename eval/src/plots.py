"""The report's charts, drawn with matplotlib as inline SVG (deterministic: same report, same
bytes). ``quality_svg``: PSNR and task score against speedup, one marker per run.
``timeline_svg``: per-step fraction of the work each run computed (1 = computed, 0 = reused).
``kv_svg``: next-scale KV runs' history cache before each scale, beside the plain model's."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

_RC = {"svg.hashsalt": "diffcache", "svg.fonttype": "none", "font.size": 9}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _svg(fig: Any) -> str:
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context(_RC):
        fig.savefig(buf, format="svg", metadata={"Date": None}, bbox_inches="tight")
    text = buf.getvalue()
    return text[text.index("<svg") :]


def _figure(width: float, height: float, cols: int = 1) -> tuple[Any, Any]:
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=(width, height))
        axes = fig.subplots(1, cols, squeeze=False)[0]
    return fig, axes


def label(run: dict[str, Any]) -> str:
    return str(run.get("plan") or run.get("method") or "?")


def left_out(runs: Sequence[dict[str, Any]], metric: str) -> list[str]:
    """Runs a quality panel cannot place: no speedup (or one flagged as a measurement problem:
    above the ideal of its compute fraction) or no value of ``metric``."""
    from diffcache.eval.timing import above_ideal

    def placed(r: dict[str, Any]) -> bool:
        speedup = r.get("speedup")
        return _number(speedup) and not above_ideal(speedup, r.get("compute_fraction"))

    return [label(r) for r in runs if not (placed(r) and _number(r.get(metric)))]


def is_text(runs: Sequence[dict[str, Any]]) -> bool:
    """Runs of a text model (they carry ``tokens_per_s``)."""
    return any("tokens_per_s" in r for r in runs)


def task_metric(runs: Sequence[dict[str, Any]]) -> str:
    """The per-sample task measure of these runs: accuracy for text, else the task score."""
    return "accuracy" if is_text(runs) else "task_score"


def panels(runs: Sequence[dict[str, Any]], baseline: dict[str, Any]) -> list[tuple[str, str]]:
    """(metric, axis title) of the quality panels: closeness to the baseline's output (PSNR, or
    for text the agreement), then the task measure when there is one (task score, accuracy)."""
    text = is_text(runs)
    out = (
        [("agreement", "agreement with no cache")] if text else [("psnr", "PSNR vs baseline (dB)")]
    )
    task = task_metric(runs)
    if any(_number(r.get(task)) for r in runs) or _number(baseline.get(task)):
        out.append((task, task.replace("_", " ")))
    return out


#: metrics that are shares of samples or tokens: their axis is [0, 1], so a gap of one sample
#: in sixteen looks as big as it is
BOUNDED = ("agreement", "accuracy", "task_score")
MARKERS = "osD^vP*Xph"


def style(k: int) -> dict[str, Any]:
    """Colour and marker of the ``k``-th run, the same in every panel (100 runs told apart)."""
    return {"color": f"C{k % 10}", "marker": MARKERS[k // 10 % len(MARKERS)]}


def quality_svg(
    runs: Sequence[dict[str, Any]],
    baseline: dict[str, Any],
    flips: Mapping[str, tuple[int, int, float]] | None = None,
) -> str:
    """The :func:`quality_figure` as SVG."""
    return _svg(quality_figure(runs, baseline, flips))


def quality_figure(
    runs: Sequence[dict[str, Any]],
    baseline: dict[str, Any],
    flips: Mapping[str, tuple[int, int, float]] | None = None,
) -> Any:
    """Closeness to the baseline vs speedup (left: PSNR, or agreement for text) and the task
    measure vs speedup (right: task score or accuracy, with the baseline's). Runs are named in
    one legend below the panels (with ``flips``: the samples each lost / won against the baseline
    on the task measure and the sign test's p), so no name covers a point or an axis."""
    shown = panels(runs, baseline)
    fig, axes = _figure(4.2 * len(shown), 3.2, len(shown))
    handles: dict[str, Any] = {}
    for ax, (metric, title) in zip(axes, shown, strict=True):
        placed = 0
        for k, r in enumerate(runs):
            if not left_out([r], metric):
                mark = ax.scatter([r["speedup"]], [r[metric]], zorder=3, clip_on=False, **style(k))
                handles.setdefault(label(r), mark)
                placed += 1
        if metric in BOUNDED:
            ax.set_ylim(0.0, 1.0)
        if metric in ("task_score", "accuracy") and _number(baseline.get(metric)):
            line = ax.axhline(baseline[metric], color="0.5", ls="--", lw=1)
            handles[f"baseline ({title} {baseline[metric]:.3g})"] = line
        ax.axvline(1.0, color="0.8", lw=1)
        ax.margins(x=0.1)
        ax.set_xlabel("speedup over the baseline (x)")
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        if not placed:
            ax.text(0.5, 0.5, "no run to place", ha="center", transform=ax.transAxes)
    if handles:
        task = shown[1] if len(shown) > 1 else None
        names = [_legend_name(name, runs, task, flips or {}) for name in handles]
        fig.legend(
            list(handles.values()),
            names,
            loc="upper center",
            bbox_to_anchor=(0.5, 0.0),
            ncol=min(2, len(names)),
            fontsize=8,
            frameon=False,
        )
    fig.tight_layout()
    return fig


def _legend_name(
    name: str,
    runs: Sequence[dict[str, Any]],
    task: tuple[str, str] | None,
    flips: Mapping[str, tuple[int, int, float]],
) -> str:
    """A run's legend entry: its name, and its task measure with the samples lost / won."""
    from diffcache.eval.paired import describe

    run = next((r for r in runs if label(r) == name), None)
    if task is None or run is None or name not in flips or not _number(run.get(task[0])):
        return name
    return f"{name}: {task[1]} {run[task[0]]:.3g} ({describe(*flips[name])})"


def timeline_svg(runs: Sequence[dict[str, Any]]) -> str:
    """One row per run: the fraction of work computed at each step (dark = computed)."""
    rows = [r for r in runs if r.get("per_step_compute")]
    fig, axes = _figure(8.0, 0.5 + 0.35 * max(len(rows), 1))
    ax = axes[0]
    if not rows:
        ax.text(0.5, 0.5, "no per-step data (diffusers' caches report none)", ha="center")
        ax.set_axis_off()
        return _svg(fig)
    steps = max(len(r["per_step_compute"]) for r in rows)
    grid = [
        [v if _number(v) else math.nan for v in r["per_step_compute"]]
        + [math.nan] * (steps - len(r["per_step_compute"]))
        for r in rows
    ]
    import matplotlib

    # a step the run never made is grey, apart from "nothing computed"
    cmap = matplotlib.colormaps["Blues"].with_extremes(bad="0.75")
    image = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_yticks(range(len(rows)), [label(r) for r in rows])
    ax.set_xticks(range(steps), [str(s) for s in range(steps)], fontsize=6)
    ax.set_xlabel("step (grey: not run)" if any(math.isnan(v) for g in grid for v in g) else "step")
    fig.colorbar(image, ax=ax, label="computed", fraction=0.03)
    return _svg(fig)


#: what the KV chart shows (its caption in the report)
KV_CAPTION = (
    "KV cache each run holds before each scale (all layers, K and V, CFG rows included; the "
    "last scale's is the papers' KV cache memory), against the plain model's (every row kept). "
    "Colours and markers are those of the quality chart. report.json's kv_history_bytes, "
    "kv_history_plain and kv_geometry hold the numbers."
)


def byte_unit(most: float) -> tuple[float, str]:
    """The binary unit (bytes per unit, name) that keeps ``most`` below 1024 units."""
    for power, name in ((3, "GiB"), (2, "MiB"), (1, "KiB")):
        if most >= 1024**power:
            return float(1024**power), name
    return 1.0, "B"


def kv_svg(runs: Sequence[dict[str, Any]]) -> str:
    """The :func:`kv_figure` as SVG."""
    return _svg(kv_figure(runs))


def kv_figure(runs: Sequence[dict[str, Any]]) -> Any:
    """History KV before each scale: each KV run's, in its colour and marker, and the plain
    model's (black, dashed, on top); the legend gives each run's last-scale share and quality."""
    kv = [(k, r) for k, r in enumerate(runs) if r.get("kv_history_bytes")]
    plain = next(r["kv_history_plain"] for _, r in kv)
    unit, name = byte_unit(max(plain))
    fig, axes = _figure(6.0, 3.2)
    ax = axes[0]
    for k, r in kv:
        history = r["kv_history_bytes"]
        ax.plot(range(len(history)), [b / unit for b in history], label=_kv_name(r), **style(k))
    plain_units = [b / unit for b in plain]  # on top: a run that keeps everything hides under it
    ax.plot(range(len(plain)), plain_units, color="k", ls="--", lw=1, label="no compression")
    ax.set_xticks(range(len(plain)))
    ax.set_xlabel("scale (its history: the cache before it)")
    ax.set_ylabel(f"history KV ({name})")
    ax.grid(alpha=0.3)
    fig.legend(loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=1, fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def _kv_name(run: dict[str, Any]) -> str:
    """A KV run's legend entry: name, share of the plain last-scale cache, PSNR, task score."""
    parts = [label(run)]
    if _number(run.get("kv_cache_fraction")):
        parts.append(f"KV {run['kv_cache_fraction']:.0%} of plain")
    if _number(run.get("psnr")):
        parts.append(f"PSNR {run['psnr']:.4g} dB")
    if _number(run.get("task_score")):
        parts.append(f"task score {run['task_score']:.4g}")
    return ", ".join(parts)
