"""Quality-vs-speed evaluation: the baseline and each plan on the same prompts and seeds."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import diffcache
from diffcache.errors import DiffCacheError
from diffcache.eval import metrics
from diffcache.eval.report import write_report
from diffcache.generate import generate
from diffcache.models import builtin_models
from diffcache.plan import Plan
from diffcache.registry import find_adapter
from diffcache.request import Request, check

DEFAULT_PROMPTS = (
    "a cat surfing a wave at sunset",
    "a red fox running through fresh snow",
    "an astronaut riding a horse on the moon",
    "a bowl of ramen on a wooden table, steam rising",
)


def evaluate(
    model: str,
    plans: Sequence[str | Plan],
    out: str | Path,
    prompts: Sequence[str] = DEFAULT_PROMPTS[:2],
    seeds: int = 1,
    request: Request | None = None,
    warmup: bool = True,
) -> dict[str, Any]:
    """Run the baseline and every plan on each (prompt, seed), interleaved so that machine noise
    hits them alike; write ``out/report.{json,md,html}`` and return the report dict. The seeds
    are ``request.seed`` .. ``request.seed + seeds - 1``.

    Latency is the mean wall time of one generation; ``speedup`` = baseline latency / latency;
    quality (PSNR, SSIM, LPIPS when its weights exist) compares each output with the baseline
    output of the same prompt and seed, and a run's value is the mean over its samples. Every
    value in the report is a finite number or None; a None metric is explained in ``notes``
    (a PSNR is None when an output equals its baseline exactly: that PSNR is infinite).
    The output folder is checked first and created only when the report is written.
    """
    check_report_dir(out)
    if not prompts:
        raise DiffCacheError("evaluate needs at least one prompt")
    if seeds < 1:
        raise DiffCacheError(f"seeds must be >= 1, got {seeds}")
    plans = [Plan.load(p) for p in plans]  # validate every plan before the first generation
    names = plan_names(plans)
    pipe = diffcache.load_model(model)
    for plan in plans:  # every plan must fit this model before any generation runs
        diffcache.remove(diffcache.accelerate(pipe, plan))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and hasattr(pipe, "to"):
        pipe.to(device)
    base_req = request or Request()
    if model in builtin_models():
        base_req = base_req.merged(builtin_models()[model].defaults)
    adapter = find_adapter(pipe)
    takes_prompt = adapter.field("prompt") is not None
    requests = [
        base_req.replace(prompt=p if takes_prompt else None, seed=base_req.seed + k)
        for p in (prompts if takes_prompt else prompts[:1])
        for k in range(seeds)
    ]
    for req in requests:
        check(adapter.fields, adapter.name, req, pipe)
    if warmup:  # first-call costs (allocations, lazy init) must not count against anyone
        generate(pipe, requests[0])

    base_times, run_times = [], [[] for _ in plans]
    per_run: list[dict[str, list]] = [
        {"psnr": [], "ssim": [], "lpips": [], "cf": [], "steps": []} for _ in plans
    ]
    lpips_reason = metrics.lpips_unavailable_reason()
    peak = None
    for req in requests:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        ref, seconds = _timed(pipe, req, device)
        base_times.append(seconds)
        if device == "cuda":
            peak = max(peak or 0, torch.cuda.max_memory_allocated())
        for i, plan in enumerate(plans):
            diffcache.accelerate(pipe, plan)
            try:
                media, seconds = _timed(pipe, req, device)
                s = diffcache.stats(pipe)
            finally:
                diffcache.remove(pipe)
            run_times[i].append(seconds)
            acc = per_run[i]
            acc["psnr"].append(metrics.psnr(ref, media))
            acc["ssim"].append(metrics.ssim(ref, media))
            value, reason = metrics.lpips(ref, media) if lpips_reason is None else (None, None)
            acc["lpips"].append(value)
            lpips_reason = lpips_reason or reason
            acc["cf"].append(s.compute_fraction)
            acc["steps"].append(s.per_step())

    base_latency = float(np.mean(base_times))
    notes: dict[str, str] = {}
    runs = []
    for plan, name, times, acc in zip(plans, names, run_times, per_run, strict=True):
        latency = float(np.mean(times))
        run = {
            "plan": name,
            "method": plan.method,
            "latency_s": latency,
            "speedup": base_latency / latency if latency > 0 else None,
            "compute_fraction": metrics.mean(acc["cf"]),
            "psnr": _psnr_of_run(name, acc["psnr"], notes),
            "ssim": metrics.mean(acc["ssim"]),
            "lpips": metrics.mean(acc["lpips"]),
            "accuracy": None,
            "agreement": None,
            "kv_bytes_peak": None,
            "samples": len(times),
            "per_step_compute": np.mean(acc["steps"], axis=0).tolist(),
        }
        runs.append(_finite_or_null(run, name, notes))
    if lpips_reason:
        notes["lpips"] = f"LPIPS is null: {lpips_reason}"
    if peak is None:
        notes["peak_mem_bytes"] = "peak_mem_bytes is null: measured on CUDA only"
    report = {
        "model": model,
        "device": device,
        "baseline": {"latency_s": base_latency, "peak_mem_bytes": peak},
        "runs": runs,
        "notes": notes,
        "requests": [r.as_dict() for r in requests],
    }
    write_report(report, out)
    return report


def check_report_dir(out: str | Path, what: str = "report folder") -> Path:
    """``out`` if a report can be written there, else a DiffCacheError; creates nothing.

    An existing ``out`` must be a writable folder; a missing one must be creatable: its nearest
    existing ancestor is a writable folder.
    """
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise DiffCacheError(f"{what} {out}: is a file; give a folder for the report")
        if not os.access(out, os.W_OK | os.X_OK):
            raise DiffCacheError(f"{what} {out}: folder is not writable")
        return out
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise DiffCacheError(f"{what} {out}: cannot create the folder: {ancestor} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise DiffCacheError(f"{what} {out}: cannot create the folder: {ancestor} is not writable")
    return out


def plan_names(plans: Sequence[Plan]) -> list[str]:
    """Report names of the plans: the file name, or, where two different files share it, as
    much of their paths as tells them apart; the same file (or dict) twice is numbered."""
    names = [p.name for p in plans]
    paths = [None if p.source == "<dict>" else Path(p.source).resolve().parts for p in plans]
    for name in set(names):
        same = [i for i, n in enumerate(names) if n == name and paths[i] is not None]
        distinct = {paths[i] for i in same}
        if len(distinct) < 2:
            continue
        depth = 2
        while len({p[-depth:] for p in distinct}) < len(distinct):
            depth += 1
        for i in same:
            names[i] = "/".join(paths[i][-depth:])
    counts = {n: names.count(n) for n in names}
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if counts[name] > 1:
            seen[name] = seen.get(name, 0) + 1
            names[i] = f"{name} #{seen[name]}"
    return names


def _note(notes: dict[str, str], key: str, text: str) -> None:
    notes[key] = f"{notes[key]}; {text}" if key in notes else text


def _psnr_of_run(name: str, values: Sequence[float], notes: dict[str, str]) -> float | None:
    """Mean PSNR over the samples; None (with a note) when an output equals its baseline."""
    exact = sum(math.isinf(v) for v in values)
    if not exact:
        return metrics.mean(values)
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        why = "its outputs equal the baseline exactly (PSNR is infinite)"
    else:
        why = (
            f"{exact} of {len(values)} outputs equal the baseline exactly (PSNR is infinite); "
            f"the other {len(finite)} average {metrics.mean(finite):.2f} dB"
        )
    _note(notes, "psnr", f"psnr is null for {name}: {why}")
    return None


def _finite_or_null(run: dict[str, Any], name: str, notes: dict[str, str]) -> dict[str, Any]:
    """``run`` with any non-finite number replaced by None, each noted (reports hold numbers or
    null only)."""
    for key, value in run.items():
        if isinstance(value, float) and not math.isfinite(value):
            run[key] = None
            _note(notes, key, f"{key} is null for {name}: the measured value was {value}")
        elif isinstance(value, list) and any(
            isinstance(v, float) and not math.isfinite(v) for v in value
        ):
            run[key] = [None if isinstance(v, float) and not math.isfinite(v) else v for v in value]
            _note(notes, key, f"{key} of {name} has non-finite entries, written as null")
    return run


def _timed(pipe: Any, req: Request, device: str) -> tuple[np.ndarray, float]:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    media = generate(pipe, req)
    if device == "cuda":
        torch.cuda.synchronize()
    return media, time.perf_counter() - t0
