"""The ``diffcache`` command. ``main(argv) -> int``; errors are one line on stderr and exit 2.

Every argument, plan and output path is checked before a model is built or a sample generated.
The generation flags (``--height``, ``--class-label`` ...) come from the request fields the model
families declare (``diffcache.request.Field``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from diffcache.errors import DiffCacheError

EXIT_ERROR = 2
#: calibration inputs of ``profile`` when neither --prompts nor --num-prompts is given
DEFAULT_CALIBRATION = 8


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and no abbreviated options (``--prompt`` is not
    ``--prompts``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("diffcache").strip()
        where = f"{command}: " if command else ""
        print(f"diffcache: error: {where}{_one_line(ValueError(message))}", file=sys.stderr)
        raise SystemExit(EXIT_ERROR)


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    parser = _parser()
    try:  # argparse exits (usage errors: 2, --help: 0); main returns the code instead
        args, extra = parser.parse_known_args(argv)
        if extra:
            parser.error(_unrecognized(args.command, extra))
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT_ERROR
    try:
        return args.func(args) or 0
    except DiffCacheError as e:
        print(f"diffcache: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as e:  # a file that could not be read or written after all the checks
        where = f": {e.filename}" if e.filename else ""
        print(f"diffcache: error: {e.strerror or e}{where}", file=sys.stderr)
        return EXIT_ERROR


def _quiet_libraries() -> None:
    """Keep stderr for our own messages: transformers warns at import about optional image
    processors (torchvision) that no diffcache command uses."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "transformers" in sys.modules:
        sys.modules["transformers"].logging.set_verbosity_error()


def _one_line(e: Exception) -> str:
    parts = [line.strip().removeprefix("- ") for line in str(e).splitlines()]
    parts = [p for p in parts if p]
    if len(parts) > 1 and parts[0].endswith(":"):  # "title:" then its items
        return f"{parts[0]} {'; '.join(parts[1:])}"
    return "; ".join(parts)


def _unrecognized(command: str, extra: list[str]) -> str:
    """The error for arguments no parser took, with a hint for the usual mix-ups."""
    message = f"{command}: unrecognized arguments: {' '.join(extra)}"
    if command in ("eval", "profile") and "--prompt" in extra:
        message += f"; {command} takes no --prompt, give --prompts FILE (one prompt per line)"
    return message


# ---------------------------------------------------------------------------- parser
def _request_args(p: argparse.ArgumentParser, skip: Sequence[str] = ()) -> None:
    from diffcache.generate import request_fields

    p.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    for f in request_fields().values():
        if f.name not in skip:
            p.add_argument(f.flag, dest=f.name, type=f.type, default=None, help=f.help)


