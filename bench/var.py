"""Next-scale KV compression on VAR / Infinity: every method at a few history budgets.

For each model (``--models``) and each method (``--methods``) at each budget (``--budgets``, the
fraction of the history before the last scale: rows per head ``int(ratio x start(last))``), the
plan is built from the method's config (:func:`plan_for`) and the script reports:

- ``history``: the measured history KV before the last scale (the papers' "KV cache",
  ``Stats.kv_history_bytes[-1]``) over the uncompressed cache, next to the same ratio from
  :class:`diffcache.kv.memory.Geometry` with the selection's budgets per head group
  (:func:`diffcache.kv.memory.selection_budget`: HACK's two classes may keep different rows);
  ``exact`` says whether every scale's measured bytes and the layer-sweep peak equal it;
- ``peak``: the measured layer-sweep peak (``kv_bytes_peak``) over the uncompressed one, and
  its arithmetic;
- ``time``: the configuration's seconds over the uncompressed pipeline's, paired round by round
  (``diffcache.eval.timing``: one untimed warm-up of each configuration, then ``--rounds`` rounds
  in rotated order); median and [lowest, highest]. Wall-clock seconds by default; ``--clock
  cpu`` (CPU runs only) times the process's own CPU seconds (``time.process_time``), which other
  processes' load does not inflate, for a shared machine (the table's header says which clock);
- PSNR / SSIM of each image against the uncompressed image of the same request
  (``diffcache.eval.metrics``): the median PSNR (identical images have an infinite one) and the
  mean SSIM; for ``var-digits`` the class accuracy (its scorer, classes
  0-9 x ``--seeds``) next to the uncompressed one.

Budget-dependent settings (printed with every plan in the JSON): SnapKV / PyramidKV / ScaleKV
use their 16-row window and kernel 5 where the budget holds at least 32 rows, else a 4-row window
and kernel 3 (the small maps of var-digits); HACK uses the average ``budget`` rows with
``B_C = B_S`` and caps the recent scale its structural heads always keep at half of what the
budget leaves after the first two scales (else its mandatory set outgrows small budgets).
HACK's head classes come from one calibration run of the same model (seed 1000, untimed): the
last scale's attention of every layer through :func:`diffcache.kv.head_stats.variance_table`,
the ``ALPHA`` lowest-variance heads contextual (:func:`classify_heads`); no HACK calibrator is
used. A plan a model refuses (a budget below a method's mandatory rows) is a table row saying so.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from arg_types import among, fraction, listed, positive

import diffcache
from diffcache.errors import DiffCacheError
from diffcache.eval import metrics
from diffcache.eval.timing import measurement_threads, paired_speedups, rotated, summary, timed
from diffcache.generate import Request, generate
from diffcache.kv.head_stats import classify_heads, variance_table
from diffcache.kv.history import FullHistory, ScaleCall, Schedule
from diffcache.kv.history_method import token_budget
from diffcache.kv.memory import Geometry, selection_budget
from diffcache.models import builtin_models, load_model
from diffcache.registry import methods

MODELS = ("var-digits", "var-d16-random", "var-d30-random", "infinity-2b-random")
METHODS = ("scalekv", "hack", "h2o", "snapkv", "streaming", "pyramidkv")
BUDGETS = (0.5, 0.3, 0.1)
#: HACK's contextual fraction of heads for the offline classification
ALPHA = 0.5
#: the seed of HACK's calibration run (no timed request uses it)
CALIBRATION_SEED = 1000
#: the model whose images are scored for class accuracy
SCORED = "var-digits"
#: the text prompt of Infinity's requests
PROMPT = "a red fox in the snow"


def model_shape(pipe: Any) -> tuple[Schedule, int, int]:
    """The default request's schedule, layers and heads of a VAR / Infinity pipeline."""
    schedule = pipe.schedule(None, None) if callable(pipe.schedule) else pipe.schedule
    config = pipe.transformer.config
    return schedule, config.depth, config.num_heads


