"""The dit-digits reference model: loads offline through the stock DiTPipeline, draws digits its
classifier recognises, trains deterministically, and refuses missing or corrupt weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from diffcache.errors import UnsupportedModelError
from diffcache.generate import generate
from diffcache.models import builtin_models, load_model
from diffcache.pipelines import digits
from diffcache.request import Request


@pytest.fixture(scope="module")
def pipe():
    return load_model("dit-digits")


def _samples(pipe, labels, seed=0) -> np.ndarray:
    base = Request().merged(builtin_models()["dit-digits"].defaults)
    return np.stack([generate(pipe, base.replace(class_label=c, seed=seed)) for c in labels])


def test_loads_offline_as_a_stock_pipeline(pipe) -> None:
    assert type(pipe).__name__ == "DiTPipeline" and pipe.labels["9"] == 9
    a = _samples(pipe, [4])
    assert a.shape == (1, 32, 32, 3) and np.isfinite(a).all()
    assert np.array_equal(a, _samples(digits.load(), [4])), "two loads must agree"


def test_baseline_draws_the_asked_digits(pipe) -> None:
    """10 classes x 1 seed at the default 20 steps: the classifier reads >= 8 of them (the card
    reports the full measurement)."""
    labels = list(range(10))
    right = digits.classify(_samples(pipe, labels)) == np.array(labels)
    assert right.sum() >= 8, f"only {right.sum()} of 10 generated digits are recognised"


def test_classifier_reads_real_held_out_digits() -> None:
    from diffcache.pipelines.digits.train import HELD_OUT
    from diffcache.pipelines.digits.train import digits as data

    x, y = data()
    images = (x[:HELD_OUT] / 2 + 0.5).permute(0, 2, 3, 1).numpy()
    assert (digits.classify(images) == y[:HELD_OUT].numpy()).mean() >= 0.95
    assert not digits.score((int(y[0]) + 1) % 10, images[0])


def test_training_is_deterministic() -> None:
    from diffcache.pipelines.digits.train import train_classifier, train_dit, train_vae

    runs = [train_vae(steps=3, seed=1)[1] for _ in range(2)]
    assert np.allclose(runs[0], runs[1], atol=1e-6, rtol=0)
    vae = train_vae(steps=1)[0]
    dits = [train_dit(vae, steps=3, seed=1)[2] for _ in range(2)]
    assert np.allclose(dits[0], dits[1], atol=1e-6, rtol=0)
    nets = [train_classifier(vae, steps=3, seed=1)[1] for _ in range(2)]
    assert np.allclose(nets[0], nets[1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_missing_or_corrupt_weights_name_the_file_and_the_script(tmp_path, damage) -> None:
    shutil.copytree(digits.HERE / "model", tmp_path / "model")
    weights = tmp_path / "model" / "transformer" / "diffusion_pytorch_model.safetensors"
    if damage == "missing":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(UnsupportedModelError, match=r"python -m diffcache.pipelines.digits.train"):
        digits.load(Path(tmp_path))
