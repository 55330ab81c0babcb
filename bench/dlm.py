"""Text diffusion LLM caches side by side: tokens/s of every method against no cache.

A mid-size LLaDA-architecture model (default 12 layers, d_model 1024, the real 126,464-token
vocabulary) and the Dream equivalent (GQA), random weights, generate ``--gen-length`` tokens in
blocks of ``--block`` after a prompt. The runs are interleaved (in an order rotated by the round,
``diffcache.eval.timing``) — no cache, the parallel-decoding
control (no cache, Fast-dLLM's threshold 0.9: most of Fast-dLLM's speed is fewer steps, not the
cache), then each method's bundled tiny-model plan — and each is timed ``--repeats`` times; the
median counts (on CUDA after one more, untimed pass: the one whose synchronising clocks measure
the decoder share). Per run: median seconds, speedup, tokens/s (tokens up to and including the
first EOS), model calls, compute fraction (recomputed token-layers over those of the no-cache
generation, so the calls parallel decoding saves count as skipped; the parallel-only control's
is its calls / baseline calls), the ideal speedup for that work given the decoder layers' share
s of the baseline time — 1 / ((1 − s) · calls / baseline calls + s · compute): the LM head (run
on the needed rows only) and the sampler run once per call and are outside the cached work — the
fraction of that ideal reached, and exact agreement of the tokens with the no-cache output.
Nothing is asserted.

"affine" is a second, hardware-aware ideal: a call's decoder-layer time modelled as a fixed
part plus a part proportional to its recomputed rows, fitted to a call on a short sequence (the
fixed part: the weights stream from memory whatever the row count) and the baseline's calls,
and summed over the run's calls at their measured rows. "of affine" near 1 says the engine adds
no overhead of its own and the rest of the gap to "ideal" is the hardware's cost of few-row
matrix products.

With ``llada-arith`` installed the accuracy part runs ``diffcache eval`` on its held-out tasks
for every LLaDA plan: accuracy beside the no-cache accuracy, the tasks each plan lost and won
against it, and accuracy per task type. ``--tasks N`` draws N fresh held-out tasks instead of
the bundled 200 (a tighter estimate: one task is 0.5 points of 200). ``--batch N`` times N
prompts of different lengths per call: the cached steps' few rows per layer become N times as
many, which is where a CPU's matrix products get efficient.

    python bench/dlm.py                # full size (a GPU, or a lot of patience)
    python bench/dlm.py --small        # 4 layers, d_model 256, 64 tokens: minutes on a CPU
    python bench/dlm.py --families "" --tasks 1000   # only the accuracy part, on 1000 tasks
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from arg_types import among, listed, non_negative, positive
from reference_models import lost_won, per_request, sign_p

import diffcache
from diffcache.eval import timing
from diffcache.generate import Request
from diffcache.models import builtin_models
from diffcache.pipelines.arith import DEFAULTS, LONG
from diffcache.plan import Plan

METHODS = ("fast_dllm", "dkv_cache", "elastic_cache", "d2cache")
#: the llada-arith requests by generation length: the default (16) and the longer ones
ARITH = {DEFAULTS["gen_length"]: DEFAULTS, **LONG}
PROMPT = "Question: a train leaves at nine and travels two hundred miles at fifty per hour. "


def build(family: str, layers: int, width: int, dtype: torch.dtype, device: str) -> Any:
    """The pipeline at the bench size, real vocabulary and special ids, random weights."""
    heads = max(width // 128, 1)
    if family == "llada":
        from diffcache.pipelines.llada import LLaDAPipeline
        from diffcache.pipelines.llada.model import build_tiny_llada

        model, tok = build_tiny_llada(
            d_model=width, n_layers=layers, n_heads=heads, n_kv_heads=heads,
            mlp_hidden_size=3 * width, max_sequence_length=4096,
        )  # fmt: skip
        pipe = LLaDAPipeline(model, tok)
    else:
        from diffcache.pipelines.dream import DreamPipeline
        from diffcache.pipelines.dream.model import build_tiny_dream

        model, tok = build_tiny_dream(
            hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=max(heads // 4, 1), intermediate_size=3 * width,
            max_position_embeddings=4096,
        )  # fmt: skip
        pipe = DreamPipeline(model, tok)
    pipe.model.to(device=device, dtype=dtype)
    return pipe


class Clock:
    """Seconds spent inside a module's forward, while ``on`` (on CUDA it synchronises)."""

    def __init__(self, module: torch.nn.Module, device: str) -> None:
        self.seconds, self.device, self._t0, self.on = 0.0, device, 0.0, True
        module.register_forward_pre_hook(lambda *a: self._start())
        module.register_forward_hook(lambda *a: self._stop())

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def _start(self) -> None:
        if self.on:
            self._sync()
            self._t0 = time.perf_counter()

    def _stop(self) -> None:
        if self.on:
            self._sync()
            self.seconds += time.perf_counter() - self._t0


