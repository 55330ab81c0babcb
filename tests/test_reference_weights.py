"""The committed weights of the reference models trained here: a missing, truncated or altered
file (altered bytes keep the size and still parse: the recorded sha256 catches them), or a missing
checksum record, is refused before loading, naming the file and the training command."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from diffcache.errors import UnsupportedModelError
from diffcache.pipelines import digits, digits_fewstep, shapes, shapes_fewstep, var_digits
from diffcache.pipelines._weights import CHECKSUMS

MODELS = {
    "dit-digits": digits,
    "dit-digits-8step": digits_fewstep,
    "wan-shapes": shapes,
    "wan-shapes-8step": shapes_fewstep,
    "var-digits": var_digits,
}
FILES = [(m, f) for m, module in MODELS.items() for f in module.WEIGHTS.files]


def _copy(module, tmp_path: Path) -> Path:
    shutil.copytree(module.HERE / "model", tmp_path / "model")
    return tmp_path / "model"


@pytest.mark.parametrize("damage", ["missing", "truncated", "overwritten"])
@pytest.mark.parametrize(("model", "name"), FILES)
def test_damaged_weights_name_the_file_and_the_script(tmp_path, model, name, damage) -> None:
    module = MODELS[model]
    weights = _copy(module, tmp_path) / name
    blob = weights.read_bytes()
    if damage == "missing":
        weights.unlink()
    elif damage == "truncated":
        weights.write_bytes(blob[:100])
    else:
        weights.write_bytes(blob[:-64] + bytes(64))
    with pytest.raises(UnsupportedModelError) as info:
        module.load(tmp_path)
    assert module.TRAIN in str(info.value) and str(weights) in str(info.value)
    assert str(info.value).startswith(f"{model}: ")


@pytest.mark.parametrize("model", MODELS)
def test_a_missing_checksum_record_is_refused(tmp_path, model) -> None:
    (_copy(MODELS[model], tmp_path) / CHECKSUMS).unlink()
    with pytest.raises(UnsupportedModelError, match=CHECKSUMS):
        MODELS[model].load(tmp_path)


@pytest.mark.parametrize("model", MODELS)
def test_the_committed_weights_match_their_record(model) -> None:
    MODELS[model].WEIGHTS.check(MODELS[model].HERE / "model")
