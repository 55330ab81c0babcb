"""KV machinery of the text diffusion LMs: the position-indexed store, the per-step plan and
policy interface (research/dlm.md §6). The forward pass over planned rows is the pipelines'
(``diffcache.pipelines.dlm_engine``)."""

from diffcache.kv.policy import (
    DecodeState,
    LayerView,
    Policy,
    StepPlan,
    pad_rows,
    row_sets,
    union_rows,
)
from diffcache.kv.store import KVStore

__all__ = [
    "DecodeState",
    "KVStore",
    "LayerView",
    "Policy",
    "StepPlan",
    "pad_rows",
    "row_sets",
    "union_rows",
]
