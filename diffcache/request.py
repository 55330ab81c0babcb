"""Generation request fields: what an adapter declares a generation of its family takes.

Each adapter lists its :class:`Field` s (name, type, CLI flag, pipeline keyword, bounds). The CLI
builds its flags from the union over all adapters, and ``diffcache.generate`` checks a
``Request``'s values against them and turns it into the pipeline's keyword arguments, so adding a
field touches one place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Field:
    """One request field of a model family.

    Args:
        name: request key; the CLI flag is ``--name-with-dashes``.
        type: ``int``, ``float`` or ``str``.
        help: one line for ``--help``.
        call_arg: the pipeline keyword the value becomes.
        min, max: inclusive bounds for numbers.
        multiple_of: the value must be a multiple of this (image sides), plus ``offset``
            (video frames: ``4k + 1``).
        as_list: passed as a one-element list (``class_labels=[c]``).
        limit: model-dependent maximum, read from the loaded pipeline (number of classes).
        required: a request without it is refused.
        accepts: model-dependent check of a text value with the loaded pipeline,
            ``accepts(pipe, text)`` -> the problem or None (a prompt against a text model's
            tokenizer).
        input: the field ``eval``'s and ``profile``'s inputs fill (prompts, or class ids given
            as text), at most one per family (see ``generate.expand``).
        load: for a file given by its path (an image, a mask, a video): reads it into what the
            pipeline takes; the path must name a file.
    """

    name: str
    type: type
    help: str
    call_arg: str
    min: float | None = None
    max: float | None = None
    multiple_of: int | None = None
    offset: int = 0
    as_list: bool = False
    limit: Callable[[Any], int] | None = None
    required: bool = False
    accepts: Callable[[Any, str], str | None] | None = None
    input: bool = False
    load: Callable[[str], Any] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")
