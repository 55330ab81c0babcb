"""Loading a LLaDA or Dream folder (config.json, safetensors, tokenizer files) with no remote code.

The model is built on the meta device from config.json; the safetensors headers are checked
against it first (every missing, unexpected and mis-shaped tensor is named in one error), then
the tensors are read straight into the target dtype and device and assigned, so an 8B model is
never held twice. The tokenizer is a ``PreTrainedTokenizerFast`` over ``tokenizer.json`` with the
special tokens and chat template of the folder's tokenizer files; transformers is imported only
when a tokenizer is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffcache.errors import UnsupportedModelError
from diffcache.models import Loader, register_loader
from diffcache.pipelines.dlm_tokenizer import FILE as CHAR_TOKENIZER
from diffcache.pipelines.dlm_tokenizer import CharTokenizer

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
LISTED = 8  # names shown per kind of problem before "... and N more"
SPECIAL_KEYS = (
    "bos_token", "eos_token", "unk_token", "pad_token", "mask_token", "sep_token", "cls_token",
    "additional_special_tokens",
)  # fmt: skip
TOKENIZER_OPTIONS = (
    "model_max_length", "padding_side", "truncation_side", "clean_up_tokenization_spaces",
)  # fmt: skip
# Qwen2's pre-tokenizer split (byte-level BPE), for folders with vocab.json + merges.txt only.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UnsupportedModelError(f"{path}: cannot be read ({type(e).__name__}: {e})") from e


def detect_family(path: str | Path) -> str | None:
    """``"llada"`` or ``"dream"`` from a folder's config.json (``model_type`` or
    ``architectures``), or None when there is no config.json or it names neither."""
    config = Path(path) / CONFIG
    if not config.is_file():
        return None
    d = _read_json(config)  # an unreadable config.json is named, not passed over
    if not isinstance(d, dict):
        return None
    kind = str(d.get("model_type", "")).lower()
    archs = d.get("architectures") or []
    if kind == "llada" or "LLaDAModelLM" in archs:
        return "llada"
    if kind == "dream" or "DreamModel" in archs:
        return "dream"
    return None


def register_family_loader(pipeline: Any, title: str) -> Loader:
    """Register ``pipeline.from_pretrained`` for the folders whose config.json names its
    ``family`` (:func:`detect_family`); ``title`` is the family as written in the loader's
    description."""
    family = pipeline.family
    return register_loader(
        Loader(
            family,
            lambda path: detect_family(path) == family,
            pipeline.from_pretrained,
            f"config.json naming {title}, safetensors",
            lambda path: pipeline.__name__,
        )
    )


def build_model(family: str, config: dict[str, Any]) -> nn.Module:
    """The family's module from a config.json dict, on the current default device."""
    if family == "llada":
        from diffcache.pipelines.llada.model import LLaDAConfig, LLaDAModelLM

        return LLaDAModelLM(LLaDAConfig.from_dict(config))
    if family == "dream":
        from diffcache.pipelines.dream.model import DreamConfig, DreamModel

        return DreamModel(DreamConfig.from_dict(config))
    raise UnsupportedModelError(f"unknown diffusion-LM family {family!r}; use 'llada' or 'dream'")


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder: ``model.safetensors`` or the shards of the index."""
    index = folder / INDEX
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UnsupportedModelError(f"{index}: has no 'weight_map' object")
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise UnsupportedModelError(
                f"{folder}: shard(s) {', '.join(absent)} named in {INDEX} are missing; "
                "download the complete checkpoint"
            )
        return files
    if (folder / SINGLE).is_file():
        return [folder / SINGLE]
    raise UnsupportedModelError(
        f"{folder}: no {SINGLE} and no {INDEX}; the folder must hold the checkpoint's safetensors"
    )


#: safetensors dtype codes of floating-point tensors (every LLaDA / Dream weight is one)
FLOAT_CODES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


def checkpoint_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, read from the safetensors headers only; a tensor that is not
    floating point is refused (every weight of these models is)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    typed: list[str] = []
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    info = f.get_slice(name)
                    shapes[name] = tuple(info.get_shape())
                    if info.get_dtype() not in FLOAT_CODES:
                        typed.append(f"{name} ({info.get_dtype()})")
        except Exception as e:  # a truncated or overwritten file fails to parse here
            raise UnsupportedModelError(
                f"{path}: cannot be read as safetensors ({type(e).__name__}: {e})"
            ) from e
    if typed:
        raise UnsupportedModelError(
            f"{files[0].parent}: {len(typed)} weight(s) are not floating point: {_listed(typed)}"
        )
    return shapes


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:LISTED])
    return shown + (f" ... and {len(items) - LISTED} more" if len(items) > LISTED else "")


def check_weights(
    model: nn.Module,
    found: dict[str, tuple[int, ...]],
    where: str,
    optional: frozenset[str] = frozenset(),
    hint: str = "the weights do not fit the model built from config.json",
    advice: str = "Check that config.json and the safetensors belong to the same checkpoint.",
) -> None:
    """Refuse weights whose names or shapes differ from ``model``'s state dict, naming every
    missing, unexpected and mis-shaped tensor (``optional`` names may be missing), as
    ``where: hint (...). advice``."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in found and k not in optional]
    unexpected = [k for k in found if k not in expected]
    shaped = [
        f"{k} expected {expected[k]} found {found[k]}"
        for k in expected
        if k in found and found[k] != expected[k]
    ]
    if not (missing or unexpected or shaped):
        return
    parts = [
        f"{len(items)} {kind}: {_listed(items)}"
        for kind, items in (("missing", missing), ("unexpected", unexpected),
                            ("mis-shaped", shaped))
        if items
    ]  # fmt: skip
    raise UnsupportedModelError(f"{where}: {hint} (" + "; ".join(parts) + f"). {advice}")


