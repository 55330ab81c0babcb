"""With torchao installed, importing diffusers logs torchao's CUDA extensions, its Enum pytree
registrations and diffusers' torchao tensor imports; `diffcache` commands print none of it, and
only those known messages are dropped."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

import diffcache  # noqa: F401  (installs the filters)
from diffcache.quiet import KNOWN

pytest.importorskip("torchao")


def test_generate_and_help_print_no_library_messages(tmp_path: Path) -> None:
    """One process: `--help`, then a plain generate on dit-tiny (diffusers, with torchao around,
    is imported by it); stderr stays empty."""
    script = (
        "import sys\n"
        "from diffcache.cli import main\n"
        "codes = [main(['--help']), main(sys.argv[1:])]\n"
        "sys.exit(max(codes))\n"
    )
    out = tmp_path / "x.png"
    res = subprocess.run(
        [sys.executable, "-c", script, "generate", "--model", "dit-tiny", "--out", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert res.returncode == 0, res.stderr
    assert out.is_file() and res.stderr == ""


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_only_the_known_messages_are_dropped(name: str, caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger(name)
    with caplog.at_level(logging.WARNING, logger=name):
        logger.warning("%s here", KNOWN[name][0])
        logger.warning("something else happened")
    assert [r.getMessage() for r in caplog.records if r.name == name] == ["something else happened"]
