"""Quality-vs-speed evaluation: the baseline and each comparison on the same inputs and seeds.

Every (input, seed) request runs the plain pipeline first and then each comparison (our plans,
or diffusers' built-in caches: ``eval/baselines.py``), interleaved so that machine noise hits them
alike. Each generation gives one *record*: latency, quality against the baseline output of the
same request (PSNR over the whole sample, SSIM, LPIPS when its weights exist), the task score when
the model has a scorer, and our compute fraction. A run's numbers are the means of its records.
The untimed warm-up runs (one per configuration, on the first request) count the denoiser's
Linear MACs (``eval/macs.py``): ``macs_fraction``, one unit for ours and diffusers' caches alike.
Adaptive caches skip different work on different inputs: ``macs="all"`` counts every request,
in one more untimed run per configuration (twice the generations), and a run's
``macs_fraction`` is then the mean of its per-request fractions.

Under ``accelerate launch --num_processes N`` the requests are split across the processes
(``diffcache.distributed``), records and sample media are gathered on the main process, and the
report is the single-process one record for record (latencies aside).
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import diffcache
from diffcache import distributed
from diffcache.adapter import Target
from diffcache.errors import DiffCacheError
from diffcache.eval import metrics
from diffcache.eval.baselines import Comparison, comparison
from diffcache.eval.report import write_report
from diffcache.eval.timing import (
    REPEATS,
    above_ideal,
    check_count,
    costlier,
    ideal_speedup,
    measurement_threads,
    paired_speedups,
    rotated,
    summary,
    timed,
)
from diffcache.generate import Request, check, expand, generate, write_problem
from diffcache.kv.memory import Geometry
from diffcache.lora import adapter_state
from diffcache.models import builtin_models
from diffcache.registry import adapters, find_adapter

DEFAULT_PROMPTS = (
    "a cat surfing a wave at sunset",
    "a red fox running through fresh snow",
    "an astronaut riding a horse on the moon",
    "a bowl of ramen on a wooden table, steam rising",
)
BASELINE = "baseline"
#: what the inputs (a prompt file, bundled prompts or class ids) are called in errors: the user
#: passed no --prompt or --class-label
EVAL_INPUT = "evaluation input"
METRICS = ("psnr", "ssim", "lpips")


def evaluate(
    model: str,
    plans: Sequence[Any],
    out: str | Path,
    prompts: Sequence[str] | None = None,
    seeds: int = 1,
    request: Request | None = None,
    warmup: bool = True,
    samples: int = 4,
    progress: bool = False,
    answers: Sequence[str] | None = None,
    macs: str = "first",
    repeats: int = REPEATS,
    threads: int | None = None,
    trace: bool = False,
    prepare: Callable[[Any], Any] | None = None,
    clock: Callable[[], float] | None = None,
) -> dict[str, Any] | None:
    """Evaluate ``plans`` (plans or ``diffusers:...`` specs) against the plain ``model`` and
    write ``out/report.{json,md,html}`` with sample media for the first ``samples`` requests.

    ``prompts`` default to the model's own evaluation inputs (the bundled prompts, or the class
    ids of a class-conditional reference model); the seeds are ``request.seed`` ..
    ``request.seed + seeds - 1``. ``answers`` (text models; one per prompt) are what each
    output is checked against for ``accuracy``; without them a text model's scorer decides.
    ``macs`` is ``"first"`` (the Linear MACs counted in the warm-up, on the first request) or
    ``"all"`` (every request; needs ``warmup``). Every value in the report is a finite number
    or None, and a None is explained in ``notes``. Every request runs ``repeats`` timed rounds
    of the baseline and each comparison, interleaved (``eval/timing.py``), on ``threads`` torch
    threads (default: ``OMP_NUM_THREADS``, else 1). With ``trace``, each diffcache plan runs
    every request once more, untimed and traced, and its step traces are written to
    ``out/traces/<plan>.jsonl`` (one event a line, with its ``request`` index), named in the
    run's ``trace``. ``prepare`` turns the loaded pipeline into the variant every run uses,
    the plain one and the plans alike (a LoRA, quantized weights, ``torch.compile``) and
    returns it; the report's ``lora`` is the LoRA state of that variant (``diffcache.lora``),
    when it has one. ``clock`` times the runs (default ``time.perf_counter``, wall seconds; a
    benchmark on a loaded machine may pass ``time.process_time``: the latencies are then CPU
    seconds). Returns the report (None on the other processes).
    """
    check_report_dir(out)
    if seeds < 1:
        raise DiffCacheError(f"seeds must be >= 1, got {seeds}")
    if macs not in ("first", "all") or (macs == "all" and not warmup):
        raise DiffCacheError(f"macs must be 'first' or 'all' (with the warm-up), got {macs!r}")
    check_count(repeats, "repeats")
    if threads is not None:
        check_count(threads, "threads")
    with measurement_threads(threads):
        return _evaluate(
            model, plans, out, prompts, seeds, request, warmup, samples, progress, answers, macs,
            repeats, trace, prepare, clock,
        )  # fmt: skip


def _evaluate(
    model: str,
    plans: Sequence[Any],
    out: str | Path,
    prompts: Sequence[str] | None,
    seeds: int,
    request: Request | None,
    warmup: bool,
    samples: int,
    progress: bool,
    answers: Sequence[str] | None,
    macs: str,
    repeats: int,
    trace: bool = False,
    prepare: Callable[[Any], Any] | None = None,
    clock: Callable[[], float] | None = None,
) -> dict[str, Any] | None:
    """:func:`evaluate` after its arguments are checked, on the measurement's threads."""
    comparisons = [comparison(p) for p in plans]  # every plan is valid before any work
    for c, name in zip(comparisons, plan_names(comparisons), strict=True):
        c.name = name
    entry = builtin_models().get(model)
    if entry is not None:  # a built-in model's family is known before it is built
        for c in comparisons:
            c.check_family(adapters()[entry.family], model)
    pipe = diffcache.load_model(model)
    pipe = prepare(pipe) if prepare is not None else pipe
    adapter = find_adapter(pipe)
    for c in comparisons:  # and fits this model before any generation runs
        c.check(pipe)
    lora = adapter_state(Target.resolve(adapter, pipe).experts, pipe)  # named in the report
    base_req = request or Request()
    if entry is not None:
        base_req = base_req.merged(entry.defaults)
    inputs = list(prompts) if prompts else _default_inputs(entry, adapter, base_req)
    if not inputs:
        raise DiffCacheError("evaluate needs at least one prompt")
    requests = expand(adapter, inputs, seeds, base_req)
    for req in requests:
        check(adapter, req, pipe, EVAL_INPUT)
    scorer = entry.score_fn() if entry is not None else None
    if answers is not None:
        if len(answers) != len(inputs):
            raise DiffCacheError(f"{len(answers)} answers for {len(inputs)} prompts")
        scorer = _answer_scorer(dict(zip(inputs, answers, strict=True)))
    text = adapter.media == "text"
    mine = distributed.shard(list(enumerate(requests)))  # (starts the process group first)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # this process's GPU when several
    if device == "cuda" and hasattr(pipe, "to"):
        pipe.to(device)
    first = _warm_up(pipe, adapter, comparisons, mine[0][1]) if warmup and mine else {}
    records, media, peak = [], {}, None
    traces: dict[str, list[dict[str, Any]]] = {}  # plan -> its events, each with its request
    configs: list[Comparison | None] = [None, *comparisons]  # None: the plain pipeline
    for i, req in _progress(mine, progress and distributed.is_main()):
        times: dict[str, list[float]] = {}
        outputs: dict[str, tuple[Any, Any]] = {}
        for r in range(repeats):  # interleaved, in an order rotated by round and request
            for c in rotated(configs, r + i):
                name = BASELINE if c is None else c.name
                if device == "cuda" and c is None:
                    torch.cuda.reset_peak_memory_stats()
                out_i, seconds, stats = _timed(pipe, req, device, c, clock)
                if device == "cuda" and c is None:
                    peak = max(peak or 0, torch.cuda.max_memory_allocated())
                times.setdefault(name, []).append(seconds)
                if r == 0:  # what the first round made (the others make the same)
                    outputs[name] = (out_i, stats, _tokens(pipe) if text else None)
        ref, _, tokens = outputs[BASELINE]
        field = adapter.input_field  # what a task scorer checks a sample against
        task = req.get(field.name) if field is not None else None
        records.append(_record(BASELINE, i, times[BASELINE], task, ref, None, scorer, None, tokens))
        for c in comparisons:
            out_i, stats, tokens = outputs[c.name]
            rec = _record(c.name, i, times[c.name], task, out_i, ref, scorer, stats, tokens)
            rec["speedup_repeats"] = paired_speedups(times[BASELINE], times[c.name])
            records.append(rec)
        if i < samples:
            media.update({(name, i): out for name, (out, _, _) in outputs.items()})
        if trace:
            for c in comparisons:
                if c.plan is not None:
                    events = _traced(pipe, req, c.plan)
                    traces.setdefault(c.name, []).extend({"request": i, **e} for e in events)
        if macs == "all":
            counted = first if i == mine[0][0] else _warm_up(pipe, adapter, comparisons, req)
            for rec in records[-1 - len(comparisons) :]:
                rec["macs"] = counted[rec["run"]]
    gathered = distributed.gather((records, media, peak, first, traces))
    if not distributed.is_main():
        return None
    first = gathered[0][3]  # the main process's first request is request 0
    records = sorted((r for part in gathered for r in part[0]), key=_order(comparisons))
    media = {k: v for part in gathered for k, v in part[1].items()}
    peaks = [p for part in gathered if (p := part[2]) is not None]
    report = _report(
        model, device, comparisons, requests, records, scorer, peaks, text, first, repeats
    )
    if lora is not None:
        report["lora"] = lora
    events: dict[str, list[dict[str, Any]]] = {}
    for part in gathered:
        for name, part_events in part[4].items():
            events.setdefault(name, []).extend(part_events)
    files = _trace_files(report, events) if trace else {}
    write_report(report, out, media=media)  # checked first: a bad report leaves no trace files
    for path, lines in files.items():
        (Path(out) / path).parent.mkdir(exist_ok=True)
        (Path(out) / path).write_text(lines)
    return report


