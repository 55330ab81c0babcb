"""Built-in models (index in ``diffcache.profiles/models.yaml``), folder loaders, ``load_model``.

``load_model`` takes a built-in name or a local folder. Folders are read by registered loaders,
one per format (diffusers pipelines now; our own formats register theirs next to their code).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import sys
from collections.abc import Callable, Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from diffcache.errors import UnsupportedModelError
from diffcache.registry import did_you_mean


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
        for loader in _LOADERS:
            if loader.detect(path):
                return loader.load(path)
        formats = "; ".join(f"{x.name}: {x.needs}" for x in _LOADERS)
        raise UnsupportedModelError(
            f"{path}: no loader recognises this folder ({formats}); point at the folder "
            "holding the checkpoint's files."
        )
    return model_entry(str(name_or_path)).build()


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


def _load_diffusers(path: Path) -> Any:
    from diffusers import DiffusionPipeline

    try:
        with loading_bar(sys.stderr.isatty()):  # a log or a pipe gets no bar
            return DiffusionPipeline.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise UnsupportedModelError(
            f"{path}: cannot load a diffusers pipeline from this folder ({e})."
        ) from e


register_loader(
    Loader(
        "diffusers",
        lambda p: (p / "model_index.json").is_file(),
        _load_diffusers,
        "model_index.json",
    )
)
