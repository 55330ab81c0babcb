"""Built-in models (index in ``diffcache.profiles/models.yaml``) and ``load_model``."""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from diffcache.errors import UnsupportedModelError
from diffcache.registry import did_you_mean


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """One built-in model: its family (adapter name), builder and default request fields."""

    name: str
    family: str
    builder: str  # "module:function"
    description: str
    defaults: Mapping[str, Any]


@functools.cache
def builtin_models() -> dict[str, ModelEntry]:
    text = resources.files("diffcache.profiles").joinpath("models.yaml").read_text()
    return {
        name: ModelEntry(
            name=name,
            family=e["family"],
            builder=e["builder"],
            description=e.get("description", ""),
            defaults=dict(e.get("defaults", {})),
        )
        for name, e in yaml.safe_load(text).items()
    }


def model_entry(name: str) -> ModelEntry:
    models = builtin_models()
    if name not in models:
        raise UnsupportedModelError(
            f"{name}: not a built-in model{did_you_mean(name, models)} and not a local diffusers "
            f"folder; built-in: {', '.join(models)} (see `diffcache models`)."
        )
    return models[name]


def load_model(name_or_path: str | Path) -> Any:
    """A built-in model by name (built offline) or a local diffusers checkpoint folder."""
    path = Path(name_or_path)
    if path.is_dir():
        from diffusers import DiffusionPipeline

        try:
            return DiffusionPipeline.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise UnsupportedModelError(
                f"{path}: cannot load a diffusers pipeline from this folder ({e}); point at the "
                "folder holding model_index.json."
            ) from e
    entry = model_entry(str(name_or_path))
    module, func = entry.builder.split(":")
    return getattr(importlib.import_module(module), func)()