def _traced(pipe: Any, req: Request, plan: Any) -> list[dict[str, Any]]:
    """The step trace of one untimed generation of ``req`` with ``plan``."""
    diffcache.accelerate(pipe, plan, trace=True)
    try:
        generate(pipe, req)
        return diffcache.stats(pipe).trace
    finally:
        diffcache.remove(pipe)


def _trace_files(report: dict[str, Any], events: dict[str, list[dict]]) -> dict[str, str]:
    """Each plan's trace file ``traces/<plan>.jsonl`` (relative to the report) -> its text,
    one event a line in request order; the file is named in the run's ``trace``. A comparison
    with no trace (diffusers') gets null and a note."""
    files = {}
    for run in report["runs"]:
        name = run["plan"]
        if name not in events:
            run["trace"] = None
            _note(
                report["notes"],
                "trace",
                f"trace is null for {name}: only diffcache plans record their decisions",
            )
            continue
        path = f"traces/{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.jsonl"
        ordered = sorted(events[name], key=lambda e: e["request"])  # stable within a request
        files[path] = "".join(json.dumps(e, sort_keys=True) + "\n" for e in ordered)
        run["trace"] = path
    return files


def _warm_up(
    pipe: Any, adapter: Any, comparisons: Sequence[Comparison], request: Request
) -> dict[str, int]:
    """One untimed generation of ``request`` plain and with each comparison, counting the
    denoisers' Linear MACs of each. On the first request it is also the warm-up: first-call
    costs (allocations, lazy init, kernel compiles) must not count."""
    from diffcache.eval.macs import count_macs

    experts = Target.resolve(adapter, pipe).experts
    with count_macs(*experts) as n:
        generate(pipe, request)
    macs = {BASELINE: n[0]}
    for c in comparisons:
        c.setup(pipe)
        try:
            with count_macs(*experts) as n:
                generate(pipe, request)
        finally:
            c.teardown(pipe)
        macs[c.name] = n[0]
    return macs