def options_for(method: str, ratio: float, schedule: Schedule) -> dict[str, Any]:
    """The plan options of ``method`` keeping ``ratio`` of the history before the last scale."""
    rows = token_budget(None, ratio, schedule)
    assert rows is not None
    small = rows < 32
    window = {"window": 4, "kernel": 3} if small else {}
    if method == "scalekv":
        return {"ratio": ratio, **({"window": 4} if small else {})}
    if method == "hack":
        first_two = schedule.start(2)
        return {"budget": rows, "recent_cap": max(1, (rows - first_two) // 2)}
    if method in ("snapkv", "pyramidkv"):
        return {"ratio": ratio, **window}
    return {"ratio": ratio}


def plan_for(
    method: str, ratio: float, schedule: Schedule, family: str, classes: list[list[int]]
) -> dict[str, Any]:
    """The plan of one cell, checked by the method's config (``from_options``)."""
    config = methods()[method].from_options(options_for(method, ratio, schedule))
    plan: dict[str, Any] = {
        "diffcache": 1,
        "model": family,
        "method": method,
        "options": config.to_options(),
    }
    if method == "hack":
        plan["calibration"] = {"classes": classes}
    return plan


def selection_of(plan: dict[str, Any], schedule: Schedule, layers: int, heads: int) -> Any:
    """The selection ``plan``'s method builds for this model (as ``accelerate`` does)."""
    loaded = diffcache.Plan.load(plan)
    return loaded.config.make(loaded.calibration_data, schedule, layers, heads)


def memory_check(
    stats: Any, plan: dict[str, Any], schedule: Schedule, layers: int, heads: int
) -> dict[str, Any]:
    """Measured history / peak ratios against :class:`Geometry`'s, on the reported geometry
    (layers, heads and schedule checked against the model)."""
    g = Geometry(**{**stats.kv_geometry, "schedule": Schedule(stats.kv_geometry["schedule"])})
    if (g.layers, g.heads, g.schedule.sizes) != (layers, heads, schedule.sizes):
        raise ValueError(f"reported geometry {stats.kv_geometry} is not the model's")
    sel = selection_of(plan, schedule, layers, heads)
    budget, groups = selection_budget(sel, schedule, layers, heads)
    full, full_peak = g.history_before(None), g.sweep_peak(None)
    want, want_peak = g.history_before(budget, groups), g.sweep_peak(budget, groups)
    return {
        "rows_per_head": token_budget(None, plan["options"].get("ratio"), schedule)
        or plan["options"].get("budget"),
        "history": stats.kv_history_bytes[-1] / full[-1],
        "history_arith": want[-1] / full[-1],
        "peak": stats.kv_bytes_peak / full_peak,
        "peak_arith": want_peak / full_peak,
        "exact": list(stats.kv_history_bytes) == want and stats.kv_bytes_peak == want_peak,
        "history_bytes": stats.kv_history_bytes[-1],
        "full_history_bytes": full[-1],
    }


class Recording(FullHistory):
    """The plain cache that keeps each layer's queries and keys at the last scale."""

    def __init__(self, last: int) -> None:
        super().__init__()
        self.last, self.scale = last, 1.0
        self.maps: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def attend(
        self, call: ScaleCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        out = super().attend(call, q, k, v)
        if call.si == self.last:
            self.maps[call.layer] = (q.float(), self.k[call.layer].float())
            self.scale = call.scale
        return out


def hack_classes(pipe: Any, request: Request, schedule: Schedule) -> list[list[int]]:
    """HACK's head classes from one recorded run: contextual = the ``ALPHA`` lowest-variance
    heads over all layers (:func:`classify_heads`)."""
    store = Recording(len(schedule) - 1)
    pipe.history_store = lambda: store
    try:
        generate(pipe, request)
    finally:
        del pipe.history_store
    maps = [store.maps[layer] for layer in sorted(store.maps)]
    return classify_heads(variance_table(maps, store.scale), ALPHA).tolist()


def text(model: str) -> dict[str, str]:
    """The text field of a request: :data:`PROMPT` for Infinity, none for VAR."""
    return {"prompt": PROMPT} if builtin_models()[model].family == "infinity" else {}


def requests(model: str, seeds: int, images: int) -> list[Request]:
    """var-digits: classes 0-9 x ``seeds``; other VAR models ``images`` classes at seed 0;
    Infinity ``images`` seeds of :data:`PROMPT`."""
    if model == SCORED:
        return [Request(seed=s, class_label=c) for s in range(seeds) for c in range(10)]
    if builtin_models()[model].family == "var":
        return [Request(seed=0, class_label=c) for c in range(images)]
    return [Request(seed=s, **text(model)) for s in range(images)]


#: the clocks ``--clock`` names: wall seconds, or this process's CPU seconds
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def run_all(
    pipe: Any, reqs: Sequence[Request], device: str, clock: str = "wall"
) -> tuple[list[Any], float]:
    return timed(lambda: [generate(pipe, r) for r in reqs], device, CLOCKS[clock])


def bench_model(model: str, args: argparse.Namespace) -> dict[str, Any]:
    """Every (method, budget) cell of one model."""
    entry = builtin_models()[model]
    pipe = load_model(model).to(args.device)
    schedule, layers, heads = model_shape(pipe)
    reqs = requests(model, args.seeds, args.images)
    classes = hack_classes(pipe, Request(CALIBRATION_SEED, **text(model)), schedule)
    cells: dict[str, dict[str, Any]] = {}
    configs: list[str | None] = [None]
    for method in args.methods:
        for ratio in args.budgets:
            name = f"{method}@{ratio:g}"
            try:
                plan = plan_for(method, ratio, schedule, entry.family, classes)
                diffcache.accelerate(pipe, plan)
                diffcache.remove(pipe)
            except DiffCacheError as e:
                cells[name] = {"method": method, "budget": ratio, "refused": str(e)}
                continue
            cells[name] = {"method": method, "budget": ratio, "plan": plan, "times": []}
            configs.append(name)
    base_times: list[float] = []
    outputs: dict[str | None, list[Any]] = {}
    for round_ in range(-1, args.rounds):  # -1: the untimed warm-up
        for name in rotated(configs, max(round_, 0)):
            if name is not None:
                diffcache.accelerate(pipe, cells[name]["plan"])
            try:
                todo = reqs if round_ >= 0 else reqs[:1]
                images, seconds = run_all(pipe, todo, args.device, args.clock)
                if name is not None and round_ == 0:
                    stats = diffcache.stats(pipe)
                    cells[name].update(
                        memory_check(stats, cells[name]["plan"], schedule, layers, heads)
                    )
            finally:
                if name is not None:
                    diffcache.remove(pipe)
            if round_ < 0:
                continue
            outputs.setdefault(name, images)
            (base_times if name is None else cells[name]["times"]).append(seconds)
        print(f"{model}: round {round_ + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    base = outputs[None]
    scorer = entry.score_fn() if model == SCORED else None
    result: dict[str, Any] = {
        "schedule": [list(s) for s in schedule.sizes],
        "layers": layers,
        "heads": heads,
        "requests": len(reqs),
        "hack_classes": classes,
        "baseline_seconds": summary(base_times),
    }
    if scorer is not None:
        result["baseline_accuracy"] = accuracy(scorer, reqs, base)
    for name in configs[1:]:
        cell, imgs = cells[name], outputs[name]
        cell["time"] = summary(paired_speedups(cell.pop("times"), base_times))  # config / base
        pairs = list(zip(base, imgs, strict=True))
        cell["psnr"] = _finite(statistics.median(metrics.psnr(a, b) for a, b in pairs))
        cell["ssim"] = statistics.mean(metrics.ssim(a, b) for a, b in pairs)
        if scorer is not None:
            cell["accuracy"] = accuracy(scorer, reqs, imgs)
    result["cells"] = list(cells.values())
    return result


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no infinity


def accuracy(scorer: Any, reqs: Sequence[Request], images: Sequence[Any]) -> float:
    """Share of images the scorer reads as their requested class."""
    hits = [scorer(r.values["class_label"], img) for r, img in zip(reqs, images, strict=True)]
    return sum(map(bool, hits)) / len(hits)


def _ratio(cell: dict[str, Any], key: str) -> str:
    return f"{cell[key]:.3f} / {cell[key + '_arith']:.3f}"


def table(results: dict[str, dict[str, Any]], clock: str = "wall") -> str:
    """The markdown table of every cell (``clock``: what the time ratios measured)."""
    head = (
        "| model | method | budget | rows/head | history (meas / arith) | peak (meas / arith) "
        f"| exact | time ratio [min, max] ({clock} clock) | PSNR dB | SSIM | accuracy (base) |"
    )
    lines = [head, "|" + "---|" * 11]
    for model, res in results.items():
        base_acc = res.get("baseline_accuracy")
        for c in res["cells"]:
            if "refused" in c:
                lines.append(
                    f"| {model} | {c['method']} | {c['budget']:.0%} | refused: {c['refused']} "
                    + "| " * 7
                    + "|"
                )
                continue
            t = c["time"]
            psnr = "inf" if c["psnr"] is None else f"{c['psnr']:.1f}"
            acc = f"{c['accuracy']:.1%} ({base_acc:.1%})" if c.get("accuracy") is not None else "-"
            lines.append(
                f"| {model} | {c['method']} | {c['budget']:.0%} | {c['rows_per_head']} "
                f"| {_ratio(c, 'history')} | {_ratio(c, 'peak')} | {'yes' if c['exact'] else 'NO'} "
                f"| {t[0]:.2f} [{t[1]:.2f}, {t[2]:.2f}] | {psnr} | {c['ssim']:.3f} | {acc} |"
            )
    return "\n".join(lines)


def goals(results: dict[str, dict[str, Any]]) -> list[str]:
    """The issue's goals as facts about this run (not asserted)."""
    ran = [c for r in results.values() for c in r["cells"] if "refused" not in c]
    slower = [c for c in ran if c["time"][0] > 1.0]
    out = [
        f"memory equals the arithmetic in {sum(c['exact'] for c in ran)} of {len(ran)} cells",
        f"time ratio above 1 (slower than uncompressed) in {len(slower)} of {len(ran)} cells: "
        + (", ".join(f"{c['method']}@{c['budget']:g}" for c in slower) or "none"),
    ]
    if SCORED in results:
        base = results[SCORED]["baseline_accuracy"]
        kept = [
            c["method"]
            for c in results[SCORED]["cells"]
            if "refused" not in c
            and math.isclose(c["budget"], 0.1)
            and c["accuracy"] >= base - 0.05
        ]
        out.append(
            f"var-digits at 10%: within 5 points of the baseline ({base:.1%}): "
            + (", ".join(kept) or "no method")
        )
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    known = [n for n, e in builtin_models().items() if e.family in ("var", "infinity")]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=among(known), default=",".join(MODELS))
    p.add_argument("--methods", type=among(METHODS), default=",".join(METHODS))
    p.add_argument(
        "--budgets",
        type=listed(fraction),
        default=",".join(f"{b:g}" for b in BUDGETS),
        help="fractions of the history before the last scale",
    )
    p.add_argument("--rounds", type=positive, default=3, help="timed rounds (after one warm-up)")
    p.add_argument("--seeds", type=positive, default=2, help="var-digits seeds per class")
    p.add_argument("--images", type=positive, default=1, help="images per cell, other models")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=positive, default=None, help="torch threads on a CPU")
    p.add_argument(
        "--clock",
        choices=tuple(CLOCKS),
        default="wall",
        help="time wall seconds, or this process's CPU seconds (CPU runs only: a shared machine)",
    )
    p.add_argument("--out", default="out/bench-var", help="folder for var.json and var.md")
    args = p.parse_args(argv)
    for flag in ("models", "methods", "budgets"):
        if not getattr(args, flag):
            p.error(f"--{flag}: give at least one")
    if args.clock == "cpu" and args.device != "cpu":
        p.error("--clock cpu: CPU time does not count the GPU's work; use it with --device cpu")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    results = {}
    with measurement_threads(args.threads if args.device == "cpu" else None) as threads:
        for model in args.models:
            results[model] = bench_model(model, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    facts = goals(results)
    meta = {
        "command": " ".join(["python bench/var.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "device": args.device,
        "threads": threads,
        "clock": args.clock,
        "torch": torch.__version__,
        "hack_classes": f"offline head_stats.classify_heads (alpha {ALPHA}) on one calibration "
        f"run (seed {CALIBRATION_SEED}) of the same model; no HACK calibrator",
    }
    (out / "var.json").write_text(json.dumps({**meta, "goals": facts, "models": results}, indent=1))
    md = "\n".join([table(results, args.clock), "", *(f"- {f}" for f in facts)])
    (out / "var.md").write_text(md + "\n")
    print(md)
    print(
        f"\n{meta['command']} ({meta['device']}, {threads} thread(s), {args.clock} clock); "
        f"wrote {out}/var.json"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