def _parser() -> argparse.ArgumentParser:
    import diffcache  # noqa: F401  (fills the registries the flags come from)

    parser = _Parser(
        prog="diffcache", description="Training-free caching for diffusion models, driven by plans."
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("generate", help="generate one sample, optionally with a plan")
    p.add_argument("--model", required=True, help="built-in model name or local model folder")
    _lora_arg(p)
    p.add_argument("--plan", default=None, help="plan file or bundled plan name")
    _request_args(p)
    p.add_argument("--out", default=None, help=".mp4/.gif video, .png image, .txt or - for text")
    p.add_argument("--stats-json", default=None, help="write the run's Stats here (needs --plan)")
    p.add_argument(
        "--trace",
        default=None,
        metavar="FILE",
        help="write the plan's step trace here as JSON: every decision and the values that made "
        "it (needs --plan)",
    )
    p.set_defaults(func=_generate)

    p = sub.add_parser("profile", help="profile a model and write a plan for a method")
    p.add_argument("--model", required=True)
    _lora_arg(p)
    p.add_argument("--method", default=None, help="the method (or the one of --from)")
    p.add_argument(
        "--from",
        dest="start",
        default=None,
        help="start from a plan or template's method, options and step count (e.g. the "
        "published settings in flux-hyca.yaml; `diffcache plans list`)",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompts", default=None, help="calibration prompts, one per line")
    src.add_argument(
        "--num-prompts",
        type=int,
        default=None,
        help=f"N calibration inputs: the model's own where it has them, else bundled prompts "
        f"(class ids 0..N-1 for class-conditional models); the default without --prompts: "
        f"{DEFAULT_CALIBRATION}",
    )
    p.add_argument("--seeds", type=int, default=1, help="seeds per prompt: --seed .. --seed+K-1")
    goal = p.add_mutually_exclusive_group()
    goal.add_argument("--target-compute", type=float, default=None, help="compute fraction")
    goal.add_argument("--target-speedup", type=float, default=None, help="speedup to reach")
    goal.add_argument(
        "--target-kv",
        type=float,
        default=None,
        help="KV methods of next-scale models: the fraction of the plain history KV to keep",
    )
    p.add_argument(
        "--option",
        action="append",
        metavar="KEY=VALUE",
        help="a fixed option of the method (repeatable), e.g. --option warmup_steps=4; the "
        "model's bundled default plan gives the others when it uses this method",
    )
    _request_args(p, skip=("prompt",))
    p.add_argument("--out", required=True, help="plan file to write (.yaml)")
    _timing_args(p)
    p.set_defaults(func=_profile)

    p = sub.add_parser("eval", help="baseline vs plans on the same prompts and seeds")
    p.add_argument("--model", required=True)
    _lora_arg(p)
    p.add_argument("--plan", action="append", required=True, help="repeat for several plans")
    p.add_argument("--prompts", default=None, help="text file, one prompt per line")
    p.add_argument("--seeds", type=int, default=1, help="K seeds per prompt: --seed .. --seed+K-1")
    _request_args(p, skip=("prompt",))
    p.add_argument("--out", required=True, help="output folder for report.{json,md,html}")
    p.add_argument(
        "--macs",
        choices=("first", "all"),
        default="first",
        help="count the denoiser's Linear MACs on the first request (default) or on every "
        "request (adaptive caches differ per input; one more untimed run each)",
    )
    p.add_argument(
        "--trace",
        action="store_true",
        help="write each plan's step trace, per request, to DIR/traces/<plan>.jsonl (one more "
        "untimed run per plan and request)",
    )
    _timing_args(p)
    p.set_defaults(func=_eval)

    p = sub.add_parser("plans", help="list, show or check plan files")
    psub = p.add_subparsers(dest="action", required=True, parser_class=_Parser)
    psub.add_parser("list", help="bundled plans").set_defaults(func=_plans_list)
    q = psub.add_parser("show", help="print a plan")
    q.add_argument("name")
    q.set_defaults(func=_plans_show)
    q = psub.add_parser("check", help="validate a plan, optionally against a model")
    q.add_argument("file")
    q.add_argument("--model", default=None)
    q.set_defaults(func=_plans_check)
    q = psub.add_parser(
        "import", help="turn InvarDiff's JSON books or a ScaleKV budget file into a plan"
    )
    q.add_argument("file", help="the reference's cache book or budget .json")
    q.add_argument("--method", choices=("invardiff", "scalekv"), default="invardiff")
    q.add_argument("--model", help="invardiff: the model the books were made for")
    q.add_argument("--depth", type=int, help="scalekv: the model's layers")
    q.add_argument("--family", default="infinity", help="scalekv: the plan's model family")
    q.add_argument(
        "--average", type=int, help="scalekv: the file's mean budget (default: the released 650)"
    )
    q.add_argument("--out", required=True, help="plan file to write (.yaml)")
    q.set_defaults(func=_plans_import)

    p = sub.add_parser(
        "kv", help="a next-scale model's KV cache, full vs a plan, from its config (no weights)"
    )
    p.add_argument(
        "--model",
        required=True,
        help="a config name: var-d16..var-d36, infinity-2b/8b, var-tiny, var-digits",
    )
    p.add_argument("--plan", required=True, help="a KV plan for the model's family")
    p.add_argument("--batch", type=int, default=1, help="images (2 cached rows each with CFG)")
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="the run's guidance scale (default: the model's); VAR runs CFG rows above 0, "
        "Infinity at any scale but 1",
    )
    p.add_argument("--height", type=int, default=None, help="default: the model's size")
    p.add_argument("--width", type=int, default=None, help="default: the model's size")
    p.add_argument(
        "--dtype",
        choices=("bf16", "fp16", "fp32"),
        default="bf16",
        help="compute dtype: V is kept in it, K in fp32 (cosine attention)",
    )
    p.set_defaults(func=_kv)

    sub.add_parser("models", help="built-in models and supported families").set_defaults(
        func=_models
    )
    sub.add_parser("info", help="versions, devices, kernel backends, methods").set_defaults(
        func=_info
    )
    p = sub.add_parser("demo", help="baseline vs the default plans of the reference models")
    p.add_argument("--out", default="out/demo")
    p.add_argument(
        "--model",
        action="append",
        help="a built-in model with a bundled default plan (repeatable; default: the "
        f"reference models {', '.join(DEMO_MODELS)})",
    )
    _timing_args(p)
    p.set_defaults(func=_demo)
    return parser


def _lora_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--lora",
        action="append",
        metavar="PATH[:WEIGHT]",
        help="load a LoRA (a .safetensors file, or a folder holding one) into the model at "
        "WEIGHT (default 1); repeatable: all are active, as diffusers' set_adapters(names, "
        "weights)",
    )


def _timing_args(p: argparse.ArgumentParser) -> None:
    """--repeats and --threads: how speed is measured (``diffcache.eval.timing``)."""
    from diffcache.eval.timing import REPEATS

    p.add_argument(
        "--repeats",
        type=int,
        default=REPEATS,
        help=f"timed rounds per request, baseline and plans interleaved after a warm-up; the "
        f"speedup is their median, with the spread (default {REPEATS})",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads while measuring (default: OMP_NUM_THREADS, else 1)",
    )


def _check_timing(args: argparse.Namespace) -> None:
    from diffcache.eval.timing import check_count

    check_count(args.repeats, "--repeats")
    if args.threads is not None:
        check_count(args.threads, "--threads")


