"""Known-answer tests for diffcache.eval.metrics on synthetic arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from diffcache.eval import metrics


def _rand(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape)


def _noisy(x: np.ndarray, seed: int = 1, scale: float = 0.05) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0.0, scale, x.shape)
    return np.clip(x + noise, 0.0, 1.0)


def test_identical_image_psnr_inf_and_ssim_one() -> None:
    img = _rand((32, 32, 3))
    assert metrics.psnr(img, img) == float("inf")
    assert metrics.ssim(img, img) == pytest.approx(1.0, abs=1e-9)


def test_constant_offset_psnr_is_20db() -> None:
    ref = np.full((16, 16, 3), 0.5)
    assert metrics.psnr(ref, ref + 0.1) == pytest.approx(20.0, abs=1e-4)
    assert metrics.psnr(ref + 0.1, ref) == pytest.approx(20.0, abs=1e-4)


def test_psnr_decreases_with_noise() -> None:
    img = _rand((24, 24, 3))
    assert metrics.psnr(img, _noisy(img, scale=0.02)) > metrics.psnr(img, _noisy(img, scale=0.1))


def test_video_psnr_is_over_the_whole_sample_and_ssim_the_mean_of_frames() -> None:
    ref = _rand((3, 20, 20, 3), seed=2)
    test = _noisy(ref, seed=3)
    mse = float(np.mean((ref - test) ** 2))
    assert metrics.psnr(ref, test) == pytest.approx(10 * math.log10(1 / mse), rel=1e-12)
    per_psnr = [metrics.psnr(ref[i], test[i]) for i in range(3)]
    assert len(set(per_psnr)) == 3  # the frames really differ
    per_ssim = [metrics.ssim(ref[i], test[i]) for i in range(3)]
    assert metrics.ssim(ref, test) == pytest.approx(float(np.mean(per_ssim)), rel=1e-9)


def test_video_with_one_identical_frame_has_finite_psnr() -> None:
    ref = np.full((2, 16, 16, 3), 0.5)
    test = ref.copy()
    test[1] += 0.1  # frame 0 identical, frame 1 off by 0.1 (20 dB on its own)
    value = metrics.psnr(ref, test)
    assert math.isfinite(value)
    assert value == pytest.approx(20.0 + 10 * math.log10(2), abs=1e-9)  # half the MSE: +3.01 dB
    assert metrics.psnr(ref, ref.copy()) == float("inf")  # only a fully equal sample is inf


@pytest.mark.parametrize("side", [1, 2, 3, 8, 10, 11, 16])
def test_ssim_small_images(side: int) -> None:
    img = _rand((side, side, 3), seed=side)
    assert metrics.ssim(img, img) == pytest.approx(1.0, abs=1e-9)
    value = metrics.ssim(img, _noisy(img, seed=side + 1))
    assert math.isfinite(value) and -1.0 <= value <= 1.0


def test_ssim_window_choice() -> None:
    assert metrics.ssim_window(64, 64) == (11, 1.5)
    assert metrics.ssim_window(11, 40) == (11, 1.5)
    assert metrics.ssim_window(8, 8)[0] == 7
    assert metrics.ssim_window(16, 9)[0] == 9
    assert metrics.ssim_window(2, 2)[0] == 1
    for side in range(1, 30):
        kernel, sigma = metrics.ssim_window(side, side)
        assert kernel % 2 == 1 and kernel <= side and sigma > 0


def test_ssim_8x8_orders_by_noise() -> None:
    img = _rand((8, 8, 3), seed=5)
    small = metrics.ssim(img, _noisy(img, scale=0.01))
    large = metrics.ssim(img, _noisy(img, scale=0.2))
    assert 1.0 > small > large


def test_bad_inputs_raise() -> None:
    img = _rand((8, 8, 3))
    with pytest.raises(ValueError, match="shape"):
        metrics.psnr(img, _rand((8, 9, 3)))
    with pytest.raises(ValueError, match="expected an image"):
        metrics.ssim(img[..., 0], img[..., 0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metrics.psnr(img, img * 2.0)


def test_lpips_unavailable_here_gives_reason() -> None:
    metrics.lpips_unavailable_reason.cache_clear()
    if metrics.lpips_unavailable_reason() is None:
        pytest.skip("LPIPS is fully available offline on this machine")
    img = _rand((32, 32, 3))
    value, reason = metrics.lpips(img, img)
    assert value is None
    assert reason
    assert "torchvision" in reason or "AlexNet" in reason or "lpips" in reason


def test_lpips_availability_is_cached() -> None:
    metrics.lpips_unavailable_reason.cache_clear()
    metrics.lpips_unavailable_reason()
    metrics.lpips_unavailable_reason()
    assert metrics.lpips_unavailable_reason.cache_info().hits >= 1


def test_lpips_reports_missing_backbone(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Everything importable, but the AlexNet weights are not in the (empty) hub cache."""
    import importlib
    import types

    import torch

    real_import = importlib.import_module

    def fake_import(name: str, *args, **kwargs):
        if name == "torchvision":
            return types.ModuleType("torchvision")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(metrics.importlib, "import_module", fake_import)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    metrics.lpips_unavailable_reason.cache_clear()
    try:
        reason = metrics.lpips_unavailable_reason()
        assert reason is not None
        assert "AlexNet backbone weights" in reason
        assert str(tmp_path) in reason
        assert "torchvision" not in reason
        value, why = metrics.lpips(_rand((32, 32, 3)), _rand((32, 32, 3), seed=1))
        assert value is None and why == reason
    finally:
        metrics.lpips_unavailable_reason.cache_clear()


