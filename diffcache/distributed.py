"""Work split across processes under ``accelerate launch`` (and a no-op in one process).

``shard`` gives this process its share of a list (every ``size``-th item from its rank), and
``gather`` collects one object from every process, in rank order, on every process. accelerate
is imported only when the launcher started several processes (``WORLD_SIZE`` > 1); on a machine
without GPUs its processes talk over gloo (``accelerate launch --multi_gpu --num_processes N``
starts them; ``torchrun --nproc_per_node N`` does too). The process group is closed at exit.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def size() -> int:
    """How many processes work on this job."""
    return max(int(os.environ.get("WORLD_SIZE", "1") or 1), 1)


@functools.cache
def _state() -> Any:
    import atexit

    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    atexit.register(state.destroy_process_group)
    return state


def rank() -> int:
    """This process's index (0 on the main process)."""
    return _state().process_index if size() > 1 else 0


def is_main() -> bool:
    return rank() == 0


def shard(items: Sequence[T]) -> list[T]:
    """This process's share: items ``rank, rank + size, ...``."""
    return list(items[rank() :: size()])


def gather(obj: T) -> list[T]:
    """``obj`` from every process, in rank order (``[obj]`` in one process)."""
    if size() == 1:
        return [obj]
    from accelerate.utils import gather_object

    _state()
    return gather_object([obj])
