"""The base of the LLaDA and Dream configs: a config.json dataclass with the shared behaviour.

A family config lists its own config.json field names and defaults, and says as data which of
its fields hold the model sizes (``SIZES``) and which settings have one supported value
(``REQUIRED``). This base keeps, once for both: the config.json round trip (unknown keys kept
in ``extra``), the refusal of unsupported settings (all of them in one error, when the config
is built) and the sizes derived from the fields.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, TypeVar

from diffcache.errors import UnsupportedModelError

C = TypeVar("C", bound="DLMConfig")


@dataclasses.dataclass
class DLMConfig:
    """A diffusion-LM ``config.json``: the family subclass declares the fields.

    Class data of a family: ``FAMILY`` (its name in messages), ``MODEL_TYPE`` and
    ``ARCHITECTURE`` (written by :meth:`to_dict`), ``IMPLEMENTS`` (the architecture the module
    implements, named when a setting is refused), ``SIZES`` (role -> field name for ``width``,
    ``layers``, ``heads``, ``kv_heads`` and ``positions``; ``head_dim`` where config.json may
    set it) and ``REQUIRED`` (field -> the only value the module implements).
    """

    extra: dict[str, Any] = dataclasses.field(default_factory=dict, kw_only=True)

    FAMILY: ClassVar[str]
    MODEL_TYPE: ClassVar[str]
    ARCHITECTURE: ClassVar[str]
    IMPLEMENTS: ClassVar[str]
    SIZES: ClassVar[dict[str, str]]
    REQUIRED: ClassVar[dict[str, Any]] = {}

    def __post_init__(self) -> None:
        problems = self.unsupported()
        if problems:
            raise UnsupportedModelError(
                f"{self.FAMILY} config: unsupported setting(s) {'; '.join(problems)}. "
                f"diffcache's {self.FAMILY} module implements the published {self.IMPLEMENTS}; "
                "use a checkpoint with that architecture."
            )

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any]) -> C:
        """From a config.json dict; unknown keys go to ``extra``."""
        names = {f.name for f in dataclasses.fields(cls) if f.name != "extra"}
        own = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        return cls(**cls.from_dict_fields(own, d), extra=extra)

    @classmethod
    def from_dict_fields(cls, own: dict[str, Any], d: dict[str, Any]) -> dict[str, Any]:
        """The field values read from config.json dict ``d`` (``own``: its keys that are
        fields); a family overrides it to read a field from another key."""
        return own

    def to_dict(self) -> dict[str, Any]:
        """A config.json dict (``extra`` keys, then the fields; model_type/architectures added)."""
        out = {"model_type": self.MODEL_TYPE, "architectures": [self.ARCHITECTURE], **self.extra}
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        out.pop("extra")
        return out

    def _size(self, role: str) -> Any:
        return getattr(self, self.SIZES[role])

    @property
    def width(self) -> int:
        """The hidden size."""
        return self._size("width")

    @property
    def layers(self) -> int:
        return self._size("layers")

    @property
    def heads(self) -> int:
        """The query heads."""
        return self._size("heads")

    @property
    def kv_heads(self) -> int:
        """The key/value heads; config.json's None means one per query head (MHA)."""
        n = self._size("kv_heads")
        return self.heads if n is None else n

    @property
    def dim_per_head(self) -> int:
        """The head size: config.json's ``head_dim`` where it is set, else ``width // heads``."""
        return self._set_head_dim() or self.width // self.heads

    def _set_head_dim(self) -> int | None:
        """config.json's ``head_dim`` where the family has one (None or 0: not set)."""
        return self._size("head_dim") if "head_dim" in self.SIZES else None

    @property
    def max_positions(self) -> int:
        return self._size("positions")

    @property
    def logits_size(self) -> int:
        """Rows of the embedding and of the LM head."""
        return self.vocab_size  # type: ignore[attr-defined]

    def unsupported(self) -> list[str]:
        """Every setting the module does not implement, as ``name=value (needs ...)``:
        ``REQUIRED`` values, then :meth:`family_problems`, then the sizes."""
        problems = [
            f"{k}={getattr(self, k)!r} (needs {v!r})"
            for k, v in self.REQUIRED.items()
            if getattr(self, k) != v
        ]
        return problems + self.family_problems() + self.size_problems()

    def family_problems(self) -> list[str]:
        """The family's own refused settings beyond ``REQUIRED`` (none here)."""
        return []

    def size_problems(self) -> list[str]:
        """Head sizes the module cannot run: width not split evenly over the heads, an odd head
        size (RoPE rotates halves), key/value heads that do not divide the query heads."""
        names = self.SIZES
        problems = []
        if not self._set_head_dim() and self.width % self.heads:
            problems.append(
                f"{names['width']}={self.width} not divisible by {names['heads']}={self.heads}"
            )
        if self.dim_per_head % 2:
            problems.append(f"head_dim={self.dim_per_head} (needs an even head_dim)")
        if self.kv_heads < 1 or self.heads % self.kv_heads:
            problems.append(
                f"{names['kv_heads']}={self.kv_heads} (must divide {names['heads']}={self.heads})"
            )
        return problems
