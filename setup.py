"""Package discovery for the one import root ``diffcache``.

The sibling folders ``kernels/ pipelines/ eval/ profiles/`` are homes, not packages: each keeps its
code one level down in ``src/``, which is the subpackage ``diffcache.kernels`` ...
(``[tool.setuptools.package-dir]`` in pyproject.toml). No top-level folder but ``diffcache/`` has an
``__init__.py``, so an installed distribution of the same name (PyPI's ``kernels``, say) always wins
over the folder when Python runs from the checkout root. Their own subpackages
(``pipelines/src/llada/`` ...) are found here, so adding one needs no edit anywhere.
Everything else about the build is in pyproject.toml.
"""

from setuptools import find_namespace_packages, setup

MAPPED = {
    "diffcache.kernels": "kernels/src",
    "diffcache.pipelines": "pipelines/src",
    "diffcache.eval": "eval/src",
    "diffcache.profiles": "profiles/src",
}
SKIP = ["__pycache__", "*.__pycache__", "*.egg-info"]

packages = ["diffcache"] + [
    f"diffcache.{p}" for p in find_namespace_packages("diffcache", exclude=SKIP)
]
for name, folder in MAPPED.items():
    packages += [name] + [f"{name}.{p}" for p in find_namespace_packages(folder, exclude=SKIP)]

setup(packages=packages)