def _record(
    run: str,
    i: int,
    times: Sequence[float],
    task: Any,
    out: Any,
    ref: Any,
    scorer: Any,
    stats: Any,
    tokens: int | None = None,
) -> dict[str, Any]:
    """What one generation measured (text: agreement with the baseline text, accuracy, tokens;
    media: PSNR, SSIM, LPIPS and the task score); its latency is the median of its timed
    rounds ``times``, which it keeps as ``latency_repeats``. ``scorer`` checks ``out`` against
    ``task``, the request's input (its prompt or class id)."""
    rec: dict[str, Any] = {
        "run": run,
        "request": i,
        "latency_s": statistics.median(times),
        "latency_repeats": list(times),
    }
    if isinstance(out, str):
        rec["tokens"] = tokens
        rec["agreement"] = metrics.agreement(ref, out) if ref is not None else None
        rec["accuracy"] = float(scorer(task, out)) if scorer is not None else None
        rec["task_score"] = None
    else:
        if ref is not None:
            rec["psnr"] = metrics.psnr(ref, out)
            rec["ssim"] = metrics.ssim(ref, out)
            rec["lpips"] = metrics.lpips(ref, out)[0]
        rec["task_score"] = float(scorer(task, out)) if scorer is not None else None
    if stats is not None:
        rec["compute_fraction"] = stats.compute_fraction
        rec["per_step"] = stats.per_step()
        rec["kv_bytes_peak"] = stats.kv_bytes_peak
        if getattr(stats, "kv_geometry", None) is not None:  # next-scale KV methods
            rec["kv_history_bytes"] = stats.kv_history_bytes
            rec["kv_geometry"] = stats.kv_geometry
            rec["kv_history_plain"] = plain_history(stats.kv_geometry)  # the plain run's
            rec["kv_attn_macs"] = stats.kv_attn_macs
            rec["kv_attn_macs_plain"] = Geometry.of(stats.kv_geometry).attention_macs()
    return rec


