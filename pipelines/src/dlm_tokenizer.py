"""A small deterministic character tokenizer for the tiny and trained diffusion LMs.

Each character of a fixed alphabet (newline and printable ASCII by default) maps to
``first_id + index``; the special tokens (mask, eos, eot, pad, bos) sit at chosen ids, so a tiny
model can use the real special ids of LLaDA or Dream inside their full vocabularies. It saves
to and loads from one JSON file (``char_tokenizer.json``) beside a model's weights.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

FILE = "char_tokenizer.json"
ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127))
SPECIALS = ("mask", "eos", "eot", "pad", "bos")
# How a special token is written by ``decode(..., skip_special_tokens=False)``.
SPECIAL_TEXT = {name: f"<|{name}|>" for name in SPECIALS}
UNKNOWN = "\ufffd"  # an id that is neither a character nor a special token


class CharTokenizer:
    """Characters of ``alphabet`` at ids ``first_id ...``; specials at the given ids.

    Args:
        specials: special token name (``mask eos eot pad bos``) -> id; a missing name is None.
        alphabet: the characters, each its own token.
        first_id: the id of the alphabet's first character.
        vocab_size: ``len(tokenizer)``, normally the model's vocabulary; default: highest id + 1.
    """

    chat_template: str | None = None  # none: prompts are encoded as plain text

    def __init__(
        self,
        specials: dict[str, int],
        *,
        alphabet: str = ALPHABET,
        first_id: int = 0,
        vocab_size: int | None = None,
    ) -> None:
        unknown = sorted(set(specials) - set(SPECIALS))
        if unknown:
            raise ValueError(f"CharTokenizer: unknown special token(s) {unknown}; use {SPECIALS}")
        if len(set(alphabet)) != len(alphabet):
            raise ValueError("CharTokenizer: the alphabet repeats a character")
        self.alphabet, self.first_id = alphabet, first_id
        self.specials = {k: int(v) for k, v in specials.items()}
        chars = range(first_id, first_id + len(alphabet))
        clash = sorted(i for i in self.specials.values() if i in chars)
        if clash:
            raise ValueError(
                f"CharTokenizer: special id(s) {clash} fall in the character ids "
                f"{first_id}..{first_id + len(alphabet) - 1}; move first_id"
            )
        top = max([first_id + len(alphabet) - 1, *self.specials.values()]) + 1
        if vocab_size is not None and vocab_size < top:
            raise ValueError(f"CharTokenizer: vocab_size {vocab_size} < highest id + 1 ({top})")
        self.vocab_size = vocab_size if vocab_size is not None else top
        self._ids = {c: first_id + i for i, c in enumerate(alphabet)}
        self._special_text: dict[int, str] = {}
        for name in SPECIALS:  # a shared id (pad = eos) is written as the first name
            if name in self.specials:
                self._special_text.setdefault(self.specials[name], SPECIAL_TEXT[name])

    # -- special ids --------------------------------------------------------------------------
    @property
    def mask_token_id(self) -> int | None:
        return self.specials.get("mask")

    @property
    def eos_token_id(self) -> int | None:
        return self.specials.get("eos")

    @property
    def eot_token_id(self) -> int | None:
        return self.specials.get("eot")

    @property
    def pad_token_id(self) -> int | None:
        return self.specials.get("pad")

    @property
    def bos_token_id(self) -> int | None:
        return self.specials.get("bos")

    @property
    def all_special_ids(self) -> list[int]:
        return sorted(set(self.specials.values()))

    def __len__(self) -> int:
        return self.vocab_size

    # -- text <-> ids -------------------------------------------------------------------------
    def text_problem(self, text: str) -> str | None:
        """Why ``text`` cannot be encoded (the characters outside the alphabet), or None."""
        missing = "".join(dict.fromkeys(c for c in text if c not in self._ids))
        if not missing:
            return None
        which = "newline and printable ASCII" if self.alphabet == ALPHABET else "its alphabet"
        return (
            f"character(s) {', '.join(map(repr, missing))} not in this model's alphabet "
            f"(its character tokenizer has {which})"
        )

    def encode(self, text: str) -> list[int]:
        """One id per character; a character outside the alphabet is an error."""
        problem = self.text_problem(text)
        if problem:
            raise ValueError(f"CharTokenizer: {problem}")
        return [self._ids[c] for c in text]

    def decode(self, ids: Iterable[int] | Any, skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (a list or a 1-D tensor). Specials are dropped, or written as
        ``<|name|>``; any other id outside the alphabet is written as U+FFFD."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        out = []
        last = self.first_id + len(self.alphabet)
        for i in ids:
            i = int(i)
            if i in self._special_text:
                if not skip_special_tokens:
                    out.append(self._special_text[i])
            elif self.first_id <= i < last:
                out.append(self.alphabet[i - self.first_id])
            else:
                out.append(UNKNOWN)
        return "".join(out)

    # -- files --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "alphabet": self.alphabet,
            "first_id": self.first_id,
            "specials": dict(self.specials),
            "vocab_size": self.vocab_size,
        }

    def save(self, folder: str | Path) -> Path:
        """Write ``char_tokenizer.json`` into ``folder``; returns its path."""
        path = Path(folder) / FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> CharTokenizer:
        """Read ``char_tokenizer.json`` from ``folder``."""
        d = json.loads((Path(folder) / FILE).read_text())
        return cls(
            d["specials"],
            alphabet=d["alphabet"],
            first_id=d["first_id"],
            vocab_size=d["vocab_size"],
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return (
            f"CharTokenizer({len(self.alphabet)} chars from id {self.first_id}, "
            f"specials={self.specials}, vocab_size={self.vocab_size})"
        )
