"""Bundled plans (``*.yaml`` with their ``.safetensors`` sidecars), the built-in model index
``models.yaml`` and the generic calibration prompts."""

from importlib import resources
from pathlib import Path


def calibration_prompts() -> list[str]:
    """The bundled generic calibration prompts (``calibration-prompts.txt``), in order."""
    text = resources.files(__name__).joinpath("calibration-prompts.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def bundled_plans() -> dict[str, Path]:
    """Plan files shipped in ``diffcache.profiles`` (name -> path); ``models.yaml`` is no plan."""
    root = resources.files(__name__)
    return {
        p.name: Path(str(p))
        for p in sorted(root.iterdir(), key=lambda p: p.name)
        if p.name.endswith(".yaml") and p.name != "models.yaml"
    }