# ---------------------------------------------------------------------------- helpers
def _request(
    args: argparse.Namespace,
    model: str,
    sample: str | None = None,
    inputs: str | None = None,
) -> tuple[Any, Any]:
    """The request from the flags (built-in defaults filled in) and the model's family adapter
    when it is known before loading (built-in models). The request is checked with ``sample``,
    one of a command's inputs (eval's and profile's), in the family's required input field,
    which errors call ``inputs`` (see ``generate.check``)."""
    from diffcache.generate import Request, check, request_fields
    from diffcache.models import builtin_models
    from diffcache.registry import adapters

    values = {name: getattr(args, name, None) for name in request_fields()}
    req = Request(seed=0 if args.seed is None else args.seed, **values)
    entry = builtin_models().get(model)
    if entry is None:
        if not Path(model).is_dir():
            from diffcache.models import model_entry

            model_entry(model)  # raises: not built-in and not a folder
        return req, None
    adapter = adapters()[entry.family]
    req = req.merged(entry.defaults)
    try:
        check(adapter, _with_input(adapter, req, sample), inputs=inputs)
    except DiffCacheError as e:  # name the model defaults the problem involves: no flag gave them
        implied = [
            f"{adapter.field(k).flag} {v}"
            for k, v in entry.defaults.items()
            if values.get(k) is None and adapter.field(k) is not None and k in str(e)
        ]
        if not implied:
            raise
        raise DiffCacheError(
            f"{e} ({', '.join(implied)}: {model}'s default; pass the flag to change it)"
        ) from e
    return req, adapter


def _with_input(adapter: Any, req: Any, sample: str | None) -> Any:
    """``req`` with ``sample`` in the family's input field when that is required (a prompt):
    eval and profile fill it from their inputs, so it is not missing."""
    field = adapter.input_field
    if sample is None or field is None or not field.required:
        return req
    return req.replace(**{field.name: sample})


def _family(pipe: Any, req: Any, sample: str | None = None, inputs: str | None = None) -> Any:
    """The loaded pipeline's adapter, with the request checked against the loaded model
    (``sample`` and ``inputs`` as for ``_request``)."""
    from diffcache.generate import check
    from diffcache.registry import find_adapter

    adapter = find_adapter(pipe)
    check(adapter, _with_input(adapter, req, sample), pipe, inputs)
    return adapter


def _loras(args: argparse.Namespace, adapter: Any) -> list[Any]:
    """The ``--lora`` files, checked, and the model's family able to load them (a built-in
    model's, or the one a folder's files name), all before the model is built."""
    from diffcache.lora_files import check_model, parse_lora

    loras = [parse_lora(given) for given in args.lora or ()]
    if loras:
        check_model(args.model, adapter)
    return loras


def _with_loras(args: argparse.Namespace, loras: Sequence[Any], plans: Sequence[Any]) -> Any:
    """What turns the loaded model into the one the command runs: ``loras`` loaded, then each
    plan's ``valid_for.lora`` checked against them (the refusal names the profile command)."""
    from diffcache.adapter import Target
    from diffcache.lora import check_lora
    from diffcache.lora_files import FLAG, load_loras
    from diffcache.registry import find_adapter

    def prepare(pipe: Any) -> Any:
        if loras:
            load_loras(pipe, loras)
        experts = Target.resolve(find_adapter(pipe), pipe).experts
        for plan in plans:
            command = type(plan.config).profile_hint(args.model)
            command += "".join(f" {FLAG} {lora.given}" for lora in loras)
            check_lora(plan, experts, pipe, command)
        return pipe

    return prepare


def _out_dir(path: str, flag: str = "--out") -> Path:
    """A report folder that can be written (checked now, created when the report is)."""
    from diffcache.eval.runner import check_report_dir

    return check_report_dir(path, flag)


def read_prompts(path: str | Path) -> tuple[list[str], list[str] | None]:
    """A prompt file: one prompt per line, or ``prompt<TAB>answer`` on every line (answers are
    what text models' outputs are checked against). Blank lines are skipped. An empty file,
    a malformed line, or answers on only some lines is a DiffCacheError naming the line."""
    file = Path(path)
    if file.is_dir():
        raise DiffCacheError(
            f"--prompts {file}: is a folder; give a text file, one prompt per line"
        )
    if not file.exists():  # a pipe (``<(...)``) is read like a file
        raise DiffCacheError(f"--prompts {file}: no such file (one prompt per line)")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DiffCacheError(f"--prompts {file}: not UTF-8 text ({e.reason})") from e
    prompts, answers = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) > 2 or not parts[0].strip() or (len(parts) == 2 and not parts[1].strip()):
            raise DiffCacheError(
                f"--prompts {file}:{number}: expected 'prompt' or 'prompt<TAB>answer', got {line!r}"
            )
        prompts.append(parts[0].strip())
        answers.append(parts[1].strip() if len(parts) == 2 else None)
    if not prompts:
        raise DiffCacheError(f"--prompts {file}: the file has no prompts")
    given = sum(a is not None for a in answers)
    if 0 < given < len(answers):
        missing = next(i for i, a in enumerate(answers) if a is None)
        raise DiffCacheError(
            f"--prompts {file}: {given} of {len(answers)} prompts have an answer (the first "
            f"without one: {prompts[missing]!r}); give an answer for every prompt or for none"
        )
    return prompts, (answers if given else None)


def _read_prompts(path: str, media: str | None = None) -> list[str]:
    """The prompts of a prompt file; answers (``prompt<TAB>answer``) only for text models."""
    return _read_prompts_answers(path, media)[0]


