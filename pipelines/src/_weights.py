"""Committed weights of the reference models trained here (``dit-digits``, ``wan-shapes``).

Training writes ``sha256.json`` beside a saved pipeline folder; loading checks every weights file
against it first, so a file that is missing, truncated or altered (even one that keeps its size
and still parses) is refused with one error naming the file and the command that re-creates it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from diffcache.errors import UnsupportedModelError
from diffcache.models import loading_bar

CHECKSUMS = "sha256.json"


@dataclasses.dataclass(frozen=True)
class Weights:
    """The weights of one reference model: ``files`` relative to its pipeline folder, and
    ``train``, the command that re-creates them."""

    model: str
    train: str
    files: tuple[str, ...]

    def refuse(self, path: Path, problem: str) -> UnsupportedModelError:
        return UnsupportedModelError(
            f"{self.model}: {path} {problem}; re-create the weights with `{self.train}`."
        )

    def checksums(self, folder: Path) -> dict[str, str]:
        """The sha256 of each weights file of a saved pipeline folder, by relative path."""
        return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in self.files}

    def record(self, folder: Path) -> None:
        """Write ``sha256.json`` for a freshly saved pipeline folder."""
        (folder / CHECKSUMS).write_text(json.dumps(self.checksums(folder), indent=2) + "\n")

    def check(self, folder: Path) -> None:
        """Refuse a missing weights file, or one whose sha256 is not the recorded one."""
        for name in self.files:
            if not (folder / name).is_file():
                raise self.refuse(folder / name, "is missing")
        record = folder / CHECKSUMS
        try:
            recorded = json.loads(record.read_text())
        except (OSError, ValueError) as e:
            raise self.refuse(record, f"cannot be read ({type(e).__name__})") from e
        for name, digest in self.checksums(folder).items():
            if not isinstance(recorded, dict) or recorded.get(name) != digest:
                raise self.refuse(folder / name, f"does not match the sha256 in {record.name}")

    def load(self, pipeline_cls: Any, folder: Path, **kwargs: Any) -> Any:
        """``pipeline_cls`` from a saved folder (offline, fp32, progress bar off), after
        :meth:`check`; a config, tokenizer or index that does not load is refused too."""
        self.check(folder)
        try:
            with loading_bar(False):
                pipe = pipeline_cls.from_pretrained(
                    str(folder), local_files_only=True, dtype=torch.float32, **kwargs
                )
        except Exception as e:  # a damaged config, tokenizer or index fails here
            raise self.refuse(folder, f"cannot be loaded ({type(e).__name__}: {e})") from e
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def state(self, path: Path) -> dict[str, torch.Tensor]:
        """A scorer's state dict (fp32) from a safetensors file, refused like the weights."""
        from safetensors.torch import load_file

        if not path.is_file():
            raise self.refuse(path, "is missing")
        try:
            state = load_file(str(path))
        except Exception as e:  # truncated or overwritten: the header or the data does not parse
            raise self.refuse(path, f"cannot be loaded ({type(e).__name__}: {e})") from e
        return {k: v.float() for k, v in state.items()}
