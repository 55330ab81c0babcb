"""The ``diffcache`` command. ``main(argv) -> int``; a DiffCacheError is one line and exit 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from diffcache.errors import DiffCacheError

EXIT_ERROR = 2


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except DiffCacheError as e:
        print(f"diffcache: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_ERROR


def _quiet_libraries() -> None:
    """Keep stderr for our own messages: transformers warns at import about optional image
    processors (torchvision) that no diffcache command uses."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "transformers" in sys.modules:
        sys.modules["transformers"].logging.set_verbosity_error()


def _one_line(e: Exception) -> str:
    parts = (line.strip().removeprefix("- ") for line in str(e).splitlines())
    return "; ".join(p for p in parts if p)


def _request_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="denoising steps")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--frames", type=int, default=None, help="video frames")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--class-label", type=int, default=None, help="class-conditional models (DiT)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffcache",
        description=("Training-free caching for diffusion models, driven by plan files."),
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate one video / image with an optional plan")
    p.add_argument("--model", required=True, help="built-in model name or local diffusers folder")
    p.add_argument("--plan", default=None, help="plan file or bundled plan name")
    p.add_argument("--prompt", default=None)
    _request_args(p)
    p.add_argument("--out", default=None, help=".mp4/.gif for video, .png for images")
    p.add_argument("--stats-json", default=None, help="write the run's Stats here")
    p.set_defaults(func=_generate)

    p = sub.add_parser("eval", help="baseline vs plans on the same prompts and seeds")
    p.add_argument("--model", required=True)
    p.add_argument("--plan", action="append", required=True, help="repeat for several plans")
    p.add_argument("--prompts", default=None, help="text file, one prompt per line")
    p.add_argument("--seeds", type=int, default=1, help="K seeds per prompt: --seed .. --seed+K-1")
    _request_args(p)
    p.add_argument("--out", required=True, help="output folder for report.{json,md,html}")
    p.set_defaults(func=_eval)

    p = sub.add_parser("plans", help="list, show or check plan files")
    psub = p.add_subparsers(dest="action", required=True)
    psub.add_parser("list", help="bundled plans").set_defaults(func=_plans_list)
    q = psub.add_parser("show", help="print a plan")
    q.add_argument("name")
    q.set_defaults(func=_plans_show)
    q = psub.add_parser("check", help="validate a plan, optionally against a model")
    q.add_argument("file")
    q.add_argument("--model", default=None)
    q.set_defaults(func=_plans_check)

    sub.add_parser("models", help="built-in models and supported families").set_defaults(
        func=_models
    )
    sub.add_parser("info", help="versions, devices, kernel backends, methods").set_defaults(
        func=_info
    )
    p = sub.add_parser("demo", help="baseline vs EasyCache on a built-in model, with a report")
    p.add_argument("--out", default="out/demo")
    p.add_argument("--model", default="wan2.1-tiny")
    p.set_defaults(func=_demo)
    return parser


def _request(args: argparse.Namespace, prompt: str | None = None) -> Any:
    from diffcache.generate import Request

    fields = {
        k: getattr(args, k)
        for k in (
            "steps",
            "height",
            "width",
            "frames",
            "guidance",
            "negative_prompt",
            "class_label",
        )
    }
    if args.seed is not None:
        fields["seed"] = args.seed
    return Request(prompt=prompt, **fields)


def _check_request(model: str, request: Any) -> Any:
    """Fill the built-in model's defaults and check the numeric fields."""
    from diffcache.models import builtin_models

    if model in builtin_models():
        request = request.merged(builtin_models()[model].defaults)
    for name in ("steps", "height", "width", "frames"):
        value = getattr(request, name)
        if value is not None and value < 1:
            raise DiffCacheError(f"--{name} must be >= 1, got {value}")
    return request