def _read_prompts_answers(path: str, media: str | None) -> tuple[list[str], list[str] | None]:
    prompts, answers = read_prompts(path)
    if answers is not None and media not in (None, "text"):
        raise DiffCacheError(
            f"--prompts {path}: has answers, which only text models are checked against; this "
            f"model makes {media}s (drop the answers)"
        )
    return prompts, answers


def _check_seeds(args: argparse.Namespace) -> None:
    """--seeds in range, and the seeds it adds after --seed within the seeds a request takes."""
    from diffcache.generate import MAX_SEED

    n = args.seeds
    if not 1 <= n <= 10_000:
        raise DiffCacheError(f"--seeds must be in 1..10000, got {n}")
    if args.seed is not None and args.seed + n - 1 > MAX_SEED >= args.seed:
        raise DiffCacheError(
            f"--seed {args.seed} with --seeds {n}: the seeds run to {args.seed + n - 1}, past "
            "2**64-1; give a lower --seed"
        )


def _check_valid_for(plan: Any, req: Any, adapter: Any = None) -> None:
    """Refuse a request outside the plan's ``valid_for`` (the keys a request sets: steps and
    family keys such as ``gen_length``) before any model is built. A plan counts the steps a
    run denoises: with ``strength`` (img2img, video-to-video) those are fewer than ``--steps``,
    by the family's rule (``Adapter.steps_run``; without one the run checks them at its first
    model call)."""
    from diffcache.errors import outside_valid_for
    from diffcache.variants import steps_run

    run = steps_run(adapter, req.values)
    for key, want in plan.valid_for.items():
        given = req.get("steps" if key == "num_inference_steps" else key)
        if key == "num_inference_steps" and req.get("strength") is not None:
            if run is not None and run != want:
                raise DiffCacheError(
                    f"{plan.name}: the plan is valid for runs of {want} denoising steps "
                    f"(valid_for.num_inference_steps) but steps {given} at strength "
                    f"{req.get('strength'):g} run {run}; set --steps and --strength so that "
                    f"they run {want}, or profile at these"
                )
        elif given is not None and given != want:
            raise DiffCacheError(f"{plan.name}: {outside_valid_for(key, want, given)}")
    steps = req.get("steps")
    problem = plan.config.steps_problem(steps) if steps is not None else None
    if problem:  # a plan without valid_for.num_inference_steps (one with it was checked above)
        raise DiffCacheError(f"{plan.name} at {steps} steps: {problem}")


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--option KEY=VALUE`` flags as options (each value read as YAML)."""
    from diffcache.yamlio import loads_yaml

    options: dict[str, Any] = {}
    for item in args.option or ():
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise DiffCacheError(f"--option {item}: expected KEY=VALUE (e.g. warmup_steps=4)")
        options[key.strip()] = loads_yaml(text, f"--option {item}")
    return options


# ---------------------------------------------------------------------------- commands
def _generate(args: argparse.Namespace) -> int:
    import diffcache
    from diffcache.generate import check_writable, generate, save_output
    from diffcache.plan import Plan

    if args.stats_json and not args.plan:
        raise DiffCacheError("--stats-json needs --plan (stats describe an accelerated run)")
    if args.trace and not args.plan:
        raise DiffCacheError(f"--trace {args.trace} needs --plan (a trace is a plan's decisions)")
    plan = Plan.load(args.plan) if args.plan else None  # bad plans fail before the model loads
    req, adapter = _request(args, args.model)
    loras = _loras(args, adapter)
    if plan is not None and adapter is not None:
        plan.check_family(adapter.family, args.model)
        plan.config.check_needs(adapter, f"--plan {args.plan}")
    if plan is not None:
        _check_valid_for(plan, req, adapter)
    for flag, path in (("--stats-json", args.stats_json), ("--trace", args.trace)):
        if path:
            check_writable(Path(path), flag)
    out = None
    if adapter is not None:
        out = _generate_out(args, adapter, req)
    pipe = _with_loras(args, loras, [plan] if plan else [])(diffcache.load_model(args.model))
    adapter = _family(pipe, req)
    out = out or _generate_out(args, adapter, req)
    if plan is not None:
        diffcache.accelerate(pipe, plan, trace=bool(args.trace))
    output = generate(pipe, req, progress=sys.stderr.isatty())
    if str(out) != "-":
        out.parent.mkdir(parents=True, exist_ok=True)
    save_output(output, out)
    if str(out) != "-":
        print(f"wrote {out}")
    if plan is not None:
        s = diffcache.stats(pipe).as_dict()
        stream = sys.stderr if str(out) == "-" else sys.stdout  # stdout carries the text
        print(
            f"{s['method']}: computed {s['computed']:g} of {s['computed'] + s['skipped']:g} "
            f"{s['kind']} units (compute_fraction {s['compute_fraction']:.3f}), "
            f"{s['wall_s']:.2f} s",
            file=stream,
        )
        if s["compute_fraction"] > 1:
            from diffcache.eval.timing import costlier

            print(costlier(s["compute_fraction"]), file=stream)
        trace = s.pop("trace", None)
        if args.stats_json:
            Path(args.stats_json).write_text(json.dumps(s, indent=2))
        if args.trace:
            Path(args.trace).write_text(json.dumps(trace, indent=1) + "\n")
            print(f"wrote {args.trace}: {len(trace)} trace events", file=stream)
    return 0


def _generate_out(args: argparse.Namespace, adapter: Any, req: Any) -> Path:
    """The output file, checked; by default ``out/<model>-seed<N>.<ext>`` (the ``out`` folder is
    created only when the sample is saved)."""
    from diffcache.generate import SUFFIXES, check_output_path, check_writable

    if args.out is not None:
        if Path(args.out).is_dir() or args.out.endswith(("/", os.sep)):
            raise DiffCacheError(f"--out {args.out}: is a folder; give a file name")
        return check_output_path(args.out, adapter.media)
    if adapter.media == "text":
        return Path("-")
    name = Path("out") / f"{Path(args.model).name}-seed{req.seed}{SUFFIXES[adapter.media][0]}"
    if not name.parent.exists():
        check_writable(name.parent, "--out")  # the folder can be made in the current one
        return name
    return check_output_path(name, adapter.media)


def _profile(args: argparse.Namespace) -> int:
    import diffcache
    from diffcache import distributed
    from diffcache.display import format_options
    from diffcache.eval.report import speedup_text
    from diffcache.eval.timing import costlier, measurement_threads
    from diffcache.generate import check_writable
    from diffcache.models import builtin_models
    from diffcache.profile import (
        CALIBRATION_INPUT,
        CLI,
        check_steps_run,
        check_targets,
        resolve_start,
        with_kv_target,
    )

    _check_seeds(args)
    _check_timing(args)
    out = Path(args.out)
    if out.suffix.lower() not in (".yaml", ".yml"):
        raise DiffCacheError(f"--out {out}: a plan is written as .yaml")
    check_writable(out, "--out")
    check_targets(args.target_compute, args.target_speedup, CLI, args.target_kv)
    if args.prompts:
        prompts = _read_prompts(args.prompts)
    else:
        prompts = None
        if args.num_prompts is None:
            args.num_prompts = DEFAULT_CALIBRATION
        if not 1 <= args.num_prompts <= 10_000:
            raise DiffCacheError(f"--num-prompts must be in 1..10000, got {args.num_prompts}")
    sample = prompts[0] if prompts else "x"
    entry, options, given_steps = builtin_models().get(args.model), _options(args), args.steps

    def start_for(family: str | None) -> Any:  # where profiling starts (one rule: profile.py)
        return resolve_start(
            args.method,
            family=family,
            model=args.model if entry is not None else None,
            start=args.start,
            options=options,
            steps=given_steps,
            default_steps=entry.defaults.get("steps") if entry is not None else None,
            what=args.model,
            names=CLI,
        )

    start = start_for(entry.plan_family if entry is not None else None)  # before loading anything
    if args.target_kv is not None:
        with_kv_target(start.config, args.target_kv, CLI)
    args.steps = start.request_steps
    req, adapter = _request(args, args.model, sample, CALIBRATION_INPUT)
    loras = _loras(args, adapter)
    if adapter is not None:  # a built-in model: its inputs are known before it is built
        given = f"--method {args.method}" if args.method else f"--from {args.start}"
        start.config.check_needs(adapter, given)
        check_steps_run(start.config, adapter, req)
        prompts = _profile_inputs(args, adapter, prompts)
    pipe = _with_loras(args, loras, [])(diffcache.load_model(args.model))
    adapter = _family(pipe, req, sample, CALIBRATION_INPUT)
    if entry is None:  # a checkpoint folder: its family's published settings are known now
        start = start_for(adapter.family)
        if start.request_steps != args.steps:
            args.steps = start.request_steps
            req, _ = _request(args, args.model, sample, CALIBRATION_INPUT)
            adapter = _family(pipe, req, sample, CALIBRATION_INPUT)
        if start.published and distributed.is_main():
            print(
                f"starting from {start.plan.name}, the published {start.config.name} settings "
                f"for {adapter.name} ({format_options(start.plan.options)}; "
                f"{req.get('steps') or 'default'} steps); --from or --option to change",
                file=sys.stderr,
            )
    prompts = _profile_inputs(args, adapter, prompts, pipe)
    with measurement_threads(args.threads):
        plan = diffcache.profile(
            pipe,
            start.config,
            prompts,
            seeds=args.seeds,
            out=out,
            target_compute=args.target_compute,
            target_speedup=args.target_speedup,
            target_kv=args.target_kv,
            request=req,
            progress=sys.stderr.isatty(),
            repeats=args.repeats,
        )
    if not distributed.is_main():  # under accelerate launch the main process writes and reports
        return 0
    measured = plan.provenance.get("measured", {})
    opts = format_options(plan.options)
    cf = measured.get("compute_fraction")
    print(
        f"wrote {out}: {plan.method} ({opts}); compute_fraction {cf} on {len(prompts)} prompt(s) "
        f"x {args.seeds} seed(s)"
    )
    if cf is not None and cf > 1:
        print(costlier(cf))
    kv = measured.get("kv_history_fraction")
    if kv is not None:
        print(f"history KV before the last scale: {kv:.4f} of the plain model's (measured)")
    measured = plan.provenance.get("speedup_measured")
    if measured is not None:
        least = plan.provenance.get("least_compute")
        why = (
            f"its options allow no less compute than {least:.3f}"
            if least is not None
            else "the ideal for that compute is not reached here"
        )
        short = f" (short of the target: {why})" if measured < args.target_speedup else ""
        run = {"speedup": measured, "speedup_spread": plan.provenance.get("speedup_spread")}
        print(
            f"measured speedup {speedup_text({**run, 'compute_fraction': cf})} on the "
            f"calibration inputs ({args.repeats} rounds, {plan.provenance.get('threads')} "
            f"thread(s)) for the target {args.target_speedup:g}x{short}"
        )
    return 0


def _profile_inputs(
    args: argparse.Namespace, adapter: Any, prompts: list[str] | None, pipe: Any = None
) -> list[str]:
    """The calibration inputs for the model's family: ``--prompts``, else bundled (checked
    against ``pipe`` once it is loaded)."""
    if args.prompts:
        return prompts
    return _bundled_prompts(args.model, adapter, args.num_prompts, pipe)


def _bundled_prompts(model: str, adapter: Any, n: int, pipe: Any = None) -> list[str]:
    """N calibration inputs: a built-in model's own (models.yaml ``calibration``), else the
    bundled generic prompts, or class ids 0..N-1 for class-conditional models, going round its
    classes again (with new seeds: ``generate.expand``) when N is more than it has, once it is
    loaded."""
    from diffcache.models import builtin_models
    from diffcache.profiles import calibration_prompts

    entry = builtin_models().get(model)
    own = entry.calibration_prompts() if entry is not None else None
    if own is not None:
        prompts, which = list(own), f"{model} has {len(own)} calibration prompts"
    elif adapter.input_field is not None and adapter.input_field.type is not str:
        field = adapter.input_field  # class ids
        classes = field.limit(pipe) + 1 if field.limit is not None and pipe is not None else n
        return [str(i % classes) for i in range(n)]
    else:
        prompts = calibration_prompts()
        which = f"{len(prompts)} calibration prompts are bundled"
    if n > len(prompts):
        raise DiffCacheError(f"--num-prompts {n}: {which}; pass --prompts FILE")
    return prompts[:n]


def _eval(args: argparse.Namespace) -> int:
    from diffcache.eval.baselines import comparison
    from diffcache.eval.runner import EVAL_INPUT, evaluate

    # plans and diffusers specs are checked before any model is built
    comparisons = [comparison(spec) for spec in args.plan]
    _check_seeds(args)
    _check_timing(args)
    req, adapter = _request(args, args.model, "x", EVAL_INPUT)
    loras = _loras(args, adapter)
    prompts, answers = (
        _read_prompts_answers(args.prompts, adapter.media if adapter else None)
        if args.prompts
        else (None, None)
    )
    for c in comparisons:
        if adapter is not None:
            c.check_family(adapter, args.model)
        if c.plan is not None:
            _check_valid_for(c.plan, req, adapter)
    out = _out_dir(args.out)
    report = evaluate(
        args.model,
        comparisons,
        out,
        prompts=prompts,
        seeds=args.seeds,
        request=req,
        progress=sys.stderr.isatty(),
        answers=answers,
        macs=args.macs,
        repeats=args.repeats,
        threads=args.threads,
        trace=args.trace,
        prepare=_with_loras(args, loras, [c.plan for c in comparisons if c.plan is not None]),
    )
    if report is not None:  # the main process (others return None under accelerate launch)
        _print_report(report, out)
    return 0


def _print_report(report: dict, out: Path) -> None:
    from diffcache.eval.paired import describe, flips
    from diffcache.eval.plots import task_metric
    from diffcache.eval.report import speedup_text
    from diffcache.eval.timing import costlier

    def num(value: Any, fmt: str, unit: str = "") -> str:
        return "n/a" if value is None else format(value, fmt) + unit

    paired = flips(report, task_metric(report["runs"]))

    def scored(r: dict, key: str, name: str) -> str:
        """``, task score 0.812 (lost 1 / won 0, p 1)`` or ''."""
        if r.get(key) is None:
            return ""
        shown = f" ({describe(*paired[r['plan']])})" if r["plan"] in paired else ""
        return f", {name} {r[key]:.3f}{shown}"

    base = report["baseline"]
    task = base.get("task_score")
    acc = base.get("accuracy")
    print(
        f"baseline: {base['latency_s']:.3f} s per sample on {report['device']}"
        + (f", task score {task:.3f}" if task is not None else "")
        + (f", accuracy {acc:.3f}" if acc is not None else "")
    )
    for r in report["runs"]:
        line = (
            f"{r['plan']}: speedup {speedup_text(r)}, compute_fraction "
            f"{num(r['compute_fraction'], '.3f')}, MACs {num(r['macs_fraction'], '.3f')}, "
        )
        if "tokens_per_s" in r:  # text
            line += (
                f"{num(r['tokens_per_s'], '.1f')} tokens/s, "
                f"agreement {num(r['agreement'], '.3f')}"
                + (scored(r, "accuracy", "accuracy") or ", accuracy n/a")
            )
        else:
            line += f"PSNR {num(r['psnr'], '.2f', ' dB')}, SSIM {num(r['ssim'], '.4f')}" + scored(
                r, "task_score", "task score"
            )
        if "kv_cache_fraction" in r:  # next-scale KV methods: the papers' KV cache
            line += (
                f", KV cache {num(r['kv_cache_fraction'], '.1%')} of plain, attention MACs "
                f"{num(r.get('attn_macs_fraction'), '.3f')}"
            )
        print(line)
        cf = r["compute_fraction"]
        if cf is not None and cf > 1:
            print(f"  {r['plan']}: {costlier(cf)}")
        if r.get("trace"):
            print(f"  {r['plan']}: trace in {out / r['trace']}")
    print(f"wrote {out / 'report.json'}, report.md, report.html")


def _plans_list(args: argparse.Namespace) -> int:
    from diffcache.display import format_options
    from diffcache.plan import Plan
    from diffcache.profiles import bundled_plans

    rows = [("plan", "family", "method", "options (valid for)")]
    for name in bundled_plans():
        plan = Plan.load(name, template=True)
        valid = format_options(plan.valid_for) or "any"
        note = f"(valid for: {valid})"
        if plan.is_template:
            note = f"(template for {valid}: diffcache profile --model MODEL --from {name} ...)"
        rows.append((name, plan.model, plan.method, f"{format_options(plan.options)}  {note}"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row[:3], widths, strict=True)) + "  " + row[3])
    return 0


def _plans_show(args: argparse.Namespace) -> int:
    from diffcache.plan import Plan

    print(Plan.load(args.name, template=True).dumps(), end="")
    return 0


def _plans_check(args: argparse.Namespace) -> int:
    import diffcache
    from diffcache.models import builtin_models
    from diffcache.plan import Plan
    from diffcache.registry import adapters

    plan = Plan.load(args.file)
    if args.model:
        entry = builtin_models().get(args.model)
        if entry is not None:  # a built-in model: the family is checked before it is built
            plan.check_family(entry.plan_family, args.model)
            plan.config.check_needs(adapters()[entry.family], args.file)
        pipe = diffcache.load_model(args.model)
        diffcache.remove(diffcache.accelerate(pipe, plan))
    print(
        f"ok: {plan.source}: {plan.method} for {plan.model}"
        + (f", attaches to {args.model}" if args.model else "")
    )
    return 0


def _plans_import(args: argparse.Namespace) -> int:
    import diffcache
    from diffcache.generate import check_writable
    from diffcache.methods.invardiff_calibrate import (
        import_reference_books,
        read_reference_books,
        reference_keys,
    )
    from diffcache.models import builtin_models

    out = Path(args.out)
    if out.suffix.lower() not in (".yaml", ".yml"):
        raise DiffCacheError(f"--out {out}: a plan is written as .yaml")
    check_writable(out, "--out")
    if not Path(args.file).is_file():
        raise DiffCacheError(f"{args.file}: no such file")
    if args.method == "scalekv":
        return _import_scalekv(args, out)
    if args.model is None:
        raise DiffCacheError("plans import --method invardiff needs --model")
    entry = builtin_models().get(args.model)  # a built-in model's family is known now
    if entry is not None:
        reference_keys(entry.plan_family, f"--model {args.model}")
    # a malformed book file fails before the model is built
    read_reference_books(args.file, entry.plan_family if entry is not None else None)
    plan = import_reference_books(args.file, diffcache.load_model(args.model), out)
    reused = int(plan.calibration_data.step_book.sum())
    print(f"wrote {out}: invardiff books for {args.model} ({reused} reused steps)")
    return 0


def _import_scalekv(args: argparse.Namespace, out: Path) -> int:
    from diffcache.kv.scalekv_budgets import RELEASED_AVERAGE
    from diffcache.methods.scalekv import import_budgets
    from diffcache.registry import adapters

    if args.depth is None or args.depth < 1:
        raise DiffCacheError(
            f"plans import --method scalekv needs --depth N >= 1, got {args.depth}"
        )
    if args.family not in adapters():
        raise DiffCacheError(f"--family {args.family}: known families: {', '.join(adapters())}")
    average = RELEASED_AVERAGE if args.average is None else args.average
    plan = import_budgets(args.file, args.depth, args.family, average).save(out)
    print(f"wrote {plan}: scalekv budgets for a {args.depth}-layer {args.family} model")
    return 0


def _kv(args: argparse.Namespace) -> int:
    from diffcache.kv.memory import MIB, plan_memory
    from diffcache.models import builtin_models
    from diffcache.pipelines.kv_configs import kv_config
    from diffcache.plan import Plan

    if args.batch < 1:
        raise DiffCacheError(f"--batch {args.batch}: must be >= 1")
    if args.guidance is not None and not 0 <= args.guidance < float("inf"):
        raise DiffCacheError(f"--guidance {args.guidance}: must be a finite number >= 0")
    config = kv_config(args.model)
    plan = Plan.load(args.plan, template=True)
    plan.check_family(config.family, args.model)
    if plan.is_template:
        raise DiffCacheError(
            f"{plan.source}: method {plan.method} sets its KV rows from the head classes "
            f"measured on the model (calibration), and this template has none; measure them "
            f"with `diffcache profile --model MODEL --method {plan.method} --out plan.yaml` "
            "and pass that plan"
        )
    entry = builtin_models().get(args.model)
    guidance = args.guidance
    if guidance is None and entry is not None:
        guidance = entry.defaults.get("guidance")
    geo = config.geometry(args.batch, args.dtype, args.height, args.width, guidance)
    memory = plan_memory(plan, geo)

    def mib(n: int) -> str:
        """Whole MiB with thousands separators, one decimal below 1,000 MiB, bytes below 1 MiB
        (the tiny models' caches, exactly)."""
        if n < MIB:
            return f"{n:,} B"
        return f"{n / MIB:,.0f} MiB" if n >= 1000 * MIB else f"{n / MIB:.1f} MiB"

    side = geo.schedule.sizes[-1]
    rows = f"{geo.rows} row{'s' if geo.rows > 1 else ''}"
    print(
        f"{args.model}: {geo.layers} layers x {geo.heads} heads x {geo.head_dim}, "
        f"{len(geo.schedule)} scales ({side[0]}x{side[1]} tokens), batch {args.batch} = "
        f"{rows} {'with' if geo.rows > args.batch else 'without'} CFG; "
        f"K {8 * geo.k_bytes}-bit, V {8 * geo.v_bytes}-bit "
        f"(--dtype {args.dtype})"
    )
    print(f"plan {plan.name} ({plan.method})")
    print(f"{'':13} {'history before the scale':>29} {'layer-sweep peak':>29}")
    print(f"{'scale':>5} {'tokens':>7}" + f" {'full':>14} {'plan':>14}" * 2)
    for si in range(len(geo.schedule)):
        cells = (memory.full[si], memory.kept[si], memory.full_peaks[si], memory.kept_peaks[si])
        print(f"{si:>5} {geo.schedule.tokens(si):>7}" + "".join(f" {mib(n):>14}" for n in cells))
    print(
        f"KV cache before the last scale (the papers' metric): {mib(memory.full[-1])} -> "
        f"{mib(memory.kept[-1])} ({memory.kept[-1] / memory.full[-1]:.1%})"
    )
    print(
        f"layer-sweep peak: {mib(max(memory.full_peaks))} -> {mib(max(memory.kept_peaks))} "
        f"({max(memory.kept_peaks) / max(memory.full_peaks):.1%})"
    )
    return 0


def _models(args: argparse.Namespace) -> int:
    from diffcache.models import builtin_models
    from diffcache.registry import adapters

    models, families = builtin_models(), adapters()
    wide, fam = max(map(len, models)), max(map(len, families))
    print("built-in models:")
    for name, e in models.items():
        print(f"  {name:{wide}s} {e.family:{fam}s} {e.description}")
    print("families (local checkpoints load by folder path):")
    for name, a in families.items():
        print(f"  {name:{fam}s} {', '.join(a.pipelines)}  [cfg: {a.cfg}, {a.media}]")
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
            f"  {op['name']:18s} on CUDA tensors: {op['auto_on_cuda']}{why}; on CPU: "
            f"{op['cpu']}{interp} - {op['description']}"
        )
    print("methods:")
    for name, cls in methods().items():
        calib = ", calibrated (diffcache profile)" if cls.calibration else ""
        print(
            f"  {name:14s} granularity={cls.granularity}, kernels={', '.join(cls.kernels)}{calib}"
        )
    return 0


