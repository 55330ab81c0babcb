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
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from diffcache.errors import RunError

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


def context_parallel_group(module: Any) -> Any | None:
    """The process group of diffusers' context parallelism on ``module``, or None.

    ``enable_parallelism(config=ContextParallelConfig(...))`` records the config on the model;
    the group spans its ring and Ulysses dimensions together (every rank that holds a shard of
    the sequence)."""
    config = getattr(module, "_parallel_config", None)
    cp = getattr(config, "context_parallel_config", None)
    mesh = getattr(cp, "_flattened_mesh", None)
    return None if mesh is None or mesh.size() < 2 else mesh.get_group()


def context_parallel_split(module: Any) -> tuple[Any | None, bool]:
    """diffusers' context-parallel input split on ``module`` (the hook registry's function
    reference, whose ``forward`` is what the split calls), or None; and whether a gather hook
    sits on ``module`` or inside it (the output comes back whole: FLUX's root, not Wan's
    ``blocks.0``)."""
    registry = getattr(module, "__dict__", {}).get("_diffusers_hook")
    order = list(getattr(registry, "_hook_order", ()))
    splits = [i for i, name in enumerate(order) if name.startswith("cp_input---")]
    if not splits or not hasattr(module, "modules"):
        return None, False
    gathered = any(
        name.startswith("cp_output---")
        for m in module.modules()
        for name in getattr(m.__dict__.get("_diffusers_hook"), "_hook_order", ())
    )
    return registry._fn_refs[splits[0]], gathered


def split_below(module: Any) -> Any | None:
    """Where a hook on ``module``'s forward goes: under diffusers' context-parallel input split
    (its function reference, returned) when ``module`` is split but its output is gathered only
    later (Wan's ``blocks.0``), so the hook sees input and output sharded alike; None where
    ``module`` is not split, or gathers inside (FLUX's root: a hook outside sees both whole)."""
    split, gathered = context_parallel_split(module)
    return None if gathered else split


def check_not_split_after(
    experts: Mapping[str, Any], run: Any, hooked: Callable[[Any], bool]
) -> None:
    """Raise (detaching everything, ``run.fail``) if context parallelism was enabled on one of
    ``experts`` (name -> denoiser) after ``accelerate``: a hook of ours (``hooked``: the
    callable holds one) then runs inside its input split although the denoiser gathers the
    output inside too (FLUX's root), so it would see a sharded input and a whole output."""
    for name, expert in experts.items():
        split, gathered = context_parallel_split(expert)
        if split is not None and gathered and hooked(split.forward):
            raise run.fail(
                RunError(
                    f"context parallelism was enabled on {name} ({type(expert).__name__}) "
                    "after diffcache.accelerate, so its input split runs outside diffcache's "
                    "hooks; diffcache detached itself: call diffcache.accelerate() again "
                    "(after enable_parallelism)."
                )
            )


def mean_across(group: Any | None, means: Any, count: int) -> Any:
    """Means over every rank's share: ``sum(mean_r · count_r) / sum(count_r)``.

    ``means`` is a 1-D tensor of this rank's means over ``count`` elements each; every rank of
    ``group`` gets the same float32 result, so a decision taken on it agrees everywhere. With no
    group, ``means`` comes back unchanged."""
    if group is None:
        return means
    import torch
    import torch.distributed as dist

    sums = torch.cat((means.double() * count, means.new_tensor([count], dtype=torch.float64)))
    dist.all_reduce(sums, group=group)
    return (sums[:-1] / sums[-1]).float()
