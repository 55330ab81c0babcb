"""The class-shift LoRA of dit-digits: it changes what the model draws, loads only when intact,
and caching keeps the shift."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import diffcache
from diffcache.errors import UnsupportedModelError
from diffcache.models import load_model
from diffcache.pipelines.digits import classify
from diffcache.pipelines.digits.lora import HERE, shifted, with_digits_lora

pytest.importorskip("peft")

CLASSES = list(range(10))


def _draw(pipe) -> tuple[np.ndarray, np.ndarray]:
    images = pipe(class_labels=CLASSES, generator=torch.Generator().manual_seed(0)).images
    return np.asarray(images), classify(images)


def test_lora_shifts_the_classes_and_weight_zero_is_the_base_model() -> None:
    base, read_base = _draw(load_model("dit-digits"))
    shift = np.array([shifted(c) for c in CLASSES])
    assert (read_base == shift).sum() <= 2 and (read_base == CLASSES).sum() >= 8
    lora = load_model("dit-digits-lora")
    _, read_lora = _draw(lora)
    assert (read_lora == shift).sum() >= 8
    off, _ = _draw(with_digits_lora(load_model("dit-digits"), weight=0.0))
    assert np.array_equal(off, base)  # weight 0 (every layer, embeddings too): the base model


def test_cached_runs_keep_the_shift() -> None:
    """The default plan of dit-digits on the LoRA'd model: still skips work, still draws the
    shifted digits; remove gives the uncached LoRA run back bit for bit."""
    pipe = load_model("dit-digits-lora")
    plain, _ = _draw(pipe)
    diffcache.accelerate(pipe, "dit-digits.yaml")
    _, read = _draw(pipe)
    assert diffcache.stats(pipe).compute_fraction < 1
    assert (read == [shifted(c) for c in CLASSES]).sum() >= 8
    diffcache.remove(pipe)
    assert np.array_equal(_draw(pipe)[0], plain)


def test_an_altered_adapter_file_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "lora"
    shutil.copytree(HERE, folder)
    data = bytearray((folder / "adapter.safetensors").read_bytes())
    data[-1] ^= 1
    (folder / "adapter.safetensors").write_bytes(bytes(data))
    with pytest.raises(UnsupportedModelError, match=r"adapter\.safetensors does not match .*lora"):
        with_digits_lora(load_model("dit-digits"), folder=folder)
