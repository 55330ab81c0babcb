"""Generation requests (:class:`Request`) checked against a family's fields and turned into
pipeline calls (one per input and seed), one generation of a supported pipeline, and saving what it
makes (media file or text).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from diffcache.errors import DiffCacheError, UnsupportedModelError
from diffcache.registry import adapters, find_adapter
from diffcache.request import Field

MAX_SEED = 2**64 - 1
SUFFIXES = {"video": (".mp4", ".gif"), "image": (".png",), "text": (".txt",)}

__all__ = ["Request", "generate", "pipeline_kwargs", "check_output_path", "save_output"]


class Request:
    """What to generate: field values (absent = the pipeline's default) and a seed."""

    def __init__(self, seed: int = 0, **values: Any) -> None:
        self.seed = seed
        self.values = MappingProxyType({k: v for k, v in values.items() if v is not None})

    def get(self, name: str) -> Any:
        return self.values.get(name)

    def replace(self, **changes: Any) -> Request:
        seed = changes.pop("seed", self.seed)
        return Request(seed, **{**self.values, **changes})

    def merged(self, defaults: Mapping[str, Any]) -> Request:
        """This request with ``defaults`` filling the fields it leaves out."""
        values = {k: v for k, v in defaults.items() if k != "seed"}
        return Request(self.seed, **{**values, **self.values})

    def as_dict(self) -> dict[str, Any]:
        return {**self.values, "seed": self.seed}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Request) and self.as_dict() == other.as_dict()

    def __repr__(self) -> str:
        return f"Request({', '.join(f'{k}={v!r}' for k, v in self.as_dict().items())})"


def request_fields() -> dict[str, Field]:
    """Every request field any family declares (name -> Field), for the CLI's flags (a name
    that two families declare means the same in both: ``register_adapter`` checks)."""
    out: dict[str, Field] = {}
    for adapter in adapters().values():
        for f in adapter.fields:
            out.setdefault(f.name, f)
    return out


def field_problems(
    field: Field, value: Any, pipe: Any = None, name: str | None = None
) -> list[str]:
    """Why ``value`` is not acceptable for ``field`` (empty if it is); each problem names the
    value by ``name`` (default: the field's flag)."""
    flag = name or field.flag
    if field.type is str:
        if not isinstance(value, str):
            return [f"{flag} must be text, got {value!r}"]
        problem = field.accepts(pipe, value) if field.accepts and pipe is not None else None
        if field.load is not None and not Path(value).is_file():
            problem = "no such file"
        shown = value if len(value) <= 40 else value[:37] + "..."
        return [f"{flag} {shown!r}: {problem}"] if problem else []
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return [f"{flag} must be a number, got {value!r}"]
    if field.type is int and not float(value).is_integer():
        return [f"{flag} must be a whole number, got {value!r}"]
    if not math.isfinite(value):
        return [f"{flag} must be a finite number, got {value!r}"]
    hi = field.max
    if field.limit is not None and pipe is not None:
        hi = field.limit(pipe) if hi is None else min(hi, field.limit(pipe))
    if field.min is not None and value < field.min:
        return [f"{flag} must be >= {field.min:g}, got {value:g}"]
    if hi is not None and value > hi:
        return [f"{flag} must be <= {hi:g} for this model, got {value:g}"]
    if field.multiple_of and (value - field.offset) % field.multiple_of:
        m, o = field.multiple_of, field.offset
        what = f"a multiple of {m}" + (f" plus {o} (e.g. {m + o}, {2 * m + o})" if o else "")
        return [f"{flag} must be {what} for this model, got {value:g}"]
    return []


def check(adapter: Any, request: Request, pipe: Any = None, inputs: str | None = None) -> None:
    """Refuse a request with unknown fields, missing required ones, bad values or values that
    break one of the family's ``rules`` across fields (all at once), for ``adapter``'s family.

    ``inputs`` names the family's input field (``Adapter.input_field``) in the errors, instead of
    its flag, where a command filled it from its inputs (a prompt file, bundled inputs): the
    user gave no ``--prompt`` or ``--class-label`` then."""
    family = adapter.name
    by_name = {f.name: f for f in adapter.fields}
    given = adapter.input_field
    names = {given.name: inputs} if inputs and given is not None else {}
    problems = []
    if not (isinstance(request.seed, int) and 0 <= request.seed <= MAX_SEED):
        problems.append(f"--seed must be a whole number in 0..2**64-1, got {request.seed!r}")
    for name, value in request.values.items():
        field = by_name.get(name)
        if field is None:
            flag = "--" + name.replace("_", "-")
            takes = ", ".join(f.flag for f in by_name.values()) or "nothing"
            problems.append(f"{family} models take no {flag}; they take: {takes}")
        else:
            problems += field_problems(field, value, pipe, names.get(name))
    problems += [
        f"{f.flag} is required for {family} models"
        for f in by_name.values()
        if f.required and f.name not in request.values
    ]
    if not problems:
        problems += [p for rule in adapter.rules if (p := rule(request.values))]
    if problems:
        raise DiffCacheError("; ".join(problems))


