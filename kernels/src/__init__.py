"""Fused kernels with torch references and Triton implementations.

Each public op takes ``backend="auto" | "torch" | "triton"``. ``auto`` uses the Triton kernel on
supported CUDA tensors and the torch reference otherwise; ``triton`` raises
:class:`KernelUnavailableError` with every reason it cannot run. ``record`` (a mapping, optional)
gets ``record[op] = "torch" | "triton"``, the backend the call used; an accelerated model's calls
record into their run's ``Stats.kernels`` (``Session.kernel``). Importing this package works
without Triton installed.
"""

from __future__ import annotations

from diffcache.errors import KernelUnavailableError

from ._dispatch import Backend, describe, ops, pick, plan_backend, resolve_backend
from .add_residual import add_residual, add_residual_ref
from .forecast import forecast, forecast_ref
from .gated_apply import gated_apply, gated_apply_ref
from .kv_compact import kv_compact, kv_compact_ref, take_rows
from .kv_rows import kv_gather, kv_gather_ref, kv_scatter, kv_scatter_ref
from .l1_change import l1_change, l1_change_ref
from .rectified_residual import rectified_residual, rectified_residual_ref
from .token_confidence import token_confidence, token_confidence_ref
from .window_scores import window_scores, window_scores_ref

__all__ = [
    "Backend",
    "KernelUnavailableError",
    "add_residual",
    "add_residual_ref",
    "describe",
    "forecast",
    "forecast_ref",
    "gated_apply",
    "gated_apply_ref",
    "kv_compact",
    "kv_compact_ref",
    "kv_gather",
    "kv_gather_ref",
    "kv_scatter",
    "kv_scatter_ref",
    "l1_change",
    "l1_change_ref",
    "ops",
    "pick",
    "plan_backend",
    "rectified_residual",
    "rectified_residual_ref",
    "resolve_backend",
    "take_rows",
    "token_confidence",
    "token_confidence_ref",
    "window_scores",
    "window_scores_ref",
]