def plain_history(geometry: dict[str, Any]) -> list[int]:
    """The history bytes before each scale of the plain model (every row kept) for this
    ``Stats.kv_geometry``: what its ``FullHistory`` holds (diffcache.kv.memory)."""
    return Geometry.of(geometry).history_before()


def attn_macs_fraction(record: dict[str, Any]) -> float:
    """A next-scale KV record's attention multiply-accumulates (QK^T and AV over the key rows
    its queries attended, measured per scale by the store) over the plain cache's."""
    return sum(record["kv_attn_macs"]) / sum(record["kv_attn_macs_plain"])


def _kv_history(name: str, recs: list[dict[str, Any]], notes: dict[str, str]) -> dict[str, Any]:
    """A next-scale KV run's history bytes before each scale (mean over its samples), the plain
    model's, and the ``kv_geometry`` the plain one follows from (``plain_history``); none when
    the samples differ in geometry (image sizes), with a note."""
    geometry = recs[0]["kv_geometry"]
    if any(r["kv_geometry"] != geometry for r in recs):
        _note(notes, "kv_history_bytes", f"no per-scale KV history for {name}: sizes differ")
        return {}
    history = np.mean([r["kv_history_bytes"] for r in recs], axis=0)
    macs = np.mean([r["kv_attn_macs"] for r in recs], axis=0)
    return {
        "kv_history_bytes": [float(b) for b in history],
        "kv_history_plain": recs[0]["kv_history_plain"],
        "kv_attn_macs": [float(m) for m in macs],
        "kv_attn_macs_plain": recs[0]["kv_attn_macs_plain"],
        "kv_geometry": geometry,
    }


