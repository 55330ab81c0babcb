"""The checkout root is a safe place to run Python: ``diffcache`` is its only import root.

A top-level folder with an ``__init__.py`` (or a script folder's module) named like an installed
distribution shadows it whenever that folder is on ``sys.path``: ``python -m ...`` and ``python -c``
from the root, ``python bench/x.py``. transformers 5.25 imports PyPI's ``kernels``, and our own
``kernels/`` folder once broke every diffusers import that way. These run as a new user does.
"""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HOMES = ("diffcache", "kernels", "pipelines", "eval", "profiles", "tests", "bench")
# folders whose modules Python can import by bare name: the root (python -m / -c from it), each
# script folder (python bench/x.py puts bench/ first), and tests/ (pytest's rootdir conftest)
SCRIPT_FOLDERS = (ROOT, ROOT / "bench", ROOT / "tests")


def _tracked_top_folders() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    return sorted({p.split("/")[0] for p in out.splitlines() if "/" in p and p[0] != "."})


def _installed_import_names() -> set[str]:
    """Top-level import names of every installed distribution but ours, and their names."""
    names = {
        top
        for top, dists in metadata.packages_distributions().items()
        if set(dists) != {"diffcache"}
    }
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and name.lower() != "diffcache":
            names.add(name.lower().replace("-", "_"))
    return names


def _run(args: list[str], cwd: Path) -> str:
    res = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True)
    assert res.returncode == 0, f"{args} from {cwd}:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    return res.stdout


def test_only_diffcache_is_a_package_at_the_top() -> None:
    folders = _tracked_top_folders()
    assert set(HOMES) <= set(folders), "the promised layout keeps these folders at the top"
    packages = [f for f in folders if (ROOT / f / "__init__.py").exists()]
    assert packages == ["diffcache"]


def test_no_script_folder_module_is_named_like_an_installed_distribution() -> None:
    installed = _installed_import_names()
    assert {"kernels", "torch", "diffusers"} <= installed, "the check must see real distributions"
    clashes = []
    for folder in SCRIPT_FOLDERS:
        for entry in folder.iterdir():
            name = entry.stem if entry.suffix == ".py" else entry.name
            importable = entry.suffix == ".py" or (entry / "__init__.py").exists()
            if importable and name != "diffcache" and name.lower() in installed:
                clashes.append(str(entry.relative_to(ROOT)))
    assert clashes == []


def test_imports_from_the_checkout_root_find_installed_distributions() -> None:
    """The failing one-liner of issue 20, from the root and from another folder alike."""
    code = (
        "import diffcache, transformers, diffusers, kernels\n"
        "from diffusers import DiTPipeline, WanPipeline\n"
        "print(kernels.__file__)"
    )
    for cwd in (ROOT, Path("/")):
        where = Path(_run(["-c", code], cwd).strip())
        assert "site-packages" in where.parts, f"`import kernels` found {where} from {cwd}"


@pytest.mark.parametrize("entry", [["-m", "diffcache.cli"], ["-m", "diffcache"]])
def test_the_command_runs_as_a_module_from_the_root(entry: list[str]) -> None:
    out = _run([*entry, "models"], ROOT)
    assert "dit-digits" in out and "llada-arith" in out


@pytest.mark.slow  # `make test` itself collects the suite from the root (10 s more here)
def test_pytest_collects_the_whole_suite_from_the_root() -> None:
    out = _run(["-m", "pytest", "--co", "-q", "-p", "no:cacheprovider"], ROOT)
    counts = dict(line.rsplit(": ", 1) for line in out.splitlines() if line.startswith("tests/"))
    assert int(counts["tests/test_layout.py"]) >= 6 and len(counts) > 40


def test_every_bench_script_answers_help_as_its_own_script() -> None:
    """``python bench/X.py --help`` from the root: bench/ comes first on sys.path, as for a
    script. One process runs each script's ``__main__`` (one diffusers import, not six)."""
    scripts = sorted(p.name for p in (ROOT / "bench").glob("*.py") if p.name != "arg_types.py")
    code = (
        "import runpy, sys\n"
        "sys.path.insert(0, 'bench')\n"
        f"for name in {scripts!r}:\n"
        "    sys.argv = [f'bench/{name}', '--help']\n"
        "    try:\n"
        "        runpy.run_path(f'bench/{name}', run_name='__main__')\n"
        "    except SystemExit as e:\n"
        "        assert e.code in (0, None), (name, e.code)\n"
        "    print('HELP-OK', name)\n"
    )
    out = _run(["-c", code], ROOT)
    assert [line.split()[1] for line in out.splitlines() if line.startswith("HELP-OK")] == scripts