def lm_head(model: torch.nn.Module) -> torch.nn.Module:
    """The LM head (its work is the same with and without a cache: logits of needed rows)."""
    return model.lm_head if hasattr(model, "lm_head") else model.model.transformer["ff_out"]


def prompts(batch: int) -> list[str]:
    """``batch`` prompts of up to 8 different lengths (left padding in every batch above 1)."""
    return [PROMPT[: len(PROMPT) - 9 * (i % 8)] for i in range(batch)]


def timed(
    pipe: Any, kw: dict, device: str, batch: int = 1, prompt: str | None = None
) -> tuple[float, Any]:
    out, seconds = timing.timed(
        lambda: pipe(prompts(batch) if prompt is None else [prompt], **kw), device
    )
    return seconds, out


def short_call(pipe: Any, clock: Clock, head: Clock, device: str) -> tuple[float, int]:
    """Decoder-layer seconds of one model call on a short sequence (a one-token answer to a
    one-word prompt), median of 5, and its rows: the fixed part of the affine cost model."""
    times, rows = [], 0
    for _ in range(5):
        clock.seconds = head.seconds = 0.0
        _, out = timed(pipe, {"gen_length": 1, "steps": 1, "block_length": 1}, device, 1, "Hi")
        times.append(clock.seconds - head.seconds)
        rows = out.tokens.numel()
    return statistics.median(times), rows


