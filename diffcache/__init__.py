"""diffcache: training-free caching for diffusion models, driven by plan files.

pipe = diffcache.accelerate(pipe, plan="wan21.yaml")
diffcache.stats(pipe); diffcache.remove(pipe)
"""

from __future__ import annotations

from importlib import metadata as _metadata

from diffcache import methods, pipelines  # noqa: F401  (fill the registries)
from diffcache import quiet as _quiet
from diffcache.adapter import Adapter, Target
from diffcache.api import accelerate, is_accelerated, remove, stats
from diffcache.errors import (
    AlreadyAcceleratedError,
    DiffCacheError,
    KernelUnavailableError,
    PlanError,
    RunError,
    UnsupportedModelError,
)
from diffcache.generate import Request
from diffcache.methods.base import MethodConfig
from diffcache.models import load_model
from diffcache.plan import Plan
from diffcache.profile import profile
from diffcache.registry import register_adapter, register_method
from diffcache.request import Field
from diffcache.runstate import RunState, Stats
from diffcache.session import Call, Session
from diffcache.sites import ModuleSite, Stack

_quiet.install()  # import diffcache stays light: no library it quiets is imported yet
__version__ = _metadata.version("diffcache")  # pyproject.toml's
__all__ = [
    "accelerate",
    "remove",
    "stats",
    "is_accelerated",
    "load_model",
    "profile",
    "Plan",
    "Stats",
    "RunState",
    "MethodConfig",
    "register_method",
    "Adapter",
    "Stack",
    "ModuleSite",
    "Target",
    "Field",
    "Request",
    "Session",
    "Call",
    "register_adapter",
    "DiffCacheError",
    "PlanError",
    "UnsupportedModelError",
    "KernelUnavailableError",
    "AlreadyAcceleratedError",
    "RunError",
]