def test_lpips_uses_availability_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """A patched check that says the backbone is missing short-circuits before any model load."""
    reason = "LPIPS (AlexNet) not computed offline: the AlexNet backbone weights are missing"
    monkeypatch.setattr(metrics, "lpips_unavailable_reason", lambda: reason)

    def boom():
        raise AssertionError("model must not be built when LPIPS is unavailable")

    monkeypatch.setattr(metrics, "_lpips_model", boom)
    assert metrics.lpips(_rand((32, 32, 3)), _rand((32, 32, 3), seed=1)) == (None, reason)


def test_lpips_too_small_when_available(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "lpips_unavailable_reason", lambda: None)
    value, reason = metrics.lpips(_rand((16, 16, 3)), _rand((16, 16, 3), seed=1))
    assert value is None and reason is not None and "31" in reason


def test_lpips_with_stub_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """When available: inputs reach the model in [-1, 1], per frame, and are averaged."""
    import torch

    seen: list[tuple[float, float]] = []

    def fake_model(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        assert a.shape == (1, 3, 32, 32)
        seen.append((float(a.min()), float(a.max())))
        return (a - b).abs().mean().reshape(1, 1, 1, 1)

    monkeypatch.setattr(metrics, "lpips_unavailable_reason", lambda: None)
    monkeypatch.setattr(metrics, "_lpips_model", lambda: fake_model)
    ref = np.zeros((2, 32, 32, 1))
    test = ref.copy()
    test[1] = 1.0
    value, reason = metrics.lpips(ref, test)
    assert reason is None
    assert value == pytest.approx(1.0)  # frame 0: 0, frame 1: |-1 - 1| = 2 -> mean 1
    assert seen == [(-1.0, -1.0), (-1.0, -1.0)]


def test_agreement() -> None:
    assert metrics.agreement("The answer is 42.", "The answer is 42.") == 1.0
    assert metrics.agreement("The answer is 42.", "The answer is 42") == 0.0
    assert metrics.agreement("", "") == 1.0


def test_mean() -> None:
    assert metrics.mean([]) is None
    assert metrics.mean([None, None]) is None
    assert metrics.mean([1.0, None, 3.0]) == pytest.approx(2.0)
    assert metrics.mean(iter([0.5])) == 0.5
    assert metrics.mean([1.0, float("inf")]) == float("inf")
