"""The direction-swap LoRA of wan-shapes: it reverses the motion the model draws, loads only when
intact, equals ``--model wan-shapes --lora`` its file, trains deterministically, and every DiT
method keeps the reversal under it with ``remove`` bit-exact."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import diffcache
from diffcache.cli import main
from diffcache.errors import UnsupportedModelError
from diffcache.generate import Request, generate
from diffcache.lora import adapter_state
from diffcache.lora_files import load_loras, parse_lora
from diffcache.models import builtin_models, load_model
from diffcache.pipelines import shapes
from diffcache.pipelines.shapes import data
from diffcache.pipelines.shapes.lora import HERE, swapped, with_shapes_lora

pytest.importorskip("peft")

#: one prompt per colour and per direction (the diagonal of the evaluation prompts)
QUICK = [shapes.PROMPTS[i * len(data.DIRECTIONS) + i] for i in range(len(data.COLOURS))]
DEFAULTS = builtin_models()["wan-shapes"].defaults
METHODS = ("", "-ertacache", "-hyca", "-invardiff")


def _draw(pipe) -> tuple[np.ndarray, np.ndarray]:
    """Videos of the quick prompts at seed 0 and the checker's (colour, motion) of each."""
    videos = np.stack([generate(pipe, Request(prompt=p, seed=0).merged(DEFAULTS)) for p in QUICK])
    return videos, shapes.read(videos)


def _reversed(readings: np.ndarray) -> int:
    """How many quick prompts were drawn in their colour moving the opposite way."""
    want = np.array([data.parse(p) for p in QUICK])
    return int(((readings[:, 0] == want[:, 0]) & (readings[:, 1] == want[:, 2] ^ 1)).sum())


@pytest.fixture(scope="module")
def lora_run() -> tuple[np.ndarray, np.ndarray]:
    """The uncached wan-shapes-lora run of the quick prompts."""
    return _draw(load_model("wan-shapes-lora"))


def test_swapped_reverses_only_the_direction() -> None:
    assert swapped("a red square moving left") == "a red square moving right"
    assert swapped("a blue circle moving right") == "a blue circle moving left"
    assert swapped("a green triangle moving up") == "a green triangle moving down"
    assert swapped("a yellow square moving down") == "a yellow square moving up"


def test_the_scorer_reads_the_reversed_direction() -> None:
    """A rendered clip moving right: wan-shapes-lora's scorer accepts it for "moving left" and
    not for "moving right"; wan-shapes' scorer the other way round."""
    video = data.render(
        torch.tensor([2]), torch.tensor([1]), torch.tensor([1]),
        torch.tensor([[8.0, 16.0]]), torch.tensor([5.0]), torch.tensor([2.0]),
    )[0].permute(1, 2, 3, 0).numpy() / 2 + 0.5  # fmt: skip
    lora_score = builtin_models()["wan-shapes-lora"].score_fn()
    base_score = builtin_models()["wan-shapes"].score_fn()
    assert lora_score("a blue circle moving left", video)
    assert not lora_score("a blue circle moving right", video)
    assert base_score("a blue circle moving right", video)
    assert not base_score("a blue circle moving left", video)


def test_lora_reverses_the_motion_and_weight_zero_is_the_base_model(lora_run) -> None:
    base, read_base = _draw(load_model("wan-shapes"))
    assert _reversed(read_base) <= 1
    assert _reversed(lora_run[1]) >= 3, lora_run[1]
    off, _ = _draw(with_shapes_lora(load_model("wan-shapes"), weight=0.0))
    assert np.array_equal(off, base)  # weight 0 in every layer: the base model


@pytest.mark.parametrize("suffix", METHODS)
def test_cached_runs_keep_the_reversal(suffix: str, lora_run) -> None:
    """Each bundled wan-shapes plan (profiled without the LoRA) on the LoRA'd model: skips work,
    still draws the reversed motion; remove gives the uncached LoRA run back bit for bit."""
    pipe = load_model("wan-shapes-lora")
    diffcache.accelerate(pipe, f"wan-shapes{suffix}.yaml")
    _, read = _draw(pipe)
    assert diffcache.stats(pipe).compute_fraction < 1
    assert _reversed(read) >= 3, read
    diffcache.remove(pipe)
    assert np.array_equal(_draw(pipe)[0], lora_run[0])


def test_an_altered_adapter_file_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "lora"
    shutil.copytree(HERE, folder)
    blob = bytearray((folder / "adapter.safetensors").read_bytes())
    blob[-1] ^= 1
    (folder / "adapter.safetensors").write_bytes(bytes(blob))
    with pytest.raises(UnsupportedModelError, match=r"adapter\.safetensors does not match .*lora"):
        with_shapes_lora(load_model("wan-shapes"), folder=folder)


def test_lora_flag_equals_the_builtin_model(tmp_path: Path) -> None:
    """``generate --model wan-shapes --lora adapter.safetensors`` writes what ``generate --model
    wan-shapes-lora`` writes, the LoRA state hash is the same, and it is not the base clip."""
    lora = str(HERE / "adapter.safetensors")
    argv = ["generate", "--prompt", QUICK[0], "--steps", "6"]
    outs = {name: tmp_path / f"{name}.gif" for name in ("flag", "builtin", "base")}
    assert main([*argv, "--model", "wan-shapes", "--lora", lora, "--out", str(outs["flag"])]) == 0
    assert main([*argv, "--model", "wan-shapes-lora", "--out", str(outs["builtin"])]) == 0
    assert main([*argv, "--model", "wan-shapes", "--out", str(outs["base"])]) == 0
    blobs = {name: path.read_bytes() for name, path in outs.items()}
    assert blobs["flag"] == blobs["builtin"] != blobs["base"]
    flagged = load_loras(load_model("wan-shapes"), [parse_lora(lora)])
    builtin = load_model("wan-shapes-lora")
    states = [adapter_state([p.transformer]) for p in (flagged, builtin)]
    assert states[0]["sha256"] == states[1]["sha256"]


def test_training_is_deterministic() -> None:
    from diffcache.pipelines.shapes.lora import train

    runs = [train(shapes.load(), steps=3, clips=16, batch=4) for _ in range(2)]
    assert np.allclose(runs[0][1], runs[1][1], atol=1e-6, rtol=0) and len(runs[0][1]) == 3
    assert runs[0][0].keys() == runs[1][0].keys()
    assert all(k.startswith("transformer.blocks.") for k in runs[0][0])
