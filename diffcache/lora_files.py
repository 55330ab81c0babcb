"""LoRA files a user loads into a model (``--lora PATH[:WEIGHT]``, repeatable): each is read
and checked before the model is built, then loaded into it as one adapter at its weight,
through diffusers' ``load_lora_weights`` and ``set_adapters`` where the pipeline has them, and
with peft into the transformer for DiT (DiTPipeline has no LoRA loader).

A file is a safetensors state dict of LoRA tensors, as diffusers' ``save_lora_weights`` or
peft's ``get_peft_model_state_dict`` write them; a folder holding one such file is read too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from diffcache.errors import DiffCacheError

FLAG = "--lora"
#: families whose pipeline has no LoRA loader but whose transformer takes peft adapters
PEFT_FAMILIES = ("dit",)
#: the tensors a LoRA file holds (peft / diffusers and kohya names)
_LORA_KEY = re.compile(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_down|lora_up)\b")
#: peft's name of a LoRA tensor: the module, then the part
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_embedding_A)(\.weight)?$")


@dataclasses.dataclass(frozen=True)
class LoraFile:
    """One ``--lora`` argument: the file and the weight it loads at."""

    given: str  # as the user wrote it
    path: Path  # the .safetensors file
    weight: float
    stem: str  # the name of the file or folder given: the adapter's name

    def tensors(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.path))


def parse_lora(given: str) -> LoraFile:
    """``PATH[:WEIGHT]`` (weight 1 without one) checked: the file exists, is safetensors and
    holds LoRA tensors, the weight is a finite number. Raises DiffCacheError naming ``given``."""
    path, weight = Path(given), 1.0
    if not path.exists() and ":" in given:
        head, _, tail = given.rpartition(":")
        try:
            weight = float(tail)
        except ValueError:
            raise DiffCacheError(
                f"{FLAG} {given}: the weight {tail!r} is not a number (PATH[:WEIGHT], e.g. "
                f"{FLAG} my_lora.safetensors:0.8)"
            ) from None
        if not math.isfinite(weight):
            raise DiffCacheError(f"{FLAG} {given}: the weight must be a finite number")
        path = Path(head)
    stem = path.stem
    if path.is_dir():
        path = _file_in(path, given)
    if not path.is_file():
        raise DiffCacheError(f"{FLAG} {given}: no such file {str(path)!r}")
    keys = _keys(path, given)
    if not any(_LORA_KEY.search(k) for k in keys):
        raise DiffCacheError(
            f"{FLAG} {given}: {path.name} holds no LoRA tensors (no lora_A / lora_B / lora_down "
            f"/ lora_up names among its {len(keys)} tensors)"
        )
    return LoraFile(given, path, weight, stem)


def _file_in(folder: Path, given: str) -> Path:
    """The one ``.safetensors`` file in ``folder`` (diffusers' ``save_lora_weights`` output)."""
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        found = ", ".join(f.name for f in files) or "none"
        raise DiffCacheError(
            f"{FLAG} {given}: a folder must hold one .safetensors file (found: {found}); give "
            "the file"
        )
    return files[0]


def _keys(path: Path, given: str) -> list[str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise DiffCacheError(f"{FLAG} {given}: not a safetensors file ({e})") from None


def loader(pipeline_class: type | None, family: str) -> str | None:
    """How LoRA files load into a pipeline of ``pipeline_class`` in ``family``: ``diffusers``
    (its ``load_lora_weights``), ``peft`` (into the transformer) or None (no way)."""
    if callable(getattr(pipeline_class, "load_lora_weights", None)):
        return "diffusers"
    return "peft" if family in PEFT_FAMILIES else None


def check_model(model: str, adapter: Any) -> None:
    """Refuse ``--lora`` on ``model`` before it is built when its family has no LoRA loader:
    a built-in model by its ``adapter`` (None for a folder), a model folder by the pipeline
    class its files name (:func:`diffcache.models.folder_pipeline`, e.g. model_index.json's
    ``_class_name``). A folder naming no known family is left to loading it."""
    import diffusers

    from diffcache.models import folder_pipeline
    from diffcache.registry import adapters

    if adapter is not None:
        name = adapter.pipelines[0] if adapter.pipelines else None
    else:
        name = folder_pipeline(Path(model))
        adapter = next((a for a in adapters().values() if name in a.pipelines), None)
        if adapter is None:
            return
    check_loader(getattr(diffusers, name, None) if name else None, adapter.family, model)


def check_loader(pipeline_class: type | None, family: str, model: str) -> None:
    """Refuse ``--lora`` on a model whose family has no LoRA loader."""
    if loader(pipeline_class, family) is None:
        raise DiffCacheError(
            f"{FLAG}: {model} ({family}) has no LoRA loader; LoRA files load into the diffusers "
            f"DiT families (wan2.1, flux, hunyuanvideo, qwenimage, cogvideox and their "
            f"variants) and {', '.join(PEFT_FAMILIES)}"
        )


def adapter_names(loras: Sequence[LoraFile]) -> list[str]:
    """One adapter name per file: its stem, made unique (``style``, ``style_2``)."""
    names: list[str] = []
    for lora in loras:
        base = re.sub(r"\W", "_", lora.stem) or "lora"
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base}_{n}"
        names.append(name)
    return names


def load_loras(pipe: Any, loras: Sequence[LoraFile]) -> Any:
    """Load ``loras`` into ``pipe``, each as an adapter at its weight, all active; returns
    ``pipe``. A file none of whose tensors fit the denoiser is a DiffCacheError."""
    from diffcache.adapter import Target
    from diffcache.registry import find_adapter

    adapter = find_adapter(pipe)
    check_loader(type(pipe), adapter.family, type(pipe).__name__)
    experts = Target.resolve(adapter, pipe).experts
    names = adapter_names(loras)
    by_diffusers = loader(type(pipe), adapter.family) == "diffusers"
    for lora, name in zip(loras, names, strict=True):
        try:
            with _quiet_loading():
                if by_diffusers:
                    pipe.load_lora_weights(lora.tensors(), adapter_name=name)
                else:
                    inject_lora_state(pipe.transformer, lora.tensors(), name)
        except (ValueError, KeyError, RuntimeError) as e:
            raise DiffCacheError(f"{FLAG} {lora.given}: does not fit this model ({e})") from e
        if not any(name in getattr(m, "scaling", {}) for e in experts for m in e.modules()):
            raise DiffCacheError(
                f"{FLAG} {lora.given}: none of its tensors fit this model's denoiser (a LoRA "
                "for another model?)"
            )
    weights = [lora.weight for lora in loras]
    if by_diffusers:
        pipe.set_adapters(names, weights)
    else:
        from diffusers.utils.peft_utils import set_weights_and_activate_adapters

        set_weights_and_activate_adapters(pipe.transformer, names, weights)
    return pipe


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """Without the notes loading prints for what a file leaves out (diffusers: no keys for a
    text encoder; peft: a second adapter): :func:`load_loras` checks what matters itself."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            yield
    finally:
        diffusers_logging.set_verbosity(level)


def inject_lora_state(
    transformer: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    adapter: str,
    config: Any = None,
) -> None:
    """Put the LoRA ``state`` (peft's tensor names, optionally under ``transformer.``) into
    ``transformer`` with peft as ``adapter``. Without ``config`` it is read off the tensors:
    each module named in ``state`` at the rank its ``lora_A`` has, scale 1 (alpha = rank: a
    state dict carries no alpha)."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    prefix = "transformer."
    if all(k.startswith(prefix) for k in state):
        state = {k.removeprefix(prefix): v for k, v in state.items()}
    if config is None:
        ranks = {
            m["module"]: int(v.shape[0]) for k, v in state.items() if (m := _PEFT_KEY.match(k))
        }
        if not ranks:
            raise ValueError("no lora_A tensors in peft's names (MODULE.lora_A.weight)")
        have = {name for name, _ in transformer.named_modules()}
        missing = sorted(set(ranks) - have)
        if missing:
            raise ValueError(
                f"{len(missing)} of the {len(ranks)} modules it names are not in the model, "
                f"e.g. {missing[0]}"
            )
        rank = max(set(ranks.values()), key=list(ranks.values()).count)
        config = LoraConfig(
            r=rank,
            lora_alpha=rank,
            target_modules=sorted(ranks),
            rank_pattern={re.escape(m): r for m, r in ranks.items() if r != rank},
            alpha_pattern={re.escape(m): r for m, r in ranks.items() if r != rank},
        )
    inject_adapter_in_model(config, transformer, adapter_name=adapter)
    result = set_peft_model_state_dict(transformer, dict(state), adapter_name=adapter)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"{len(unexpected)} tensors fit no module, e.g. {unexpected[0]}")
