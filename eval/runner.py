"""Quality-vs-speed evaluation: the baseline and each plan on the same prompts and seeds."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import diffcache
from diffcache.eval import metrics
from diffcache.eval.report import write_report
from diffcache.generate import Request, generate
from diffcache.models import builtin_models
from diffcache.plan import Plan
from diffcache.registry import find_adapter

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
    output of the same prompt and seed.
    """
    plans = [Plan.load(p) for p in plans]  # validate every plan before the first generation
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
    takes_prompt = "prompt" in adapter.call_args
    requests = [
        dataclasses.replace(base_req, prompt=p if takes_prompt else None, seed=base_req.seed + k)
        for p in (prompts if takes_prompt else prompts[:1])
        for k in range(seeds)
    ]
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
    runs = []
    for plan, times, acc in zip(plans, run_times, per_run, strict=True):
        latency = float(np.mean(times))
        runs.append(
            {
                "plan": plan.name,
                "method": plan.method,
                "latency_s": latency,
                "speedup": base_latency / latency,
                "compute_fraction": metrics.mean(acc["cf"]),
                "psnr": metrics.mean(acc["psnr"]),
                "ssim": metrics.mean(acc["ssim"]),
                "lpips": metrics.mean(acc["lpips"]),
                "accuracy": None,
                "agreement": None,
                "kv_bytes_peak": None,
                "samples": len(times),
                "per_step_compute": np.mean(acc["steps"], axis=0).tolist(),
            }
        )
    notes = {}
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
        "requests": [{k: v for k, v in r.__dict__.items() if v is not None} for r in requests],
    }
    write_report(report, out)
    return report


def _timed(pipe: Any, req: Request, device: str) -> tuple[np.ndarray, float]:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    media = generate(pipe, req)
    if device == "cuda":
        torch.cuda.synchronize()
    return media, time.perf_counter() - t0