def load_dlm_model(
    path: str | Path,
    family: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """A LLaDA or Dream model from a folder, in ``dtype`` on ``device``, in eval mode with
    gradients off. Built on the meta device, checked, then loaded with ``assign=True``."""
    from safetensors import safe_open

    folder = Path(path)
    if not (folder / CONFIG).is_file():
        raise UnsupportedModelError(f"{folder}: no {CONFIG}; pass a LLaDA or Dream model folder")
    found = detect_family(folder)
    if family is not None and found not in (None, family):
        raise UnsupportedModelError(
            f"{folder}: a {found} checkpoint (config.json), not a {family} one; load it with "
            f"the {found} pipeline or diffcache.load_model"
        )
    family = family or found
    if family is None:
        raise UnsupportedModelError(
            f"{folder / CONFIG}: model_type / architectures name neither LLaDA nor Dream; "
            "pass family='llada' or 'dream' if the folder holds one of them"
        )
    config = _read_json(folder / CONFIG)
    try:
        if not isinstance(config, dict):
            raise TypeError("the file is not a JSON object")
        with torch.device("meta"):
            model = build_model(family, config)
    except UnsupportedModelError:
        raise
    except (TypeError, ValueError, KeyError, ZeroDivisionError) as e:  # a value of a wrong type
        raise UnsupportedModelError(
            f"{folder / CONFIG}: does not describe a {family} model ({type(e).__name__}: {e})"
        ) from e
    files = checkpoint_files(folder)
    tied = getattr(model.config, "tie_word_embeddings", False)
    optional = frozenset({"lm_head.weight"}) if tied else frozenset()
    check_weights(model, checkpoint_shapes(files), str(folder), optional=optional)

    expected = set(model.state_dict())
    state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for name in f.keys():
                if name in expected:
                    t = f.get_tensor(name)
                    state[name] = t.to(dtype) if t.is_floating_point() else t
    model.load_state_dict(state, strict=False, assign=True)
    del state
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise UnsupportedModelError(f"{folder}: tensors left unloaded: {_listed(left)}")
    return model.eval().requires_grad_(False)


def _token_text(value: Any) -> Any:
    """A special-token entry of tokenizer_config.json as text (AddedToken dicts -> content)."""
    if isinstance(value, dict):
        return value.get("content")
    if isinstance(value, list):
        return [_token_text(v) for v in value]
    return value


def _added_tokens(folder: Path, config: dict[str, Any]) -> dict[int, Any]:
    """id -> ``tokenizers.AddedToken`` of the added tokens: added_tokens.json (special), then
    tokenizer_config.json's ``added_tokens_decoder`` with its flags."""
    from tokenizers import AddedToken

    added: dict[int, Any] = {}
    if (folder / "added_tokens.json").is_file():
        for text, i in _read_json(folder / "added_tokens.json").items():
            added[int(i)] = AddedToken(text, special=True, normalized=False)
    for i, entry in (config.get("added_tokens_decoder") or {}).items():
        entry = entry if isinstance(entry, dict) else {"content": entry}
        flags = ("single_word", "lstrip", "rstrip", "normalized", "special")
        defaults = {"special": True, "normalized": False}
        kw = {k: entry.get(k, defaults.get(k, False)) for k in flags}
        added[int(i)] = AddedToken(entry["content"], **kw)
    return added


def _qwen2_bpe(folder: Path, added: dict[int, Any]) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` from vocab.json + merges.txt with Qwen2's
    pre-tokenizer, and the added tokens at their ids (refused if the ids do not line up)."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    tk = Tokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    for i in sorted(added):  # in id order, so each lands on the next free id
        if added[i].special:
            tk.add_special_tokens([added[i]])
        else:
            tk.add_tokens([added[i]])
    wrong = [f"{t.content!r} ({i})" for i, t in added.items() if tk.token_to_id(t.content) != i]
    if wrong:
        raise UnsupportedModelError(
            f"{folder}: added token(s) {_listed(wrong)} do not follow vocab.json's ids; "
            "provide a tokenizer.json"
        )
    return tk


def load_dlm_tokenizer(path: str | Path) -> Any:
    """The tokenizer of a model folder, with no remote code.

    ``tokenizer.json`` -> ``PreTrainedTokenizerFast`` (the usual case, LLaDA); else
    ``vocab.json`` + ``merges.txt`` -> a byte-level BPE with Qwen2's pre-tokenizer (Dream ships
    only these for its remote ``DreamTokenizer``); else ``char_tokenizer.json`` ->
    :class:`CharTokenizer`. Special tokens come from tokenizer_config.json, overridden by
    special_tokens_map.json; the chat template from chat_template.jinja, else
    tokenizer_config.json's ``chat_template``.
    """
    try:
        return _tokenizer(Path(path))
    except UnsupportedModelError:
        raise
    except Exception as e:  # damaged tokenizer files fail inside tokenizers / transformers
        raise UnsupportedModelError(
            f"{path}: the tokenizer files cannot be loaded ({type(e).__name__}: {e})"
        ) from e


def _tokenizer(folder: Path) -> Any:
    config_path = folder / "tokenizer_config.json"
    config = _read_json(config_path) if config_path.is_file() else {}
    if (folder / "tokenizer.json").is_file():
        source: dict[str, Any] = {"tokenizer_file": str(folder / "tokenizer.json")}
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        source = {"tokenizer_object": _qwen2_bpe(folder, _added_tokens(folder, config))}
    elif (folder / CHAR_TOKENIZER).is_file():
        return CharTokenizer.load(folder)
    else:
        raise UnsupportedModelError(
            f"{folder}: no tokenizer.json (nor vocab.json + merges.txt, nor {CHAR_TOKENIZER}); "
            "copy the checkpoint's tokenizer files into the folder"
        )
    from transformers import PreTrainedTokenizerFast

    kwargs = {k: _token_text(config[k]) for k in SPECIAL_KEYS if config.get(k) is not None}
    if (folder / "special_tokens_map.json").is_file():
        special_map = _read_json(folder / "special_tokens_map.json")
        kwargs.update({k: _token_text(v) for k, v in special_map.items() if k in SPECIAL_KEYS})
    kwargs.update({k: config[k] for k in TOKENIZER_OPTIONS if config.get(k) is not None})
    tokenizer = PreTrainedTokenizerFast(**source, **kwargs)
    template = config.get("chat_template")
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        template = {t["name"]: t["template"] for t in template}
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def load_dlm_folder(
    path: str | Path,
    family: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, Any]:
    """(model, tokenizer) of a LLaDA or Dream folder: :func:`load_dlm_model` and
    :func:`load_dlm_tokenizer` (read first, so a folder without one fails fast).
    ``family`` None: :func:`detect_family`."""
    tokenizer = load_dlm_tokenizer(path)
    return load_dlm_model(path, family, dtype, device), tokenizer