#: the reference models the demo runs; one without a bundled default plan yet (var-digits: its
#: KV methods come later) shows the plain model's generation and task score alone
DEMO_MODELS = ("dit-digits", "wan-shapes", "var-digits")


def _demo(args: argparse.Namespace) -> int:
    """Baseline vs each model's default plan on its own evaluation inputs, one report per model
    in ``--out/<model>/`` and one page for all of them in ``--out/report.html``."""
    from diffcache.eval.report import render_index
    from diffcache.eval.runner import evaluate
    from diffcache.generate import Request
    from diffcache.models import builtin_models, model_entry
    from diffcache.profiles import bundled_plans

    _check_timing(args)
    models = args.model or [m for m in DEMO_MODELS if m in builtin_models()]
    for model in models:
        model_entry(model)  # a built-in model
        if f"{model}.yaml" not in bundled_plans() and model not in DEMO_MODELS:
            demo = [m for m in builtin_models() if f"{m}.yaml" in bundled_plans()]
            raise DiffCacheError(
                f"--model {model}: no default plan ({model}.yaml) is bundled for it, so there is "
                f"no demo for it; demo models: {', '.join(demo)}"
            )
    out = _out_dir(args.out)
    sections = []
    for model in models:
        entry = builtin_models()[model]
        seeds = 1 if entry.default_prompts() else 2
        plans = [f"{model}.yaml"] if f"{model}.yaml" in bundled_plans() else []
        versus = f"vs {plans[0]}" if plans else "only (no default plan yet)"
        print(f"demo: {model}, baseline {versus}", flush=True)
        report = evaluate(
            model, plans, out / model, seeds=seeds, request=Request(),
            progress=sys.stderr.isatty(), repeats=args.repeats, threads=args.threads,
        )  # fmt: skip
        if report is None:  # not the main process
            return 0
        _print_report(report, out / model)
        sections.append((model, report, out / model))
    (out / "report.html").write_text(render_index(sections), encoding="utf-8")
    print(f"open {out / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
