"""Bundled plans (``*.yaml`` with their ``.safetensors`` sidecars), the built-in model index
``models.yaml`` and the generic calibration prompts."""

import difflib
from importlib import resources
from pathlib import Path

from diffcache.errors import PlanError


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


def bundled_plan(name: str) -> Path:
    """The bundled plan file called ``name`` (``dit-digits.yaml``); for any other ``name`` (a
    plan path that does not exist) a PlanError naming the closest bundled plan."""
    bundled = bundled_plans()
    if name in bundled:
        return bundled[name]
    stems = {Path(n).stem: n for n in bundled}  # ".yaml" is no likeness
    close = difflib.get_close_matches(Path(name).stem, list(stems), n=1, cutoff=0.6)
    hint = f" (did you mean {stems[close[0]]!r}?)" if close else ""
    raise PlanError(
        f"{name}: no such plan file{hint}; `diffcache plans list` shows the "
        f"{len(bundled)} bundled plans."
    )
