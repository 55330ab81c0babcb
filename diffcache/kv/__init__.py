"""KV stores and their policies: the store protocol every world shares, the text LMs'
position-indexed store with their per-step plan and policy interface (research/dlm.md §6), and
the history store of next-scale models (research/var.md §4). The forward passes are the
pipelines'."""

from diffcache.kv.history import FullHistory, History, ScaleCall, Schedule, Selection
from diffcache.kv.policy import (
    DecodeState,
    LayerView,
    Policy,
    StepPlan,
    pad_rows,
    row_sets,
    union_rows,
)
from diffcache.kv.store import KVStore, Store

__all__ = [
    "DecodeState",
    "FullHistory",
    "History",
    "KVStore",
    "LayerView",
    "Policy",
    "ScaleCall",
    "Schedule",
    "Selection",
    "StepPlan",
    "Store",
    "pad_rows",
    "row_sets",
    "union_rows",
]
