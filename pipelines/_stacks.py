"""Module sites shared by several families (each adapter lists its stacks with these)."""

from __future__ import annotations

from diffcache.adapter import ModuleSite

#: An MMDiT dual-stream block: joint attention over both streams, and one feed-forward each.
DUAL_STREAM = (
    ModuleSite("attn", "self_attn", returns=("hidden", "encoder")),
    ModuleSite("ff", "ff"),
    ModuleSite("ff_context", "context_ff"),
)
