"""Caching methods, one file each; importing this package registers them all."""

from diffcache.methods import easycache
from diffcache.methods.base import MethodConfig, option
from diffcache.methods.easycache import EasyCacheConfig

__all__ = ["MethodConfig", "option", "EasyCacheConfig", "easycache"]
