"""Wall-clock measurement shared by ``eval``, ``profile --target-speedup`` and ``bench/``.

One rule everywhere: an untimed warm-up run of each configuration first (allocations, lazy
initialisation and kernel compiles must not count), then ``repeats`` rounds in which every
configuration runs once, back to back, in an order rotated by the round (:func:`rotated`: no
configuration always runs in one slot). A latency is the median of a configuration's timed runs.
A speedup is paired: the baseline's time over the configuration's in the same round (on the same
input), so that machine load drifting between rounds hits both alike; the reported speedup is the
median of those ratios and its spread the lowest and highest of them (:func:`summary`).

A speedup above what the compute saved allows (:func:`ideal_speedup`, with :data:`TOLERANCE`)
is a measurement problem, never a result: :func:`above_ideal` says so.

Threads: tiny models' many small ops gain nothing from a second thread and stall badly when
another process holds a core, so measurements run on :func:`measurement_threads` (``--threads``,
else ``OMP_NUM_THREADS``, else 1 on a CPU).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

#: A measured speedup more than this share above the ideal one is flagged.
TOLERANCE = 0.1
#: Timed rounds per configuration unless asked otherwise.
REPEATS = 3


def sync(device: str | torch.device) -> None:
    """Wait for the device's queued work (CUDA; a no-op on a CPU)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(
    fn: Callable[[], T],
    device: str | torch.device = "cpu",
    clock: Callable[[], float] | None = None,
) -> tuple[T, float]:
    """``fn()`` and the seconds it took by ``clock`` (default ``time.perf_counter``: wall
    seconds; device work included)."""
    clock = clock or time.perf_counter
    sync(device)
    t0 = clock()
    out = fn()
    sync(device)
    return out, clock() - t0


def rotated(items: Sequence[T], round_: int) -> list[T]:
    """``items`` in the order of timed round ``round_``: shifted left by the round."""
    shift = round_ % len(items) if items else 0
    return [*items[shift:], *items[:shift]]


def paired_speedups(base: Sequence[float], times: Sequence[float]) -> list[float]:
    """Round by round: the baseline's seconds over the configuration's (a zero time, which no
    real run takes, is left out)."""
    if len(base) != len(times):
        raise ValueError(f"{len(base)} baseline rounds for {len(times)} timed rounds")
    return [b / t for b, t in zip(base, times, strict=True) if t > 0]


def summary(values: Sequence[float]) -> tuple[float, float, float] | None:
    """(median, lowest, highest) of ``values``; None when there are none."""
    if not values:
        return None
    return statistics.median(values), min(values), max(values)


def ideal_speedup(compute_fraction: float | None, share: float = 1.0) -> float | None:
    """The most a plan of this compute fraction can gain when the time of the work it counts
    follows the work: ``share`` is that work's part of the plain run's time (1: all of it, the
    ideal 1 / the fraction; below 1 the rest, e.g. the text encoder and VAE around a denoiser,
    stays as it is: 1 / ((1 - share) + share x fraction), Amdahl's law). A fraction above 1
    counts as 1 (work that does not scale, the sampler's say, can only bring a costlier plan
    closer to the baseline, never past it); None when unknown. The benches' "of ideal"
    (DESIGN.md section 8) divides by this with ``share`` the part the fraction counts;
    :func:`above_ideal` uses share 1, the bound no measured speedup can pass."""
    if compute_fraction is None or compute_fraction <= 0:
        return None
    return 1.0 / ((1.0 - share) + share * min(compute_fraction, 1.0))


def above_ideal(speedup: float | None, compute_fraction: float | None) -> bool:
    """Whether ``speedup`` exceeds the ideal of ``compute_fraction`` by more than the tolerance:
    then it measures the machine (noise, a stall in the baseline), not the plan."""
    ideal = ideal_speedup(compute_fraction)
    return speedup is not None and ideal is not None and speedup > ideal * (1 + TOLERANCE)


@contextmanager
def time_inside(
    modules: Sequence[torch.nn.Module],
    device: str | torch.device = "cpu",
    clock: Callable[[], float] | None = None,
) -> Iterator[list[float]]:
    """Sum the seconds spent inside calls of ``modules`` (``clock``'s, default wall seconds;
    device work included; a call made inside another of them counts once) into the yielded
    one-item list. The timers wrap each module's ``forward`` as diffcache's hooks do
    (:func:`diffcache.hooks.attach`), so a module compiled on its own is timed outside its
    graph."""
    from diffcache import hooks

    clock = clock or time.perf_counter
    total, depth = [0.0], [0]

    def timer(inner: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        depth[0] += 1
        if depth[0] == 1:
            sync(device)
        t0 = clock()
        try:
            return inner(*args, **kwargs)
        finally:
            depth[0] -= 1
            if depth[0] == 0:
                sync(device)
                total[0] += clock() - t0

    attached: list[hooks.Attachment] = []
    try:
        attached += [hooks.attach(m, "forward", "diffcache.timer", timer) for m in modules]
        yield total
    finally:
        for a in reversed(attached):
            a.detach()


def costlier(compute_fraction: float) -> str:
    """What a compute fraction above 1 means, for notes and command-line output."""
    return (
        f"compute_fraction {compute_fraction:.3f} is above 1: the plan costs more than no "
        "cache (it computes more units than the plain generation)"
    )


def default_threads() -> int:
    """Threads for a measurement: ``OMP_NUM_THREADS`` when set, else 1."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else 1


@contextmanager
def measurement_threads(threads: int | None = None) -> Iterator[int]:
    """Run the block on ``threads`` torch threads (default :func:`default_threads`), restoring
    the previous count after; yields the count used."""
    import torch

    n = threads or default_threads()
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


def check_count(value: Any, flag: str) -> None:
    """Refuse a repeat or thread count that is not a whole number >= 1 (a DiffCacheError
    naming ``flag``)."""
    from diffcache.errors import DiffCacheError

    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DiffCacheError(f"{flag} must be a whole number >= 1, got {value!r}")
