"""KV stores and their policies: the store protocol every world shares and the text LMs'
position-indexed store; the text LMs' per-step plan and policy interface, and the forward pass
over planned rows (research/dlm.md §6)."""

from diffcache.kv.engine import forward_rows
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
    "forward_rows",
    "pad_rows",
    "row_sets",
    "union_rows",
]
