"""Package discovery for the one import root ``diffcache``.

The sibling folders ``kernels/ pipelines/ eval/ profiles/`` are the subpackages
``diffcache.kernels`` ... (``[tool.setuptools.package-dir]`` in pyproject.toml); their own
subpackages (``pipelines/llada/`` ...) are found here, so adding one needs no edit anywhere.
Everything else about the build is in pyproject.toml.
"""

from setuptools import find_namespace_packages, setup

MAPPED = {
    "diffcache.kernels": "kernels",
    "diffcache.pipelines": "pipelines",
    "diffcache.eval": "eval",
    "diffcache.profiles": "profiles",
}
SKIP = ["__pycache__", "*.__pycache__", "*.egg-info"]

packages = ["diffcache"] + [
    f"diffcache.{p}" for p in find_namespace_packages("diffcache", exclude=SKIP)
]
for name, folder in MAPPED.items():
    packages += [name] + [f"{name}.{p}" for p in find_namespace_packages(folder, exclude=SKIP)]

setup(packages=packages)
