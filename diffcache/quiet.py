"""Import-time messages of optional libraries that tell a diffcache user nothing.

With torchao installed, every diffusers import logs that torchao's CUDA-only extensions cannot
load (on a CPU build of torch), that two of torchao's Enums need no pytree registration any more,
and that diffusers cannot import torchao tensor classes that torchao 0.18 moved; with
bitsandbytes installed, on a CPU with AVX512-BF16 its import logs that it could not fetch an
optional 4-bit kernel from the Hugging Face hub (offline: it falls back to its own CPU code,
which is what runs anyway where that kernel is absent). ``install`` drops
exactly those records, by logger and message; every other record of these loggers still shows.
"""

from __future__ import annotations

import logging

#: logger -> pieces of the messages it drops (a record whose text contains one of them)
KNOWN: dict[str, tuple[str, ...]] = {
    "torchao": ("Failed to load ",),  # torchao/__init__: its _C*.so CUDA extensions
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported by torch.compile",),
    "diffusers.quantizers.torchao.torchao_quantizer": (
        "Unable to import `torchao` Tensor objects",
    ),
    "bitsandbytes.backends.cpu.ops": (
        "Failed to load CPU gemm_4bit_forward from kernels-community",
    ),
}


class KnownMessages(logging.Filter):
    """Drops the records whose text contains one of ``pieces``."""

    def __init__(self, pieces: tuple[str, ...]) -> None:
        super().__init__()
        self.pieces = pieces

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(piece in text for piece in self.pieces)


def install() -> None:
    """Attach the filters of ``KNOWN`` to their loggers (once; cheap, imports no library)."""
    for name, pieces in KNOWN.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, KnownMessages) for f in logger.filters):
            logger.addFilter(KnownMessages(pieces))