def _report(
    model: str,
    device: str,
    comparisons: Sequence[Comparison],
    requests: Sequence[Request],
    records: list[dict[str, Any]],
    scorer: Any,
    peaks: list[int],
    text: bool = False,
    macs: dict[str, int] | None = None,
    repeats: int = 1,
) -> dict[str, Any]:
    notes: dict[str, str] = {}
    macs = macs or {}
    by_run = {BASELINE: [r for r in records if r["run"] == BASELINE]}
    for c in comparisons:
        by_run[c.name] = [r for r in records if r["run"] == c.name]
    base = by_run[BASELINE]
    base_latency = float(np.mean([r["latency_s"] for r in base]))
    runs = []
    for c in comparisons:
        recs = by_run[c.name]
        latency = float(np.mean([r["latency_s"] for r in recs]))
        ours = c.plan is not None
        steps = [r["per_step"] for r in recs] if ours else []
        speed = summary([s for r in recs for s in r["speedup_repeats"]])
        run = {
            "plan": c.name,
            "method": c.method,
            "latency_s": latency,
            "speedup": speed[0] if speed else None,
            "speedup_spread": list(speed[1:]) if speed else None,
            "compute_fraction": metrics.mean([r["compute_fraction"] for r in recs])
            if ours
            else None,
            "macs_fraction": _macs_fraction(c.name, recs, base, macs),
            "psnr": None if text else _psnr_of_run(c.name, [r["psnr"] for r in recs], notes),
            "ssim": None if text else metrics.mean([r["ssim"] for r in recs]),
            "lpips": None if text else metrics.mean([r["lpips"] for r in recs]),
            "task_score": _mean_or_none([r["task_score"] for r in recs]),
            "accuracy": _mean_or_none([r.get("accuracy") for r in recs]),
            "agreement": _mean_or_none([r.get("agreement") for r in recs]),
            "kv_bytes_peak": max((r["kv_bytes_peak"] or 0 for r in recs), default=0) or None
            if ours
            else None,
            "samples": len(recs),
            "per_step_compute": _mean_steps(steps),
        }
        if any("kv_history_plain" in r for r in recs):  # the papers' "KV cache": the last history
            kept = [r["kv_history_bytes"][-1] / r["kv_history_plain"][-1] for r in recs]
            run["kv_cache_fraction"] = metrics.mean(kept)
            run["attn_macs_fraction"] = metrics.mean([attn_macs_fraction(r) for r in recs])
            run.update(_kv_history(c.name, recs, notes))
        if text:
            run["tokens_per_s"] = _tokens_per_s(recs)
            base_acc = _mean_or_none([r.get("accuracy") for r in base])
            acc = run["accuracy"]
            run["accuracy_drop"] = None if acc is None or base_acc is None else base_acc - acc
        if not ours:
            why = "diffusers' caches report no work of their own (see macs_fraction)"
            _note(notes, "compute_fraction", f"compute_fraction is null for {c.name}: {why}")
        _speed_notes(run, notes)
        runs.append(_finite_or_null(run, c.name, notes))
    reason = metrics.lpips_unavailable_reason()
    if text:
        why = "image metrics are not defined for text (see agreement and accuracy)"
        for key in METRICS:
            notes[key] = f"{key} is null: {why}"
        notes["task_score"] = "task_score is null for text: see accuracy"
        if scorer is None:
            notes["accuracy"] = (
                f"accuracy is null: {model} has no task checker and the prompts carry no answers"
            )
    else:
        for key in ("accuracy", "agreement"):
            notes[key] = f"{key} is null: text models only (see task_score and the image metrics)"
        if reason:
            notes["lpips"] = f"LPIPS is null: {reason}"
    if any("attn_macs_fraction" in r for r in runs):
        notes["attn_macs_fraction"] = (
            "attn_macs_fraction (next-scale KV runs): the QK^T and AV multiply-accumulates over "
            "the key rows each query attended, measured per scale by the KV store "
            "(kv_attn_macs), over the plain cache's (kv_attn_macs_plain); macs_fraction counts "
            "the Linear layers only, which KV compression leaves as they are"
        )
    if any(r["kv_bytes_peak"] is None for r in runs):
        notes["kv_bytes_peak"] = (
            "kv_bytes_peak is null where no KV store was kept (DiT methods and diffusers' caches)"
        )
    if not text and scorer is None:
        notes["task_score"] = f"task_score is null: {model} has no task scorer"
    if not macs:
        notes["macs_fraction"] = "macs_fraction is null: it is counted in the warm-up runs (off)"
    if not peaks:
        notes["peak_mem_bytes"] = "peak_mem_bytes is null: measured on CUDA only"
    notes["speedup"] = (
        f"median of the paired ratios baseline / run, one per request and timed round "
        f"({repeats} rounds, interleaved after an untimed warm-up), with the lowest and highest "
        f"in brackets{'; ' + notes['speedup'] if 'speedup' in notes else ''}"
    )
    return {
        "model": model,
        "device": device,
        "environment": environment(device),
        "repeats": repeats,
        "baseline": {
            "latency_s": base_latency,
            "peak_mem_bytes": max(peaks) if peaks else None,
            "task_score": _mean_or_none([r["task_score"] for r in base]),
            "samples": len(base),
            **(
                {
                    "accuracy": _mean_or_none([r.get("accuracy") for r in base]),
                    "tokens_per_s": _tokens_per_s(base),
                }
                if text
                else {}
            ),
        },
        "runs": runs,
        "notes": notes,
        "requests": [r.as_dict() for r in requests],
        "records": [_finite_record(r) for r in records],
    }


