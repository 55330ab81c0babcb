"""Caching methods, a runtime file each (and a ``<name>_calibrate`` file where a method
calibrates offline); importing this package registers them all."""

from diffcache.methods import (
    d2cache,
    dkv_cache,
    easycache,
    elastic_cache,
    ertacache,
    ertacache_calibrate,
    fast_dllm,
    hack,
    hack_calibrate,
    hyca,
    hyca_calibrate,
    invardiff,
    invardiff_calibrate,
    kv_baselines,
    scalekv,
    scalekv_calibrate,
)
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
    "d2cache",
    "dkv_cache",
    "easycache",
    "elastic_cache",
    "fast_dllm",
    "hack",
    "hack_calibrate",
    "ertacache",
    "ertacache_calibrate",
    "hyca",
    "hyca_calibrate",
    "invardiff",
    "invardiff_calibrate",
    "kv_baselines",
    "scalekv",
    "scalekv_calibrate",
]
