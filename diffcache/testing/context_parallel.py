"""Caching under context parallelism, one process per rank.

``torchrun --nproc_per_node 2 -m diffcache.testing.context_parallel --model flux-tiny --ulysses 2
--plan none --plan flux-tiny.yaml --out DIR`` runs a built-in model under diffusers' context
parallelism, once per plan (``none``: uncached) on one pipeline (``accelerate``, generate,
``remove``), and writes ``DIR/rank<r>.pt`` on every rank: ``{plan: {"media", "stats"}}``. The
tests and ``bench/gpu.sh cp`` compare the ranks with each other and with :func:`run_plans` in one
process.

On a machine without GPUs the processes talk over gloo. diffusers 0.42.1 computes each rank's
device as ``rank % torch.accelerator.device_count()``, which divides by zero on CPU;
:func:`enable_context_parallel` makes that count 1 while the model is set up (the CPU device has
no index). Ring attention needs an attention backend that returns the log-sum-exp, which none of
diffusers' CPU backends does, so on CPU only Ulysses runs; on GPUs ``--ring 2 --attention-backend
_native_cudnn --dtype bfloat16`` (those backends take half precision only).

:func:`sharded_toy_rank` is one rank of our own sharded toy: ``ToyPipeline`` whose latents are split
along their last dimension, so each rank's run is its slice of the one-process run only if every
rank takes the one-process run's decisions.
"""

from __future__ import annotations

import argparse
import os
import types
from pathlib import Path
from typing import Any
from unittest import mock

import torch

TOY_PLAN = {
    "diffcache": 1,
    "model": "toy",
    "method": "easycache",
    "options": {"threshold": 0.3, "warmup_steps": 2},
}


def enable_context_parallel(transformer: Any, ring: int = 1, ulysses: int = 1) -> None:
    """``transformer.enable_parallelism`` with a ring x Ulysses ``ContextParallelConfig`` over
    the default process group (which must span ``ring * ulysses`` ranks)."""
    from diffusers import ContextParallelConfig

    config = ContextParallelConfig(ring_degree=ring, ulysses_degree=ulysses)
    if torch.accelerator.device_count() > 0:
        transformer.enable_parallelism(config=config)
        return
    with mock.patch.object(torch.accelerator, "device_count", return_value=1):
        transformer.enable_parallelism(config=config)


def run_plans(
    model: str,
    plans: list[str],
    ring: int = 1,
    ulysses: int = 1,
    backend: str | None = None,
    dtype: str = "float32",
) -> dict[str, dict[str, Any]]:
    """``model``'s default request (seed 0) once per plan (``"none"``: uncached), on one
    pipeline in ``dtype``: context parallel when ``ring * ulysses`` > 1 (call it on every
    rank), each plan applied after parallelism is on and removed after its run; ``backend``
    names diffusers' attention backend. A calibrated plan runs whatever its ``valid_for.weights``
    (the bundled ones are float32): this compares context parallel with one process on the same
    plans. Returns ``{plan: {"media": tensor, "stats": dict | None}}``."""
    import diffcache
    from diffcache.generate import Request, generate
    from diffcache.models import cast, load_model
    from diffcache.plan import Plan

    pipe = load_model(model).to("cuda" if torch.cuda.is_available() else "cpu")
    cast(pipe, getattr(torch, dtype))
    if backend is not None:
        pipe.transformer.set_attention_backend(backend)
    if ring * ulysses > 1:
        enable_context_parallel(pipe.transformer, ring=ring, ulysses=ulysses)
    results = {}
    for plan in plans:
        if plan != "none":
            diffcache.accelerate(pipe, plan=_any_weights(Plan.load(plan)))
        media = torch.from_numpy(generate(pipe, Request(prompt="a red ball on a table")))
        stats = diffcache.stats(pipe).as_dict() if plan != "none" else None
        diffcache.remove(pipe)
        results[plan] = {"media": media, "stats": stats}
    return results


def _any_weights(plan: Any) -> Any:
    """``plan`` without its ``valid_for.weights`` check."""
    import dataclasses

    valid_for = {k: v for k, v in plan.valid_for.items() if k != "weights"}
    return dataclasses.replace(plan, valid_for=valid_for)


def toy_script(world: int, steps: int = 8) -> list[torch.Tensor]:
    """The latents ``ToyScheduler`` replays, (1, 3, 4 * world) each: slice ``r`` decays at its
    own rate (0.95 for the first down to 0.5 for the last), so a slice's own statistics would
    give it its own decisions."""
    rates = torch.linspace(0.95, 0.5, world).repeat_interleave(4)
    return [(16 * rates**i).expand(1, 3, 4 * world).clone() for i in range(steps)]