def _speed_notes(run: dict[str, Any], notes: dict[str, str]) -> None:
    """Note a speedup above the ideal of its compute fraction (a measurement problem, not a
    result) and a compute fraction above 1 (the plan costs more than no cache)."""
    cf, name = run["compute_fraction"], run["plan"]
    if above_ideal(run["speedup"], cf):
        _note(
            notes,
            "speedup",
            f"the speedup of {name}, {run['speedup']:.2f}x, is above the ideal "
            f"{ideal_speedup(cf):.2f}x of its compute fraction {cf:.3f}: a measurement problem "
            "(machine load, a stalled run), not a result; rerun with more --repeats on a quiet "
            "machine",
        )
    if cf is not None and cf > 1:
        _note(notes, "compute_fraction", f"{name}: {costlier(cf)}")


def _macs_fraction(
    name: str, recs: list[dict[str, Any]], base: list[dict[str, Any]], first: dict[str, int]
) -> float | None:
    """A run's Linear MACs over the baseline's: the mean over requests when each request was
    counted (``macs="all"``), else the first request's (the warm-up's count)."""
    if "macs" in base[0]:
        plain = {r["request"]: r["macs"] for r in base}
        return metrics.mean(r["macs"] / plain[r["request"]] for r in recs if plain[r["request"]])
    return first[name] / first[BASELINE] if first.get(BASELINE) and name in first else None