def bench_family(family: str, args: argparse.Namespace, device: str) -> None:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    pipe = build(family, args.layers, args.d_model, dtype, device)
    kw = {"gen_length": args.gen_length, "steps": args.gen_length, "block_length": args.block}
    if family == "dream":
        kw["alg"] = "maskgit_plus"  # a confidence sampler (the references' cached Dream runs)
    runs: list[tuple[str, Plan | None, dict]] = [
        ("no cache", None, {}),
        ("parallel only", None, {"threshold": 0.9}),
    ]
    runs += [(m, Plan.load(f"{family}-tiny-{m}.yaml"), {}) for m in METHODS]
    clock, head = Clock(pipe.model, device), Clock(lm_head(pipe.model), device)
    seconds: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    facts: dict[str, dict] = {}
    timed(pipe, kw, device, args.batch)  # warm-up
    floor, floor_rows = short_call(pipe, clock, head, device)
    # the first pass measures shares and calls; on CUDA its clocks synchronise inside every
    # call, so it is an extra, untimed pass there (on a CPU they cost nothing and it counts)
    probe = int(device == "cuda")
    for rep in range(args.repeats + probe):
        clock.on = head.on = rep == 0
        for name, plan, extra in timing.rotated(runs, rep):  # no run always in one slot
            if plan is not None:
                diffcache.accelerate(pipe, plan)
            clock.seconds = head.seconds = 0.0
            try:
                s, out = timed(pipe, {**kw, **extra}, device, args.batch)
                stats = diffcache.stats(pipe) if plan is not None else None
            finally:
                if plan is not None:
                    diffcache.remove(pipe)
            if rep >= probe:
                seconds[name].append(s)
            if rep == 0:
                facts[name] = {
                    "tokens": out.tokens.cpu(),
                    "generated": int(out.generated.sum()),
                    "calls": out.steps,
                    "cf": out.steps / kw["steps"] if stats is None else stats.compute_fraction,
                    "share": (clock.seconds - head.seconds) / s,
                    "rows": out.tokens.numel(),  # rows of a full call
                    "per_call": [1.0] * out.steps if stats is None else [c[2] for c in stats.calls],
                }
    base = facts["no cache"]
    base_s = statistics.median(seconds["no cache"])
    share = base["share"]
    print(f"\n== {family}: {args.layers} layers, d_model {args.d_model}, gen {args.gen_length}, "
          f"block {args.block}, batch {args.batch}, {device} {str(dtype).replace('torch.', '')}, "
          f"decoder-layer share of the baseline {share:.3f}, median of {args.repeats}")  # fmt: skip
    print(f"{'run':14s} {'s':>8s} {'speedup':>8s} {'tok/s':>8s} {'calls':>6s} {'compute':>8s} "
          f"{'ideal':>6s} {'of ideal':>8s} {'affine':>6s} {'of affine':>9s} "
          f"{'agree':>6s}")  # fmt: skip
    full = share * base_s / base["calls"]  # decoder seconds of one full call
    slope = (full - floor) / max(base["rows"] - floor_rows, 1)  # per extra row
    for name, _, _ in runs:
        f, med = facts[name], statistics.median(seconds[name])
        steps = f["calls"] / base["calls"]  # the head and the sampler run once per call
        ideal = 1.0 / ((1.0 - share) * steps + share * f["cf"])
        speedup = base_s / med
        agree = float(torch.equal(f["tokens"], base["tokens"]))
        cells = [f"{med:8.3f}", f"{speedup:8.2f}", f"{f['generated'] / med:8.1f}"]
        cells += [f"{f['calls']:6d}", f"{f['cf']:8.3f}", f"{ideal:6.2f}"]
        rows = [c * base["rows"] for c in f["per_call"]]
        layers = sum(floor + slope * max(r - floor_rows, 0.0) for r in rows)
        affine = base_s / ((1.0 - share) * base_s * steps + layers)
        cells += [f"{speedup / ideal:8.2f}", f"{affine:6.2f}", f"{speedup / affine:9.2f}"]
        cells += [f"{agree:6.0f}"]
        print(f"{name:14s} " + " ".join(cells))


