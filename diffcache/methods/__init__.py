"""Caching methods, one file each; importing this package registers them all."""

from diffcache.methods import easycache, ertacache, hyca, invardiff
from diffcache.methods.base import MethodConfig, option
from diffcache.methods.easycache import EasyCacheConfig
from diffcache.methods.ertacache import ERTACacheConfig
from diffcache.methods.hyca import HyCaConfig
from diffcache.methods.invardiff import InvarDiffConfig

__all__ = [
    "MethodConfig",
    "option",
    "EasyCacheConfig",
    "ERTACacheConfig",
    "HyCaConfig",
    "InvarDiffConfig",
    "easycache",
    "ertacache",
    "hyca",
    "invardiff",
]
