"""How a next-scale KV-compression method attaches to VAR / Infinity (research/var.md §4).

A method's ``apply`` hands :func:`attach_history` a factory of its
:class:`~diffcache.kv.history.Selection`; the pipeline method the adapter's KV seam names
(``Adapter.kv.policy``: ``history_store``) is wrapped (instance-level, undone by ``remove``) so
each generation attends through a fresh :class:`~diffcache.kv.budget.BudgetedHistory` of that
selection, metered by :class:`MeteredHistory`.

Work is counted in kind ``attn_pair``: one query row attending one key row, per layer, batch row
and head. The plain model's queries at scale ``si`` attend ``start(si) + tokens(si)`` keys, so
``compute_fraction`` is the attention work the method kept. Stats also carry, per generation,
``kv_history_bytes`` (the history held before each scale; the last entry is the papers' "KV
cache"), ``kv_bytes_peak`` (the layer-sweep peak), ``kv_attn_macs`` (the QK^T and AV
multiply-accumulates of each scale over the key rows its queries attended: ``2·head_dim`` per
(query, key) pair the store counted) and ``kv_geometry`` (what
:class:`~diffcache.kv.memory.Geometry` needs to recompute the bytes and the plain cache's MACs).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from diffcache.errors import PlanError, UnsupportedModelError
from diffcache.kv.budget import BudgetedHistory
from diffcache.kv.history import ScaleCall, Schedule, Selection
from diffcache.runstate import RunState
from diffcache.session import Session


class KeepAll:
    """The unlimited budget: one group per layer, nothing evicted (the plain model's cache)."""

    when = "post"

    def groups(self, layer: int, heads: int) -> list[list[int]]:
        return [list(range(heads))]

    def keep(
        self, call: ScaleCall, group: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor | None:
        return None


class MeteredHistory:
    """A generation's budgeted store that reports its attention work and bytes to the run;
    ``check(schedule)`` refuses, at the generation's first attention, a schedule the
    selection does not fit (a model whose schedule follows the request: Infinity's sizes)."""

    def __init__(
        self, store: BudgetedHistory, run: RunState, check: Callable[[Schedule], None]
    ) -> None:
        self.store, self.run, self.check = store, run, check
        self.geometry: dict[str, Any] = {}

    def attend(
        self, call: ScaleCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        if not self.geometry:
            self.check(call.schedule)
        before = self.store.pairs
        out = self.store.attend(call, q, k, v)
        b, h, n, d = q.shape
        plain = b * h * n * call.schedule.start(call.si + 1)
        self.run.record("attn_pair", float(self.store.pairs - before), float(plain))
        self.run.record_kv(self.store.nbytes())
        if call.layer >= self.geometry.get("layers", 0):  # the first sweep: each layer once
            self.geometry = {
                "layers": call.layer + 1,
                "heads": h,
                "head_dim": d,
                "k_bytes": k.element_size(),
                "v_bytes": v.element_size(),
                "schedule": [list(s) for s in call.schedule.sizes],
                "rows": b,
            }
        return out

    def nbytes(self) -> int:
        return self.store.nbytes()

    def history_nbytes(self) -> int:
        return self.store.history_nbytes()

    def peak_nbytes(self) -> int:
        return self.store.peak_nbytes()

    def report(self) -> None:
        """Put the generation's byte counts and geometry into the run's Stats."""
        stats = self.run.stats
        scales = len(self.geometry.get("schedule", ()))
        stats.kv_history_bytes = [self.store.scale_history.get(si, 0) for si in range(scales)]
        stats.kv_bytes_peak = self.store.peak_nbytes()
        per_pair = 2 * self.geometry.get("head_dim", 0)
        stats.kv_attn_macs = [per_pair * self.store.scale_pairs.get(si, 0) for si in range(scales)]
        stats.kv_geometry = dict(self.geometry)
        stats.kernels.update(self.store.kernel_record)


class _Generations:
    """The metered store of each generation of one session's pipeline."""

    def __init__(
        self, session: Session, factory: Callable[[], Selection], check: Callable[[Schedule], None]
    ) -> None:
        self.session, self.run, self.factory, self.check = session, session.run, factory, check
        self.store: MeteredHistory | None = None
        self.selection: Selection | None = None
        self.sizes: dict[tuple[int, int, Schedule], int] = {}  # the selection's buffer sizes

    def new_store(self, inner: Callable, *args: Any, **kwargs: Any) -> MeteredHistory:
        selection = self.factory()
        if selection is not self.selection:  # buffer sizes are the selection's
            self.selection, self.sizes = selection, {}
        store = BudgetedHistory(selection, self.session.run.kernels, self.sizes)
        self.store = MeteredHistory(store, self.run, self.check)
        return self.store

    def end_run(self, inner: Callable, *args: Any, **kwargs: Any) -> Any:
        """Report the generation's bytes and let go of its store."""
        if self.store is not None:
            self.store.report()
        self.store = None
        return inner(*args, **kwargs)


def history_seam(session: Session, name: str) -> str:
    """The pipeline method that hands out each generation's history store, or
    UnsupportedModelError naming the capability the model lacks."""
    adapter = session.target.adapter
    if adapter.kv is None or adapter.provides.kv_store != "history":
        have = "none" if adapter.kv is None else f"a {adapter.provides.kv_store} store"
        raise UnsupportedModelError(
            f"{name} needs a model with a history KV store (Adapter.kv, provides.kv_store="
            f"'history'); {adapter.name} declares {have}"
        )
    return adapter.kv.policy


def attach_history(
    session: Session,
    name: str,
    factory: Callable[[], Selection],
    check: Callable[[Schedule], None] = lambda schedule: None,
) -> None:
    """Make every generation of the session's pipeline attend through a budgeted store of
    ``factory()``'s selection, metered (work in ``attn_pair``, bytes into Stats); ``check``
    refuses a generation's schedule before its first attention."""
    seam = history_seam(session, name)
    generations = _Generations(session, factory, check)
    pipe = session.target.pipe
    session.attach(pipe, seam, f"diffcache.{name}", generations.new_store)
    session.attach(pipe, "end_run", f"diffcache.{name}.bytes", generations.end_run)


def model_shape(session: Session) -> tuple[Schedule, int, int]:
    """The schedule (of the default request: ``pipe.schedule``, or ``pipe.schedule(None,
    None)`` where it follows the image size), layers and heads of the session's next-scale
    model (its transformer's config: ``depth``, ``num_heads``)."""
    return target_shape(session.target)


def target_shape(target: Any) -> tuple[Schedule, int, int]:
    """:func:`model_shape` of a resolved ``Target`` (before any session, e.g. profiling)."""
    config, schedule = target.denoiser.config, target.pipe.schedule
    schedule = schedule(None, None) if callable(schedule) else schedule
    return schedule, config.depth, config.num_heads


def token_budget(budget: int | None, ratio: float | None, schedule: Schedule) -> int | None:
    """Rows per head: ``budget`` tokens, or ``ratio`` of the history before the last scale
    (rounded down, research/var.md §2.3); None when neither is given (unlimited)."""
    if budget is not None and ratio is not None:
        raise PlanError(f"give budget ({budget}) or ratio ({ratio}), not both")
    if ratio is None:
        return budget
    return max(1, int(ratio * schedule.start(len(schedule) - 1)))


def attach_selection(session: Session, config: Any) -> None:
    """Build the method's selection for the session's model with ``config.make(calibration,
    schedule, layers, heads)`` (``HistoryKVConfig``; None: the unlimited budget) on its default
    schedule (a ``ratio`` budget is resolved there), check it before any work (its optional
    ``check(schedule, layers)``, again for each generation's schedule) and attach it
    (:func:`attach_history`). A plan that does not fit the model is refused with one PlanError
    line naming the plan and the mismatch."""
    name, make = config.name, functools.partial(config.make, session.calibration)
    history_seam(session, name)
    schedule, layers, heads = model_shape(session)
    selection = fitted_selection(session.plan.source, make, schedule, layers, heads)
    fits = _Fits(session.plan.source, layers)
    chosen: Selection = KeepAll() if selection is None else selection
    checked = {schedule}  # checked once each: the selection does not change

    def check(s: Schedule) -> None:
        if s not in checked:
            fits(s, chosen)
            checked.add(s)

    attach_history(session, name, lambda: chosen, check)


def fitted_selection(
    source: str,
    make: Callable[[Schedule, int, int], Selection | None],
    schedule: Schedule,
    layers: int,
    heads: int,
) -> Selection | None:
    """``make(schedule, layers, heads)`` checked against that model (the selection's optional
    ``check``); a mismatch is one PlanError line naming the plan ``source``."""
    fits = _Fits(source, layers)
    selection = fits.make(make, schedule, heads)
    fits(schedule, selection)
    return selection


class _Fits:
    """Checks of a selection against a model of ``layers`` layers, each failure one PlanError
    line naming the plan ``source``."""

    def __init__(self, source: str, layers: int) -> None:
        self.source, self.layers = source, layers

    def make(
        self, make: Callable[[Schedule, int, int], Selection | None], schedule: Schedule, heads: int
    ) -> Selection | None:
        return self._named(lambda: make(schedule, self.layers, heads))

    def __call__(self, schedule: Schedule, selection: Selection | None) -> None:
        check = getattr(selection, "check", None)
        if check is not None:
            self._named(lambda: check(schedule, self.layers))

    def _named(self, work: Callable[[], Any]) -> Any:
        try:
            return work()
        except (PlanError, ValueError) as e:
            raise PlanError(f"{self.source}: {e}") from None
