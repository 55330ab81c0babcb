"""The dit-digits reference model: loads offline through the stock DiTPipeline, draws digits its
classifier recognises, trains deterministically, and refuses missing or corrupt weights."""

from __future__ import annotations

import numpy as np
import pytest

from diffcache.generate import Request, generate
from diffcache.models import builtin_models, load_model
from diffcache.pipelines import digits


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


@pytest.mark.parametrize("model", ["dit-digits", "wan-shapes"])
def test_loads_without_a_progress_bar(model: str, capfd) -> None:
    """A command's stderr holds its own messages: diffusers' and transformers' (wan-shapes'
    text encoder) loading bars stay off."""
    load_model(model)
    err = capfd.readouterr().err
    assert "Loading pipeline components" not in err and "Loading weights" not in err


def test_baseline_draws_the_asked_digits(pipe) -> None:
    """10 classes x 1 seed at the default 20 steps: the classifier reads >= 8 of them (the card
    reports the full measurement)."""
    labels = list(range(10))
    right = digits.classify(_samples(pipe, labels)) == np.array(labels)
    assert right.sum() >= 8, f"only {right.sum()} of 10 generated digits are recognised"


@pytest.mark.slow
def test_baseline_quality_on_80_samples(pipe) -> None:
    """The card's measurement: 10 classes x seeds 0-7 at the default request, >= 80% read right
    (measured 75 of 80)."""
    labels = list(range(10))
    right = np.concatenate(
        [digits.classify(_samples(pipe, labels, seed)) == labels for seed in range(8)]
    )
    assert right.size == 80 and right.mean() >= 0.8, f"accuracy {right.mean():.3f} on 80 samples"


def test_classifier_reads_real_held_out_digits() -> None:
    from diffcache.pipelines.digits.train import HELD_OUT
    from diffcache.pipelines.digits.train import digits as data

    x, y = data()
    images = (x[:HELD_OUT] / 2 + 0.5).permute(0, 2, 3, 1).numpy()
    assert (digits.classify(images) == y[:HELD_OUT].numpy()).mean() >= 0.95
    assert not digits.score((int(y[0]) + 1) % 10, images[0])


def test_training_is_deterministic() -> None:
    """Two short seeded runs of each stage (on the first 64 training digits) give the same losses;
    another seed gives other losses, so the comparison can fail."""
    from diffcache.pipelines.digits.train import train_classifier, train_dit, train_vae

    def same(a: list[float], b: list[float]) -> bool:
        return len(a) == len(b) == 3 and np.allclose(a, b, atol=1e-6, rtol=0)

    runs = [train_vae(steps=3, seed=s, limit=64)[1] for s in (1, 1, 2)]
    assert same(runs[0], runs[1]) and not same(runs[0], runs[2])
    vae = train_vae(steps=1, limit=64)[0]
    dits = [train_dit(vae, steps=3, seed=s, limit=64)[2] for s in (1, 1, 2)]
    assert same(dits[0], dits[1]) and not same(dits[0], dits[2])
    nets = [train_classifier(vae, steps=3, seed=s, limit=64)[1] for s in (1, 1, 2)]
    assert same(nets[0], nets[1]) and not same(nets[0], nets[2])
