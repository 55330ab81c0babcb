"""Both an editable install and a plain ``pip install .`` import every subpackage."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = (
    "diffcache.kernels",
    "diffcache.pipelines",
    "diffcache.eval",
    "diffcache.profiles",
    "diffcache.methods",
)
CHECK = (
    f"import importlib, json; mods = {{m: importlib.import_module(m).__file__ for m in "
    f"{SUBPACKAGES!r}}}; from diffcache.profiles import bundled_plans; "
    "from diffcache.models import builtin_models; "
    "print(json.dumps([mods, len(bundled_plans()), len(builtin_models())]))"
)


def _run(cmd: list[str], **kw) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout}\n{res.stderr}"
    return res.stdout


def test_editable_install_maps_the_sibling_folders() -> None:
    import json

    mods, n_plans, n_models = json.loads(_run([sys.executable, "-c", CHECK], cwd="/"))
    assert Path(mods["diffcache.kernels"]).parent == ROOT / "kernels" / "src"
    assert Path(mods["diffcache.pipelines"]).parent == ROOT / "pipelines" / "src"
    assert n_plans >= 2 and n_models >= 1


def test_plain_install_imports_every_subpackage(tmp_path: Path) -> None:
    """A plain install of a copy of the tree with one more nested subpackage and a model file:
    the new subpackage and its data ship without any packaging edit."""
    import json
    import shutil

    src = tmp_path / "src"
    shutil.copytree(
        ROOT, src, ignore=shutil.ignore_patterns(".venv*", ".git", "out", "*.egg-info", "build")
    )
    newfam = src / "pipelines" / "src" / "newfam"
    newfam.mkdir()
    (newfam / "__init__.py").write_text("VALUE = 7\n")
    (newfam / "weights.safetensors").write_bytes(b"x")
    target = tmp_path / "site"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(src),
        ],
        cwd=tmp_path,
    )
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    mods, n_plans, n_models = json.loads(_run([sys.executable, "-c", CHECK], cwd="/", env=env))
    for name, file in mods.items():
        assert Path(file).is_relative_to(target), f"{name} imported from {file}, not the install"
    assert n_plans >= 2 and n_models >= 1
    new = "import diffcache.pipelines.newfam as m; print(m.VALUE)"
    assert _run([sys.executable, "-c", new], cwd="/", env=env).strip() == "7"
    assert (target / "diffcache" / "pipelines" / "newfam" / "weights.safetensors").is_file()
    assert (target / "diffcache" / "profiles" / "calibration-prompts.txt").is_file()
