"""Built-in models (index in ``profiles/src/models.yaml``), folder loaders, ``load_model``.

``load_model`` takes a built-in name or a local folder. Folders are read by registered loaders,
one per format (diffusers pipelines now; our own formats register theirs next to their code).

A built-in model carries its default request (models.yaml ``defaults``) to every front end: the
CLI merges it into its requests, ``diffcache.profile`` into its request, and the pipeline that
``load_model`` returns fills it into each call for the arguments the caller leaves out (a plain
``pipe(prompt=...)`` on ``wan2.1-tiny`` makes 64x64x9 in 20 steps, not diffusers' 480x832x81 in
50). ``builtin_of(pipe)`` says which built-in model a pipeline was loaded as.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import inspect
import json
import sys
from collections.abc import Callable, Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from diffcache.errors import UnsupportedModelError, did_you_mean
from diffcache.generate import Request, call_kwargs
from diffcache.registry import adapters, find_adapter

#: where ``load_model`` records a built-in model's name on the pipeline it returns
MODEL_ATTR = "_diffcache_model"


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """One built-in model: its family (adapter name), builder, default request fields and, for
    models that have them, default evaluation inputs, calibration inputs and a task scorer.

    ``scorer`` (``"module:function"``) is ``score(input, output) -> bool``: whether one generated
    sample does what its input asked (the input is the prompt, or the class id for
    class-conditional families). ``prompts`` (evaluation) and ``calibration`` (what ``profile``
    tunes on: inputs of the model's training distribution, never its held-out evaluation set)
    are each a list or ``"module:ATTRIBUTE"``.
    """

    name: str
    family: str
    builder: str  # "module:function"
    description: str
    defaults: Mapping[str, Any]
    scorer: str | None = None
    prompts: str | tuple[str, ...] | None = None
    calibration: str | tuple[str, ...] | None = None

    def build(self) -> Any:
        return _resolve(self.builder)()

    @property
    def plan_family(self) -> str:
        """The family its plans are for (``model:``): a pipeline variant's base family."""
        return adapters()[self.family].family

    def score_fn(self) -> Any:
        """The task scorer, or None when the model has none."""
        return _resolve(self.scorer) if self.scorer else None

    def default_prompts(self) -> tuple[str, ...] | None:
        """The default evaluation inputs, or None."""
        return _inputs(self.prompts)

    def calibration_prompts(self) -> tuple[str, ...] | None:
        """The model's own calibration inputs, or None (``profile`` then takes the bundled
        generic prompts, or class ids)."""
        return _inputs(self.calibration)


def _inputs(value: str | tuple[str, ...] | None) -> tuple[str, ...] | None:
    if value is None or isinstance(value, tuple):
        return value
    return tuple(_resolve(value))


def _listed(value: Any) -> Any:
    """A models.yaml list as a tuple; a ``"module:ATTRIBUTE"`` reference or None as it is."""
    return tuple(value) if isinstance(value, list) else value


def _resolve(ref: str) -> Any:
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


@dataclasses.dataclass(frozen=True)
class Loader:
    """Reads one folder format: ``detect(path)`` says whether a folder is in it; ``needs`` says
    what it looks for (for the error when no loader takes a folder)."""

    name: str
    detect: Callable[[Path], bool]
    load: Callable[[Path], Any]
    needs: str
    #: the class name of the pipeline ``load`` builds from a folder, read off its files without
    #: building it (None: the loader cannot say)
    pipeline: Callable[[Path], str | None] = lambda path: None


_EXTRA_MODELS: dict[str, ModelEntry] = {}
_LOADERS: list[Loader] = []


@functools.cache
def _bundled_models() -> dict[str, ModelEntry]:
    text = resources.files("diffcache.profiles").joinpath("models.yaml").read_text()
    return {
        name: ModelEntry(
            name=name,
            family=e["family"],
            builder=e["builder"],
            description=e.get("description", ""),
            defaults=dict(e.get("defaults", {})),
            scorer=e.get("scorer"),
            prompts=_listed(e.get("prompts")),
            calibration=_listed(e.get("calibration")),
        )
        for name, e in yaml.safe_load(text).items()
    }


def builtin_models() -> dict[str, ModelEntry]:
    return {**_bundled_models(), **_EXTRA_MODELS}


def register_model(entry: ModelEntry) -> ModelEntry:
    """Add a built-in model from code (tests, plugins)."""
    if entry.name in builtin_models():
        raise ValueError(f"model {entry.name!r} is registered twice")
    _EXTRA_MODELS[entry.name] = entry
    return entry


def register_loader(loader: Loader) -> Loader:
    """Add a folder format; the first loader whose ``detect`` accepts a folder reads it."""
    if any(x.name == loader.name for x in _LOADERS):
        raise ValueError(f"loader {loader.name!r} is registered twice")
    _LOADERS.append(loader)
    return loader


def model_entry(name: str) -> ModelEntry:
    models = builtin_models()
    if name not in models:
        raise UnsupportedModelError(
            f"{name}: not a built-in model{did_you_mean(name, models)} and not a local model "
            f"folder; built-in: {', '.join(models)} (see `diffcache models`)."
        )
    return models[name]


def load_model(name_or_path: str | Path) -> Any:
    """A built-in model by name (built offline) or a local model folder."""
    if not isinstance(name_or_path, (str, Path)) or not str(name_or_path).strip():
        raise UnsupportedModelError(
            f"load_model takes a built-in model name or a folder path, got {name_or_path!r} "
            "(see `diffcache models`)"
        )
    path = Path(name_or_path)
    if path.is_dir():
        loader = _loader_of(path)
        if loader is not None:
            return loader.load(path)
        formats = "; ".join(f"{x.name}: {x.needs}" for x in _LOADERS)
        raise UnsupportedModelError(
            f"{path}: no loader recognises this folder ({formats}); point at the folder "
            "holding the checkpoint's files."
        )
    entry = model_entry(str(name_or_path))
    return with_defaults(entry.build(), entry)


def _loader_of(folder: Path) -> Loader | None:
    """The first registered loader that reads ``folder``."""
    return next((x for x in _LOADERS if x.detect(folder)), None)


def folder_pipeline(folder: Path) -> str | None:
    """The class name of the pipeline :func:`load_model` builds from ``folder``, read off its
    files without building anything (None when no loader says)."""
    loader = _loader_of(folder)
    return loader.pipeline(folder) if loader is not None else None


def builtin_of(pipe: Any) -> ModelEntry | None:
    """The built-in model ``load_model`` returned ``pipe`` as, or None."""
    name = getattr(pipe, "__dict__", {}).get(MODEL_ATTR)
    return builtin_models().get(name) if isinstance(name, str) else None


def with_defaults(pipe: Any, entry: ModelEntry) -> Any:
    """``pipe`` (built as ``entry``) with the model's name recorded on it and its calls taking
    the model's default request for the arguments the caller leaves out.

    ``pipe(...)`` looks ``__call__`` up on the class, so no instance attribute can change it:
    ``pipe`` becomes an instance of a subclass of its class that keeps the class's name and
    fills the defaults of the instance's model (:func:`_with_defaults_class`). The class
    itself is untouched: other pipelines of it keep its own defaults.
    """
    pipe.__dict__[MODEL_ATTR] = entry.name
    pipe.__class__ = _with_defaults_class(type(pipe))
    return pipe


def call_defaults(pipe: Any) -> dict[str, Any]:
    """The pipeline keywords of the default request of ``pipe``'s built-in model (empty for
    other pipelines)."""
    entry = builtin_of(pipe)
    if entry is None:
        return {}
    return call_kwargs(find_adapter(pipe).fields, Request(**entry.defaults))


@functools.cache
def _with_defaults_class(cls: type) -> type:
    """The subclass of ``cls`` that :func:`with_defaults` gives a built-in pipeline: the same
    name, signature and docstring, its ``__call__`` filling :func:`call_defaults` for the
    arguments not given (by keyword or position). Copies and pickles keep it. The class is
    made once per ``cls``, so its ``__call__`` reads ``cls.__call__`` at each call (a later
    patch or hook on ``cls`` applies; one captured here would outlive it)."""

    @functools.wraps(cls.__call__)
    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        call = cls.__call__
        given = set(inspect.signature(call).bind_partial(self, *args).arguments) | set(kwargs)
        filled = {k: v for k, v in call_defaults(self).items() if k not in given}
        return call(self, *args, **filled, **kwargs)

    def __reduce_ex__(self: Any, protocol: Any) -> Any:
        # the class is found by name on unpickling, and its name is ``cls``'s: rebuild through
        # this module instead
        _, _, *rest = cls.__reduce_ex__(self, protocol)
        return (_new_with_defaults, (cls,), *rest)

    namespace = {"__call__": __call__, "__reduce_ex__": __reduce_ex__}
    namespace |= {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
    return type(cls.__name__, (cls,), namespace)


def _new_with_defaults(cls: type) -> Any:
    """An empty instance of ``cls``'s defaults-filling subclass (unpickling fills its state)."""
    sub = _with_defaults_class(cls)
    return sub.__new__(sub)


@contextlib.contextmanager
def loading_bar(show: bool) -> Iterator[None]:
    """The loading bars of a ``from_pretrained`` on or off: diffusers' "Loading pipeline
    components" and transformers' "Loading weights" (a text encoder)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = (diffusers_logging, transformers_logging)
    was = [lib.is_progress_bar_enabled() for lib in libraries]
    for lib in libraries:
        (lib.enable_progress_bar if show else lib.disable_progress_bar)()
    try:
        yield
    finally:
        for lib, on in zip(libraries, was, strict=True):
            (lib.enable_progress_bar if on else lib.disable_progress_bar)()


def cast(pipe: Any, dtype: Any) -> None:
    """``pipe`` in the torch dtype ``dtype`` as ``from_pretrained(torch_dtype=dtype)`` loads
    it: the modules a model lists in ``_keep_in_fp32_modules`` (Wan: rope, time embedder,
    norms) stay float32."""
    import torch

    for part in pipe.components.values():
        if isinstance(part, torch.nn.Module):
            keep = getattr(part, "_keep_in_fp32_modules", None) or []
            torch.nn.Module.to(part, dtype)  # diffusers' .to warns about the list kept below
            for name, module in part.named_modules():
                if any(k in name.split(".") for k in keep):
                    module.float()


def _load_diffusers(path: Path) -> Any:
    from diffusers import DiffusionPipeline

    from diffcache.quant import gguf_components

    try:
        with loading_bar(sys.stderr.isatty()):  # a log or a pipe gets no bar
            parts = gguf_components(path)  # a transformer given as a .gguf file
            return DiffusionPipeline.from_pretrained(str(path), local_files_only=True, **parts)
    except (OSError, ValueError) as e:
        raise UnsupportedModelError(
            f"{path}: cannot load a diffusers pipeline from this folder ({e})."
        ) from e


def _diffusers_pipeline(path: Path) -> str | None:
    """A diffusers folder's pipeline class: model_index.json's ``_class_name`` (None when the
    file cannot be read: loading the folder names that)."""
    try:
        name = json.loads((path / "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) else None


register_loader(
    Loader(
        "diffusers",
        lambda p: (p / "model_index.json").is_file(),
        _load_diffusers,
        "model_index.json",
        _diffusers_pipeline,
    )
)
