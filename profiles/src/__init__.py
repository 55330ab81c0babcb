"""Bundled plans (``*.yaml`` with their ``.safetensors`` sidecars), the built-in model index
``models.yaml`` and the generic calibration prompts."""

from importlib import resources


def calibration_prompts() -> list[str]:
    """The bundled generic calibration prompts (``calibration-prompts.txt``), in order."""
    text = resources.files(__name__).joinpath("calibration-prompts.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]
