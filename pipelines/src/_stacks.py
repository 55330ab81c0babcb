"""Module sites and capabilities shared by several families (each adapter lists its stacks and
what it provides with these)."""

from __future__ import annotations

from diffcache.adapter import Capabilities
from diffcache.gated import GatedBlock, GatedTerm, Modulation
from diffcache.sites import ModuleSite

#: What a diffusers latent DiT offers: its whole step, its blocks and the modules inside them.
LATENT_DIT = Capabilities(("step", "block", "module"), denoiser="latent")

#: An MMDiT dual-stream block: joint attention over both streams, and one feed-forward each.
DUAL_STREAM = (
    ModuleSite("attn", "self_attn", returns=("hidden", "encoder")),
    ModuleSite("ff", "ff"),
    ModuleSite("ff_context", "context_ff"),
)


def dual_stream_gates(block: str, clip_fp16: tuple[str, ...] = ()) -> GatedBlock:
    """An MMDiT dual-stream block with AdaLN-Zero ``norm1`` / ``norm1_context`` (``linear(silu(
    temb))`` in 6 chunks): each stream adds its joint-attention output times chunk 2 and its
    feed-forward output times chunk 5 of its own modulation (FLUX, HunyuanVideo)."""
    return GatedBlock(
        blocks=(block,),
        modulations=(Modulation("img", "norm1"), Modulation("txt", "norm1_context")),
        streams=(
            ("hidden", (GatedTerm("attn", 0, ("img", 2)), GatedTerm("ff", gate=("img", 5)))),
            (
                "encoder",
                (GatedTerm("attn", 1, ("txt", 2)), GatedTerm("ff_context", gate=("txt", 5))),
            ),
        ),
        clip_fp16=clip_fp16,
    )
