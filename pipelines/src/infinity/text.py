"""Text conditioning: T5 features of the valid tokens, padded to the longest prompt
(research/var.md §1.2.3 item 1; upstream packs them for flash-attn's varlen kernel instead)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F


def encode(
    tokenizer: Any, encoder: Any, prompts: Sequence[str], max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 ``last_hidden_state`` (float32) of ``prompts`` padded to ``max_length`` tokens as
    upstream, cut to the longest prompt: features ``[B, T, Ct5]`` and mask ``[B, T]``."""
    tokens = tokenizer(
        list(prompts),
        max_length=max_length,
        padding="max_length",
        truncation=True,
        return_tensors="pt",
    )
    device = next(encoder.parameters()).device
    ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
    features = encoder(input_ids=ids, attention_mask=mask).last_hidden_state.float()
    longest = int(mask.sum(-1).max())
    return features[:, :longest], mask[:, :longest].bool()


def pad(
    features: torch.Tensor, mask: torch.Tensor, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and mask padded with masked rows to ``length`` tokens."""
    extra = length - features.shape[1]
    return F.pad(features, (0, 0, 0, extra)), F.pad(mask, (0, extra), value=False)


def stack(*parts: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Batches of features and masks concatenated (padded to the longest)."""
    length = max(f.shape[1] for f, _ in parts)
    padded = [pad(f, m, length) for f, m in parts]
    return torch.cat([f for f, _ in padded]), torch.cat([m for _, m in padded])
