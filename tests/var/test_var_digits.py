"""The var-digits reference model: loads offline from its committed, checked weights, draws digits
dit-digits' classifier recognises, trains deterministically; its teacher-forcing forward (the
block-causal mask over all scales at once) gives the logits of the scale-by-scale generation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffcache.generate import Request, generate
from diffcache.kv.history import FullHistory, ScaleCall, Schedule
from diffcache.models import builtin_models, load_model
from diffcache.pipelines import var_digits
from diffcache.pipelines.var import VARPipeline, build_tiny


@pytest.fixture(scope="module")
def pipe() -> VARPipeline:
    return load_model("var-digits")


def _samples(pipe: VARPipeline, labels: list[int], seed: int = 0) -> np.ndarray:
    base = Request().merged(builtin_models()["var-digits"].defaults)
    return np.stack([generate(pipe, base.replace(class_label=c, seed=seed)) for c in labels])


def test_loads_the_committed_weights(pipe: VARPipeline) -> None:
    """The built-in model is the committed VAR (fp32), and a second load draws the same image."""
    assert isinstance(pipe, VARPipeline) and pipe.num_classes == 10
    assert all(p.dtype == torch.float32 for p in pipe.transformer.parameters())
    a = _samples(pipe, [4])
    assert a.shape == (1, 32, 32, 3) and np.isfinite(a).all() and 0 <= a.min() <= a.max() <= 1
    assert np.array_equal(a, _samples(var_digits.load(), [4])), "two loads must agree"


def test_baseline_draws_the_asked_digits(pipe: VARPipeline) -> None:
    """10 classes x seed 0 at the default request: the classifier reads >= 8 of them (the card
    reports the full measurement)."""
    labels = list(range(10))
    right = var_digits.classify(_samples(pipe, labels)) == np.array(labels)
    assert right.sum() >= 8, f"only {right.sum()} of 10 generated digits are recognised"
    assert var_digits.score(labels[0], _samples(pipe, labels[:1])[0]) == right[0]


@pytest.mark.slow
def test_baseline_quality_on_80_samples(pipe: VARPipeline) -> None:
    """The card's measurement: 10 classes x seeds 0-7 at the default request, >= 80% read right."""
    labels = list(range(10))
    right = np.concatenate(
        [var_digits.classify(_samples(pipe, labels, seed)) == labels for seed in range(8)]
    )
    assert right.size == 80 and right.mean() >= 0.8, f"accuracy {right.mean():.3f} on 80 samples"


def test_teacher_forcing_gives_the_generation_logits() -> None:
    """Training's one-pass forward with the block-causal mask sees what the scale-by-scale
    generation sees (research/var.md §1.1.3): given the same token maps, its logits at every
    scale equal those of the cached loop through the history seam."""
    model = build_tiny().transformer
    sides = model.config.patch_nums
    gen = torch.Generator().manual_seed(0)
    labels = torch.tensor([3, 10])  # a class and the null class
    inputs = torch.randn(2, model.config.num_tokens - 1, model.config.z_channels, generator=gen)
    with torch.no_grad():
        whole = model.teacher_forcing(labels, inputs)
        cond, x = model.first_input(labels)
        history, steps, start = FullHistory(), [], 0
        schedule = Schedule.square(sides)
        for si, pn in enumerate(sides):
            if si:
                x = model.next_input(si, inputs[:, start - 1 : start - 1 + pn * pn])
            steps.append(model(x, cond, history, ScaleCall(0, si, schedule, cond_rows=2)))
            start += pn * pn
    assert whole.shape == (2, model.config.num_tokens, model.config.vocab_size)
    torch.testing.assert_close(whole, torch.cat(steps, dim=1), atol=1e-5, rtol=1e-5)


def test_training_reaches_codebook_and_encoder() -> None:
    """The VQ-VAE's loss trains the codebook and the Phi convs (through ``f_hat``) and the
    encoder (straight through the quantiser)."""
    from diffcache.pipelines.var.vqvae import VQVAE
    from diffcache.pipelines.var_digits.train import VQ_CONFIG, vq_loss

    torch.manual_seed(0)
    vae = VQVAE(config=VQ_CONFIG).requires_grad_(True)
    vq_loss(vae, torch.rand(2, 3, 32, 32) * 2 - 1).backward()
    for name in ("quantize.embedding.weight", "quantize.quant_resi.qresi_ls.0.weight",
                 "encoder.conv_in.weight", "decoder.conv_out.weight"):  # fmt: skip
        grad = vae.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_training_is_deterministic() -> None:
    """Two short seeded runs of each stage (on the first 64 training digits, at one thread)
    give the same losses; another seed gives other losses, so the comparison can fail."""
    from diffcache.pipelines.var_digits.train import train_var, train_vqvae

    def same(a: list[float], b: list[float]) -> bool:
        return len(a) == len(b) == 3 and np.allclose(a, b, atol=1e-6, rtol=0)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = [train_vqvae(steps=3, seed=s, limit=64)[1] for s in (1, 1, 2)]
        assert same(runs[0], runs[1]) and not same(runs[0], runs[2])
        vae = train_vqvae(steps=1, limit=64)[0]
        fits = [train_var(vae, steps=3, seed=s, limit=64)[1] for s in (1, 1, 2)]
        assert same(fits[0], fits[1]) and not same(fits[0], fits[2])
    finally:
        torch.set_num_threads(threads)


def test_demo_runs_the_default_plan_and_the_task_score(tmp_path, capsys) -> None:
    """``diffcache demo --model var-digits``: the baseline against the default plan
    (var-digits.yaml), the baseline's task score the share of the ten classes the classifier
    reads in the default generations, the plan's history KV at most 30% (within a token)."""
    import json

    from diffcache.cli import main

    argv = ["demo", "--model", "var-digits", "--out", str(tmp_path), "--repeats", "1"]
    assert main(argv) == 0
    assert "demo: var-digits, baseline vs var-digits.yaml" in capsys.readouterr().out
    report = json.loads((tmp_path / "var-digits" / "report.json").read_text())
    labels = list(range(10))
    expected = (var_digits.classify(_samples(load_model("var-digits"), labels)) == labels).mean()
    assert report["baseline"]["samples"] == 10
    assert report["baseline"]["task_score"] == pytest.approx(expected)
    (run,) = report["runs"]
    assert (run["plan"], run["method"], run["samples"]) == ("var-digits.yaml", "scalekv", 10)
    assert run["kv_cache_fraction"] <= 0.3 + 1 / 66


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--threads", "0"], "--threads must be >= 1, got 0"),
        (["--steps-scale", "0.001"], "--steps-scale 0.001 leaves a stage with no step"),
        (["--steps-scale", "nan"], "--steps-scale nan leaves a stage with no step"),
    ],
)
def test_training_refuses_bad_arguments_before_any_work(tmp_path, capsys, argv, message) -> None:
    from diffcache.pipelines.var_digits.train import main as train

    with pytest.raises(SystemExit) as info:
        train(["--out", str(tmp_path / "out"), *argv])
    assert info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