def arith_tasks(n: int) -> list[Any]:
    """``n`` held-out llada-arith tasks (about n/4 of each type) that are not in the bundled
    file: a second, larger sample of the same held-out distribution for a tighter estimate."""
    from diffcache.pipelines.arith import data

    bundled = {ex.prompt for ex in data.read_task_file()}
    per_task = -(-n // len(data.TASKS))
    fresh = data.held_out_tasks(seed=data.TASK_FILE_SEED + 1, per_task=per_task + data.PER_TASK)
    taken = dict.fromkeys(data.TASKS, 0)
    out = []
    for ex in fresh:
        if ex.prompt not in bundled and taken[ex.task] < per_task:
            taken[ex.task] += 1
            out.append(ex)
    return out[:n]


def accuracy(args: argparse.Namespace) -> None:
    if "llada-arith" not in builtin_models():
        print("\nllada-arith is not installed here: no accuracy part")
        return
    from diffcache.pipelines.arith import data

    tasks = arith_tasks(args.tasks) if args.tasks else data.read_task_file()
    for gen in args.arith_gen:
        arith_table(args, tasks, gen, Request(**ARITH[gen]))


def arith_table(args: argparse.Namespace, tasks: list[Any], gen: int, request: Request) -> None:
    """Every LLaDA plan on ``tasks`` at generation length ``gen``: accuracy against the
    no-cache run's, per task type, with the lost/won tasks, compute and speedup."""
    from diffcache.eval.runner import evaluate

    plans = [Plan.load(f"llada-tiny-{m}.yaml") for m in METHODS]
    report = evaluate(
        "llada-arith", plans, Path(args.out) / f"llada-arith-gen{gen}",
        prompts=[ex.prompt for ex in tasks], answers=[ex.answer for ex in tasks], request=request,
    )  # fmt: skip
    kinds = [ex.task for ex in tasks]
    right = per_request(report, "accuracy")
    base = right["baseline"]
    fields = {k: v for k, v in report["requests"][0].items() if k not in ("prompt", "seed")}
    print(f"\n== llada-arith {fields}: {len(tasks)} held-out "
          f"tasks one by one ({'fresh' if args.tasks else 'the bundled file'}), "
          f"baseline accuracy {report['baseline']['accuracy']:.3f}")  # fmt: skip
    print("by type: " + _by_type(base, kinds))
    for r in report["runs"]:
        got = right[r["plan"]]
        print(f"{r['plan']:32s} accuracy {r['accuracy']:.3f}  drop {r['accuracy_drop']:+.3f}  "
              f"(lost/won {lost_won(base, got)}, sign test p {sign_p(base, got)})  "
              f"agreement {r['agreement']:.3f}  "
              f"compute {r['compute_fraction']:.3f}  speedup {r['speedup']:.2f}")  # fmt: skip
        print(f"{'':32s} by type: " + _by_type(got, kinds))


def _by_type(right: dict[int, float], kinds: list[str]) -> str:
    """Accuracy per task type, e.g. ``add 0.924  sort 0.972 ...``."""
    cells = []
    for kind in dict.fromkeys(kinds):
        scores = [right[i] for i, k in enumerate(kinds) if k == kind]
        cells.append(f"{kind} {statistics.fmean(scores):.3f}")
    return "  ".join(cells)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--families", type=among(("llada", "dream")), default="llada,dream",
        help="speed tables to run ('' for none: the accuracy part only)",
    )  # fmt: skip
    p.add_argument("--layers", type=positive, default=12)
    p.add_argument("--d-model", type=positive, default=1024, help="a multiple of 64")
    p.add_argument("--gen-length", type=positive, default=256)
    p.add_argument("--block", type=positive, default=32, help="divides --gen-length")
    p.add_argument("--repeats", type=positive, default=3)
    p.add_argument("--batch", type=positive, default=1, help="prompts per call (different lengths)")
    p.add_argument(
        "--tasks", type=non_negative, default=0,
        help="llada-arith: this many fresh held-out tasks (0: the bundled 200)",
    )  # fmt: skip
    p.add_argument(
        "--arith-gen", type=listed(positive), default="16,64",
        help="llada-arith generation lengths (16, 32, 64; the longer ones in blocks of 16; '' "
        "skips the accuracy part)",
    )  # fmt: skip
    p.add_argument(
        "--small", action="store_true",
        help="4 layers, d_model 256, 64 tokens in blocks of 16 (overrides those flags)",
    )  # fmt: skip
    p.add_argument("--threads", type=positive, default=None)
    p.add_argument("--out", default="out/bench-dlm")
    args = p.parse_args(argv)
    if args.d_model % 64:
        p.error(
            f"--d-model must be a multiple of 64 (heads of 128 or one head), got {args.d_model}"
        )
    if args.gen_length % args.block:
        p.error(f"--block {args.block} must divide --gen-length {args.gen_length}")
    if args.tasks > 2000:  # about 945 held-out word problems exist
        p.error(f"--tasks must be in 0..2000, got {args.tasks}")
    if not set(args.arith_gen) <= set(ARITH):
        p.error(f"--arith-gen lengths must be among {sorted(ARITH)}, got {args.arith_gen}")
    if args.small:
        args.layers, args.d_model, args.gen_length, args.block = 4, 256, 64, 16
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    for family in args.families:
        bench_family(family, args, device)
    accuracy(args)


if __name__ == "__main__":
    main()
