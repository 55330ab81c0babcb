"""Quantized denoisers: torchao weight-only int8 or bitsandbytes (8-bit, 4-bit) on a pipeline
in place, a GGUF transformer checked
against its config before diffusers loads it (alone, or as the ``.gguf`` file in a pipeline
folder's ``transformer/``, which ``load_model`` and ``--model`` read). How the weights are
stored is what ``diffcache.weights`` describes for plans (``valid_for.weights``).

Caching needs nothing special for them: our hooks wrap module ``forward`` s and every cached or
forecast quantity is an activation, a plain tensor of the compute dtype, whatever the weights
are stored as.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from diffcache.errors import AlreadyAcceleratedError, DiffCacheError


def quantize_int8(pipe: Any) -> Any:
    """Weight-only int8 (torchao ``Int8WeightOnlyConfig``) on every denoiser of ``pipe`` (a
    pipeline or a bare transformer; both experts of a two-expert pipeline), in place; returns
    ``pipe``. Quantize before ``diffcache.accelerate``; a plan profiled on the float model is
    refused if it was calibrated (``valid_for.weights``): profile the quantized one."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    for module in _denoisers_to_quantize(pipe):
        quantize_(module, Int8WeightOnlyConfig())
    return pipe


def quantize_bnb(pipe: Any, config: Any = None) -> Any:
    """bitsandbytes on every denoiser of ``pipe`` (a pipeline or a bare transformer), in place,
    as diffusers' ``from_pretrained(quantization_config=config)`` quantizes a transformer
    (the same layer replacement and weight conversion), but on a loaded model and on any
    device, CPU included, where diffusers' loader needs a GPU. ``config``: a diffusers
    ``BitsAndBytesConfig`` (default 8-bit, ``load_in_8bit=True``); returns ``pipe``."""
    from accelerate.utils import set_module_tensor_to_device
    from diffusers import BitsAndBytesConfig
    from diffusers.quantizers import DiffusersAutoQuantizer

    config = config or BitsAndBytesConfig(load_in_8bit=True)
    if not isinstance(config, BitsAndBytesConfig):
        raise DiffCacheError(
            f"quantize_bnb: config is a {type(config).__name__}, not a diffusers "
            "BitsAndBytesConfig."
        )
    if not (config.load_in_8bit or config.load_in_4bit):
        raise DiffCacheError(
            "quantize_bnb: the BitsAndBytesConfig sets neither load_in_8bit=True nor "
            "load_in_4bit=True."
        )
    for module in _denoisers_to_quantize(pipe):
        quantizer = DiffusersAutoQuantizer.from_config(config, pre_quantized=False)
        state = module.state_dict()
        device = next(module.parameters()).device
        keep = list(getattr(module, "_keep_in_fp32_modules", None) or [])
        quantizer.preprocess_model(model=module, device_map=None, keep_in_fp32_modules=keep)
        for name, value in state.items():  # the replaced layers are empty: fill them
            if quantizer.check_if_quantized_param(module, value, name, state):
                quantizer.create_quantized_param(module, value, name, device, state)
            else:
                set_module_tensor_to_device(module, name, device, value=value)
        quantizer.postprocess_model(module)
        module.hf_quantizer = quantizer  # as from_pretrained leaves it (save, dequantize)
    return pipe


def load_gguf(path: str | Path, model_class: type, config: str | Path, **kwargs: Any) -> Any:
    """A diffusers transformer of ``model_class`` from the GGUF file ``path``, with the
    configuration of the diffusers folder ``config``, its weights kept quantized (diffusers'
    ``GGUFQuantizationConfig``; ``compute_dtype`` defaults to float32). The file's tensors are
    checked against that configuration first: a mismatch is one line naming it."""
    from diffusers import GGUFQuantizationConfig

    problems = gguf_problems(path, model_class, config)
    if problems:
        raise DiffCacheError(
            f"{path}: the GGUF file does not match the {model_class.__name__} configuration in "
            f"{config}: {'; '.join(problems)}; pass config= the folder of the model the file "
            "was made from."
        )
    dtype = kwargs.pop("compute_dtype", torch.float32)
    quant = GGUFQuantizationConfig(compute_dtype=dtype)
    return model_class.from_single_file(
        str(path), config=str(config), quantization_config=quant, **kwargs
    )


def gguf_problems(
    path: str | Path, model_class: type, config: str | Path, most: int = 3
) -> list[str]:
    """How the tensors of the GGUF file differ from a ``model_class`` built from ``config``
    (missing, unexpected, other shapes; at most ``most`` of each, with the counts)."""
    import gguf
    from accelerate import init_empty_weights

    if not Path(path).is_file():
        raise DiffCacheError(f"{path}: no such GGUF file")
    with init_empty_weights():
        model = model_class.from_config(model_class.load_config(str(config)))
    want = {k: list(v.shape) for k, v in model.state_dict().items()}
    have = {
        t.name: [int(n) for n in reversed(t.shape.tolist())] for t in gguf.GGUFReader(path).tensors
    }
    shapes = [
        f"{k} is {have[k]} in the file, {want[k]} in the config"
        for k in want
        if k in have and have[k] != want[k]
    ]
    found = [
        (shapes, "other shapes"),
        ([k for k in want if k not in have], "missing from the file"),
        ([k for k in have if k not in want], "not in the model"),
    ]
    return [
        f"{len(items)} {what} ({', '.join(items[:most])}{', ...' if len(items) > most else ''})"
        for items, what in found
        if items
    ]


def gguf_components(folder: Path) -> dict[str, Any]:
    """The components of the diffusers pipeline folder ``folder`` stored as one ``.gguf`` file
    in their subfolder (beside its ``config.json``), loaded with :func:`load_gguf`, by name:
    ``DiffusionPipeline.from_pretrained(folder, **them)`` reads the rest."""
    import importlib
    import json

    index = json.loads((folder / "model_index.json").read_text())
    out = {}
    for name, entry in index.items():
        files = sorted((folder / name).glob("*.gguf")) if (folder / name).is_dir() else []
        if len(files) > 1:
            raise DiffCacheError(
                f"{folder / name}: {len(files)} GGUF files ({', '.join(f.name for f in files)}); "
                "keep the one the pipeline should load."
            )
        if files and isinstance(entry, list) and len(entry) == 2:
            model_class = getattr(importlib.import_module(entry[0]), entry[1])
            out[name] = load_gguf(files[0], model_class, folder / name)
    return out


def _denoisers_to_quantize(pipe: Any) -> list[torch.nn.Module]:
    """The denoiser(s) of a pipeline (its adapter's experts), or ``pipe`` itself if it is one;
    refused if ``pipe`` is accelerated (its plan's ``valid_for.weights`` was checked on the
    weights it had)."""
    from diffcache.adapter import Target
    from diffcache.api import is_accelerated
    from diffcache.registry import find_adapter

    if is_accelerated(pipe):
        raise AlreadyAcceleratedError(
            f"{type(pipe).__name__} is accelerated; call diffcache.remove(), quantize, then "
            "accelerate."
        )
    return list(Target.resolve(find_adapter(pipe), pipe).experts)