def sharded_toy_rank(rank: int, world: int, init_file: str, out: str) -> None:
    """One of ``world`` gloo processes: EasyCache (``TOY_PLAN``) on ``ToyPipeline`` replaying
    this rank's slice of :func:`toy_script`; writes ``out/rank<r>.pt`` with the denoiser
    outputs of every step (computed or reused) and the Stats."""
    import torch.distributed as dist

    import diffcache
    from diffcache.registry import adapters, register_adapter
    from diffcache.testing.toys import TOY, ToyPipeline

    if "toy" not in adapters():  # a spawned process has not run the tests' conftest
        register_adapter(TOY)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        script = [x.chunk(world, dim=-1)[rank].contiguous() for x in toy_script(world)]
        pipe = ToyPipeline(cfg="none", script=script)
        mesh = types.SimpleNamespace(size=lambda: world, get_group=lambda: dist.group.WORLD)
        cp = types.SimpleNamespace(_flattened_mesh=mesh)
        pipe.transformer._parallel_config = types.SimpleNamespace(context_parallel_config=cp)
        diffcache.accelerate(pipe, TOY_PLAN)
        pipe(latents=script[0], steps=len(script))
        state = {"outputs": pipe.scheduler.outputs, "stats": diffcache.stats(pipe).as_dict()}
        torch.save(state, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def mismatches(ranks: list[dict], one: dict, atol: float) -> list[str]:
    """How the ranks' results of :func:`run_plans` differ from each other and from one process's
    (``one``): media beyond ``atol`` or not identical across ranks, Stats other than wall time."""

    def timeless(stats: dict | None) -> dict | None:
        return None if stats is None else {k: v for k, v in stats.items() if k != "wall_s"}

    found = []
    for plan, want in one.items():
        got = [r[plan] for r in ranks]
        if any(not torch.equal(g["media"], got[0]["media"]) for g in got):
            found.append(f"{plan}: the ranks' media differ")
        if any(timeless(g["stats"]) != timeless(got[0]["stats"]) for g in got):
            found.append(f"{plan}: the ranks' Stats differ")
        if timeless(got[0]["stats"]) != timeless(want["stats"]):
            found.append(f"{plan}: Stats {got[0]['stats']} != one process {want['stats']}")
        diff = float((got[0]["media"] - want["media"]).abs().max())
        if not diff <= atol:
            found.append(f"{plan}: media differ from one process by {diff:.3g} > {atol}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--plan", action="append", required=True, help="repeat; none: uncached")
    parser.add_argument("--ring", type=int, default=1)
    parser.add_argument("--ulysses", type=int, default=1)
    parser.add_argument(
        "--attention-backend",
        help="diffusers' name; ring needs one that returns the log-sum-exp: _native_cudnn, "
        "_native_flash, flash, sage (GPU, float16 / bfloat16)",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="the pipeline's, as from_pretrained(torch_dtype=...) loads it (default float32)",
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--check", type=float, metavar="ATOL", help="rank 0 compares with one process after"
    )
    args = parser.parse_args(argv)
    if args.ring > 1 and (args.attention_backend is None or args.dtype == "float32"):
        parser.error(
            f"--ring {args.ring} needs --attention-backend (e.g. _native_cudnn) and --dtype "
            "bfloat16 or float16: ring attention merges the log-sum-exp that only those "
            f"half-precision GPU backends return (got --attention-backend "
            f"{args.attention_backend}, --dtype {args.dtype})"
        )
    if args.ring > 1 and not torch.cuda.is_available():
        parser.error(f"--ring {args.ring} --attention-backend {args.attention_backend}: no GPU")
    import torch.distributed as dist

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        rank = dist.get_rank()
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        setup = {"backend": args.attention_backend, "dtype": args.dtype}
        results = run_plans(args.model, args.plan, args.ring, args.ulysses, **setup)
        args.out.mkdir(parents=True, exist_ok=True)
        torch.save(results, args.out / f"rank{rank}.pt")
        dist.barrier()
        if args.check is None or rank != 0:
            return 0
        ranks = [
            torch.load(args.out / f"rank{r}.pt", weights_only=False)
            for r in range(dist.get_world_size())
        ]
        one = run_plans(args.model, args.plan, **setup)  # the same attention, unsplit
        found = mismatches(ranks, one, args.check)
        for plan in args.plan:
            stats = results[plan]["stats"] or {}
            diff = float((results[plan]["media"] - one[plan]["media"]).abs().max())
            print(
                f"{plan}: compute_fraction {stats.get('compute_fraction', 1.0)}, "
                f"media max |context parallel - one process| {diff:.2g}"
            )
        print("\n".join(found) or f"every rank equals one process (media within {args.check})")
        return 1 if found else 0
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