def environment(device: str) -> dict[str, Any]:
    """Where the numbers were measured."""
    import importlib.metadata as md

    def version(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "not installed"

    gpu = torch.cuda.get_device_name(0) if device == "cuda" else None
    return {
        "device": gpu or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "processes": distributed.size(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": version("diffusers"),
        "transformers": version("transformers"),
        "diffcache": diffcache.__version__,
    }


def _answer_scorer(answers: dict[str, str]) -> Any:
    """Exact match of a generated text with its prompt's answer (surrounding space ignored)."""

    def score(prompt: str, text: str) -> bool:
        return text.strip() == answers[prompt].strip()

    return score


def _tokens(pipe: Any) -> int:
    """Tokens the last generation produced, up to and including its first EOS (one rule for
    every method: research/dlm.md §4.3)."""
    return int(pipe.last_output.generated[0])


def _tokens_per_s(recs: Sequence[dict[str, Any]]) -> float | None:
    seconds = sum(r["latency_s"] for r in recs)
    return sum(r["tokens"] for r in recs) / seconds if seconds > 0 else None


def _mean_steps(steps: list[list[float]]) -> list[float]:
    """Mean compute per step over the samples that ran that step (text runs may take different
    step counts)."""
    longest = max((len(s) for s in steps), default=0)
    return [float(np.mean([s[k] for s in steps if len(s) > k])) for k in range(longest)]


def _default_inputs(entry: Any, adapter: Any, req: Request) -> list[str]:
    if entry is not None and entry.default_prompts():
        return list(entry.default_prompts())
    field = adapter.input_field
    if field is None or field.type is str:
        return list(DEFAULT_PROMPTS[:2])
    given = req.get(field.name)  # class ids: the one asked for, else the first
    return [str(given)] if given is not None else ["0"]


def plan_names(items: Sequence[Comparison | Any]) -> list[str]:
    """Report names of comparisons (or plans): a plan's file name, or as much of its path as
    tells same-named files apart; the same plan (or spec) twice is numbered."""
    plans = [c.plan if isinstance(c, Comparison) else c for c in items]
    names = [c.name for c in items]
    paths = [
        None if p is None or p.source == "<dict>" else Path(p.source).resolve().parts for p in plans
    ]
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


def _order(comparisons: Sequence[Comparison]) -> Any:
    rank = {BASELINE: 0, **{c.name: k + 1 for k, c in enumerate(comparisons)}}
    return lambda r: (r["request"], rank[r["run"]])


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    return None if any(v is None for v in values) or not values else float(np.mean(values))


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
    """``run`` with any non-finite number replaced by None, each noted."""
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


def _finite_record(rec: dict[str, Any]) -> dict[str, Any]:
    """A record for report.json: infinite PSNR (an exact match) is null."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in rec.items()}


def check_report_dir(out: str | Path, what: str = "report folder") -> Path:
    """``out`` if a report can be written there, else a DiffCacheError; creates nothing.

    An existing ``out`` must be a writable folder; a missing one must be creatable: its nearest
    existing ancestor is a writable folder.
    """
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise DiffCacheError(f"{what} {out}: is a file; give a folder for the report")
        problem = write_problem(out)
        if problem:
            raise DiffCacheError(f"{what} {out}: folder is not writable ({problem})")
        return out
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise DiffCacheError(f"{what} {out}: cannot create the folder: {ancestor} is a file")
    problem = write_problem(ancestor)
    if problem:
        raise DiffCacheError(
            f"{what} {out}: cannot create the folder: {ancestor} is not writable ({problem})"
        )
    return out


def _progress(items: Sequence[Any], on: bool) -> Any:
    if not on:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc="eval", unit="request")


def _timed(
    pipe: Any,
    req: Request,
    device: str,
    c: Comparison | None,
    clock: Callable[[], float] | None = None,
) -> tuple[Any, float, Any]:
    """One generation of ``req`` timed by ``clock``, plain (``c`` None) or with comparison
    ``c`` set up for it: the output, the seconds, and our stats (None for the plain pipeline
    and diffusers')."""
    if c is None:
        return (*timed(lambda: generate(pipe, req), device, clock), None)
    c.setup(pipe)
    try:
        out, seconds = timed(lambda: generate(pipe, req), device, clock)
        stats = diffcache.stats(pipe) if c.plan is not None else None
    finally:
        c.teardown(pipe)
    return out, seconds, stats
