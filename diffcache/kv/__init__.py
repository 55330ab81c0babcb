"""KV stores and their policies: the store protocol every world shares, the text LMs'
position-indexed store, and their per-step plan and policy interface (research/dlm.md §6). The
forward pass over planned rows is the pipelines' (``diffcache.pipelines.dlm_engine``)."""

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
    "KVStore",
    "LayerView",
    "Policy",
    "StepPlan",
    "Store",
    "pad_rows",
    "row_sets",
    "union_rows",
]
