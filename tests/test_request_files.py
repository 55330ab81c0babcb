"""File-input request fields (``Field.load``): a path must name a file; the pipeline reads it."""

import numpy as np
import pytest
from PIL import Image

from diffcache.generate import Request, call_kwargs, field_problems
from diffcache.pipelines._fields import INPUT_IMAGE, MASK, STRENGTH


def test_a_missing_file_is_named_and_a_present_one_is_read(tmp_path):
    missing = "/no/such/dir/in.png"
    assert field_problems(INPUT_IMAGE, missing) == [f"--image {missing!r}: no such file"]
    pixels = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    Image.fromarray(pixels).save(tmp_path / "in.png")
    Image.fromarray(pixels[..., 0]).save(tmp_path / "mask.png")
    req = Request(image=str(tmp_path / "in.png"), mask=str(tmp_path / "mask.png"), strength=0.6)
    assert field_problems(INPUT_IMAGE, req.get("image")) == []
    kwargs = call_kwargs((INPUT_IMAGE, MASK, STRENGTH), req)
    assert np.array_equal(np.asarray(kwargs["image"]), pixels)
    assert np.asarray(kwargs["mask_image"].convert("L")).tolist() == pixels[..., 0].tolist()
    assert kwargs["strength"] == pytest.approx(0.6)


def test_strength_is_a_fraction():
    assert field_problems(STRENGTH, 1.5) == ["--strength must be <= 1 for this model, got 1.5"]
