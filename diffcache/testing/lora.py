"""Small random LoRAs for tests: written where diffusers' ``load_lora_weights`` reads them, or
put straight into a transformer with peft (DiTPipeline has no LoRA loader)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

#: attention projections (every family) and FLUX / HunyuanVideo single-block ``proj_mlp``, a
#: Linear that is itself a module site
TARGETS = ("to_q", "to_k", "to_v", "proj_mlp")


def lora_config(rank: int = 4, targets: Sequence[str] = TARGETS) -> Any:
    """A LoRA whose B is random too (peft's default B is zero: no effect until trained)."""
    from peft import LoraConfig

    return LoraConfig(
        r=rank, lora_alpha=rank, target_modules=list(targets), init_lora_weights=False
    )


def inject_lora(transformer: torch.nn.Module, name: str, seed: int = 0, **kw: Any) -> None:
    """Add a random LoRA adapter ``name`` to ``transformer`` in place (peft)."""
    from peft import inject_adapter_in_model

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        inject_adapter_in_model(lora_config(**kw), transformer, adapter_name=name)


def write_lora(pipe: Any, folder: Path, seed: int = 0, **kw: Any) -> Path:
    """A random LoRA for ``pipe.transformer`` saved in ``folder`` by the pipeline class's
    ``save_lora_weights``; ``pipe`` itself is left without it."""
    from peft import get_peft_model_state_dict

    scratch = copy.deepcopy(pipe.transformer)
    inject_lora(scratch, "_writing", seed, **kw)
    state = get_peft_model_state_dict(scratch, adapter_name="_writing")
    type(pipe).save_lora_weights(str(folder), transformer_lora_layers=state)
    return folder