def _generate(args: argparse.Namespace) -> int:
    import diffcache
    from diffcache.generate import (
        VIDEO_SUFFIXES,
        check_media_path,
        generate,
        pipeline_kwargs,
        save_media,
    )
    from diffcache.plan import Plan, steps_mismatch
    from diffcache.registry import find_adapter

    if args.stats_json and not args.plan:
        raise DiffCacheError("--stats-json needs --plan (stats describe an accelerated run)")
    plan = Plan.load(args.plan) if args.plan else None  # bad plans fail before the model loads
    request = _check_request(args.model, _request(args, args.prompt))
    want = plan.valid_for.get("num_inference_steps") if plan is not None else None
    if want is not None and request.steps is not None and request.steps != want:
        raise steps_mismatch(want, request.steps)  # before the model is built
    pipe = diffcache.load_model(args.model)
    adapter = find_adapter(pipe)
    if "prompt" in adapter.call_args and not request.prompt:
        raise DiffCacheError(f"{args.model}: --prompt is required for {adapter.name} models")
    pipeline_kwargs(pipe, request)  # unsupported fields fail before any work
    video = adapter.media == "video"
    out = check_media_path(
        args.out
        or f"out/{Path(args.model).name}-seed{request.seed}"
        + (VIDEO_SUFFIXES[0] if video else ".png"),
        video,
    )
    if plan is not None:
        diffcache.accelerate(pipe, plan)
    media = generate(pipe, request, progress=sys.stderr.isatty())
    save_media(media, out)
    print(f"wrote {out}")
    if plan is not None:
        s = diffcache.stats(pipe).as_dict()
        print(
            f"{s['method']}: computed {s['computed']:g} of {s['model_calls']} denoiser calls "
            f"(compute_fraction {s['compute_fraction']:.3f}), {s['wall_s']:.2f} s"
        )
        if args.stats_json:
            Path(args.stats_json).write_text(json.dumps(s, indent=2))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from diffcache.eval.runner import DEFAULT_PROMPTS, evaluate

    prompts = DEFAULT_PROMPTS[:2]
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise DiffCacheError(f"{path}: no such prompts file (one prompt per line)")
        prompts = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
        if not prompts:
            raise DiffCacheError(f"{path}: the prompts file is empty")
    if args.seeds < 1:
        raise DiffCacheError(f"--seeds must be >= 1, got {args.seeds}")
    request = _check_request(args.model, _request(args))
    report = evaluate(
        args.model, args.plan, args.out, prompts=prompts, seeds=args.seeds, request=request
    )
    _print_report(report, args.out)
    return 0


def _print_report(report: dict, out: str) -> None:
    print(f"baseline: {report['baseline']['latency_s']:.3f} s per sample on {report['device']}")
    for r in report["runs"]:
        print(
            f"{r['plan']}: speedup {r['speedup']:.2f}x, compute_fraction "
            f"{r['compute_fraction']:.3f}, PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.4f}"
        )
    print(f"wrote {Path(out) / 'report.json'}, report.md, report.html")


def _plans_list(args: argparse.Namespace) -> int:
    from diffcache.plan import Plan, bundled_plans

    for name in bundled_plans():
        plan = Plan.load(name)
        opts = ", ".join(f"{k}={v}" for k, v in plan.options.items())
        valid = ", ".join(f"{k}={v}" for k, v in plan.valid_for.items()) or "any"
        print(f"{name:28s} {plan.model:14s} {plan.method:12s} {opts}  (valid for: {valid})")
    return 0


def _plans_show(args: argparse.Namespace) -> int:
    from diffcache.plan import Plan

    print(Plan.load(args.name).dumps(), end="")
    return 0


def _plans_check(args: argparse.Namespace) -> int:
    import diffcache
    from diffcache.plan import Plan

    plan = Plan.load(args.file)
    if args.model:
        pipe = diffcache.load_model(args.model)
        diffcache.accelerate(pipe, plan)
        diffcache.remove(pipe)
    print(
        f"ok: {plan.source}: {plan.method} for {plan.model}"
        + (f", attaches to {args.model}" if args.model else "")
    )
    return 0


def _models(args: argparse.Namespace) -> int:
    from diffcache.models import builtin_models
    from diffcache.registry import adapters

    print("built-in models:")
    for name, e in builtin_models().items():
        print(f"  {name:22s} {e.family:14s} {e.description}")
    print("families (local diffusers checkpoints load by folder path):")
    for name, a in adapters().items():
        print(f"  {name:14s} {', '.join(a.pipelines)}  [cfg: {a.cfg}, {a.media}]")
    return 0


def _info(args: argparse.Namespace) -> int:
    import importlib.metadata as md

    import torch

    import diffcache
    from diffcache import kernels
    from diffcache.registry import methods

    def version(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "not installed"

    print(
        f"diffcache {diffcache.__version__}; torch {torch.__version__}; diffusers "
        f"{version('diffusers')}; transformers {version('transformers')}; triton "
        f"{version('triton')}"
    )
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"CUDA device: {cuda}")
    print("kernel ops (backend that `auto` picks):")
    for op in kernels.describe():
        why = f" ({'; '.join(op['auto_on_cuda_reasons'])})" if op["auto_on_cuda_reasons"] else ""
        interp = ", triton interpreter on" if op["interpreter"] else ""
        print(
            f"  {op['name']:13s} on CUDA tensors: {op['auto_on_cuda']}{why}; on CPU: "
            f"{op['cpu']}{interp} - {op['description']}"
        )
    print("methods:")
    for name, cls in methods().items():
        print(f"  {name:14s} granularity={cls.granularity}, kernels={', '.join(cls.kernels)}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from diffcache.eval.runner import DEFAULT_PROMPTS, evaluate
    from diffcache.generate import Request

    plan = f"{args.model}.yaml"
    print(f"demo: {args.model}, baseline vs {plan}, 2 prompts x 2 seeds")
    report = evaluate(
        args.model, [plan], args.out, prompts=DEFAULT_PROMPTS[:2], seeds=2, request=Request()
    )
    _print_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