def call_kwargs(fields: Iterable[Field], request: Request) -> dict[str, Any]:
    """The pipeline keywords for ``request`` (checked with :func:`check` first)."""
    out: dict[str, Any] = {}
    for f in fields:
        if f.name in request.values:
            value = request.values[f.name]
            value = f.load(value) if f.load else f.type(value)
            out[f.call_arg] = [value] if f.as_list else value
    return out


def expand(
    adapter: Any, inputs: Sequence[str], seeds: int | Sequence[int], base: Request
) -> list[Request]:
    """One request per (input, seed): each input, as text, fills the family's input field
    (``Adapter.input_field``: a prompt, a class id); a family without one gets one request per
    seed. ``seeds`` counts from ``base.seed`` or lists the seeds. An input that came before
    runs with its seeds moved past those of its earlier copies, so that a repeated prompt (or
    class id, when more inputs than classes are asked for) makes new samples."""
    seed_list = list(range(base.seed, base.seed + seeds)) if isinstance(seeds, int) else seeds
    field = adapter.input_field
    if field is None:
        return [base.replace(seed=s) for s in seed_list]
    try:
        values = [field.type(p) for p in inputs]
    except ValueError as e:
        raise DiffCacheError(f"{adapter.name} models take {field.help} as inputs: {e}") from e
    span = max(seed_list) - min(seed_list) + 1
    copies: dict[Any, int] = {}
    out = []
    for v in values:
        k = copies[v] = copies.get(v, -1) + 1
        out += [base.replace(seed=s + k * span, **{field.name: v}) for s in seed_list]
    return out


def pipeline_kwargs(pipe: Any, request: Request) -> dict[str, Any]:
    """The keyword arguments of ``pipe(...)`` for ``request`` (checked against the family)."""
    adapter = find_adapter(pipe)
    check(adapter, request, pipe)
    kwargs = {**call_kwargs(adapter.fields, request), **adapter.call_args}
    kwargs[adapter.seed_arg] = torch.Generator("cpu").manual_seed(request.seed)
    return kwargs


def generate(pipe: Any, request: Request, progress: bool = False) -> np.ndarray | str:
    """Run ``pipe`` once. Media come back as float32 in [0, 1]: (F, H, W, C) video or (H, W, C)
    image; text models return the generated text."""
    adapter = find_adapter(pipe)
    if not adapter.output:
        raise UnsupportedModelError(
            f"{type(pipe).__name__}: its family's adapter ({adapter.name!r}) declares no output "
            "to read; generate() runs pipelines"
        )
    kwargs = pipeline_kwargs(pipe, request)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=not progress)
    with torch.inference_mode():
        out = pipe(**kwargs)
    sample = getattr(out, adapter.output)[0]  # the family's declared output
    return str(sample) if adapter.media == "text" else np.asarray(sample, dtype=np.float32)


def check_output_path(path: str | Path, media: str, flag: str = "--out") -> Path:
    """``path`` if a file of this media kind can be written there, else a DiffCacheError (before
    any work is done). ``-`` means standard output (text only)."""
    path = Path(path)
    allowed = SUFFIXES[media]
    if str(path) == "-" and media == "text":
        return path
    if path.is_dir():
        raise DiffCacheError(f"{flag} {path}: is a folder; give a file name")
    if path.suffix.lower() not in allowed:
        raise DiffCacheError(
            f"{flag} {path}: {media} output is written as {' or '.join(allowed)}; change the "
            "extension."
        )
    return check_writable(path, flag)


def write_problem(folder: Path) -> str | None:
    """Why no file can be created in the existing ``folder`` (None when one can): a file is
    created and removed there, since permission bits say nothing for root or for special file
    systems such as ``/proc``."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder):
            return None
    except OSError as e:
        return e.strerror or str(e)


def check_writable(path: Path, flag: str) -> Path:
    """Refuse a file path whose folder is missing, not a folder, or not writable; or that is a
    folder itself."""
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise DiffCacheError(f"{flag} {path}: is a folder; give a file name")
    if not folder.exists():
        raise DiffCacheError(f"{flag} {path}: folder {folder} does not exist; create it first")
    if not folder.is_dir():
        raise DiffCacheError(f"{flag} {path}: {folder} is a file, not a folder")
    problem = write_problem(folder)
    if problem:
        raise DiffCacheError(f"{flag} {path}: folder {folder} is not writable ({problem})")
    return path


def save_output(output: np.ndarray | str, path: str | Path, fps: int = 8) -> Path:
    """Write text (``.txt``, or stdout for ``-``), (F, H, W, C) video (.mp4/.gif) or (H, W, C)
    image (.png)."""
    path = Path(path)
    if isinstance(output, str):
        if str(path) == "-":
            sys.stdout.write(output + "\n")
        else:
            path.write_text(output + "\n")
        return path
    pixels = (np.clip(output, 0.0, 1.0) * 255).round().astype(np.uint8)
    if pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    import imageio.v3 as iio

    if path.suffix.lower() == ".gif":
        iio.imwrite(path, pixels, extension=".gif", duration=1000 / fps, loop=0)
    elif output.ndim == 4:
        iio.imwrite(path, pixels, extension=".mp4", fps=fps, codec="libx264", macro_block_size=1)
    else:
        iio.imwrite(path, pixels, extension=".png")
    return path
