"""Sample media of a report: files under ``samples/`` and the side-by-side grid of the HTML page.

Images are written as PNG; videos as an animated GIF plus a frame strip PNG (every frame side by
side); texts as .txt. File names are ``r<request>-<column>`` (column 0 = baseline, k = k-th run),
so any plan name is safe. The grid has one row per request and one column per run, all of the
same seed; images and strips are embedded as data URIs so the page stays self-contained.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

BASELINE = "baseline"
#: the names ``write_samples`` gives its files: ``r<request>-<column>`` and a suffix
SAMPLE_FILE = re.compile(r"r\d+-\d+(\.gif|\.png|\.txt|-strip\.png)")


def _pixels(media: np.ndarray) -> np.ndarray:
    pixels = (np.clip(media, 0.0, 1.0) * 255).round().astype(np.uint8)
    return np.repeat(pixels, 3, axis=-1) if pixels.shape[-1] == 1 else pixels


def write_samples(
    report: dict[str, Any], media: Mapping[tuple[str, int], Any], out_dir: Path
) -> dict[str, Any]:
    """Write every sample file; returns the report's ``samples`` section (relative paths)."""
    import imageio.v3 as iio

    runs = [BASELINE, *(r["plan"] for r in report.get("runs", []))]
    requests = sorted({i for _, i in media})
    folder = out_dir / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, list[str | None]] = {run: [] for run in runs}
    strips: dict[str, list[str | None]] = {run: [] for run in runs}
    for i in requests:
        for col, run in enumerate(runs):
            item = media.get((run, i))
            name, strip = f"r{i}-{col}", None
            if item is None:
                path = None
            elif isinstance(item, str):
                path = f"samples/{name}.txt"
                (out_dir / path).write_text(item + "\n", encoding="utf-8")
            elif np.ndim(item) == 4:  # video (F, H, W, C)
                frames = _pixels(np.asarray(item))
                path = f"samples/{name}.gif"
                iio.imwrite(out_dir / path, frames, extension=".gif", duration=125, loop=0)
                strip = f"samples/{name}-strip.png"
                iio.imwrite(out_dir / strip, np.concatenate(list(frames), axis=1))
            else:
                path = f"samples/{name}.png"
                iio.imwrite(out_dir / path, _pixels(np.asarray(item)))
            files[run].append(path)
            strips[run].append(strip)
    section: dict[str, Any] = {"runs": runs, "requests": requests, "files": files}
    if any(s for col in strips.values() for s in col):
        section["strips"] = strips
    return section


def remove_samples(out_dir: Path) -> None:
    """Remove the sample files an earlier report wrote in ``out_dir/samples`` (only files named
    as :func:`write_samples` names them), and the folder when that leaves it empty: a reused
    report folder then holds no sample its new report does not list."""
    folder = out_dir / "samples"
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.is_file() and SAMPLE_FILE.fullmatch(path.name):
            path.unlink()
    if not any(folder.iterdir()):
        folder.rmdir()


def _data_uri(path: Path) -> str:
    kind = "gif" if path.suffix == ".gif" else "png"
    return f"data:image/{kind};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _caption(request: Mapping[str, Any]) -> str:
    what = request.get("prompt", request.get("class_label", ""))
    return f"{what} (seed {request.get('seed')})"


def shown(requests: list[int], n: int) -> str:
    """What the grid holds of the report's ``n`` requests (``requests``: the indices shown)."""
    k = len(requests)
    if k >= n:
        return f"All {n} requests."
    which = f"the first {k}" if requests == list(range(k)) else "rows name them"
    return f"Showing {k} of {n} requests ({which}; the table scores all {n})."


def grid_html(report: dict[str, Any], out_dir: Path) -> str:
    """The sample grid (``<figure id="samples">``), or '' when the report has no samples."""
    section = report.get("samples")
    if not section:
        return ""
    esc = html.escape
    runs, requests = section["runs"], section["requests"]
    rows = ["<tr><th>request</th>" + "".join(f"<th>{esc(r)}</th>" for r in runs) + "</tr>"]
    for k, i in enumerate(requests):
        cells = [f"<th>{esc(_caption(report['requests'][i]))}</th>"]
        for run in runs:
            path = section["files"][run][k]
            strip = (section.get("strips") or {}).get(run, [None] * len(requests))[k]
            if path is None:
                cells.append("<td>—</td>")
            elif path.endswith(".txt"):
                text = (out_dir / path).read_text(encoding="utf-8")
                cells.append(f"<td><pre>{esc(text)}</pre></td>")
            else:
                cell = f'<img class="sample" alt="{esc(run)}" src="{_data_uri(out_dir / path)}">'
                if strip:
                    cell += (
                        f'<br><img class="strip" alt="frames" src="{_data_uri(out_dir / strip)}">'
                    )
                cells.append(f"<td>{cell}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    total = len(report.get("requests") or requests)
    caption = f"{shown(list(requests), total)} Same request and seed in every row."
    if section.get("strips"):
        caption += " Videos play as animated GIFs, with every frame below."
    return (
        f'<figure id="samples"><table class="grid">{"".join(rows)}</table>'
        f"<figcaption>{caption}</figcaption></figure>"
    )
