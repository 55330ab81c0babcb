"""Session: what ``accelerate`` opens on one model.

It records every attach it makes (object, attribute, name) and ``close()`` undoes exactly those,
in any order, leaving other libraries' wrappers working. It owns the per-call bookkeeping: the
core wraps every denoiser (and every site a method asks for) once, counts the call, hands the
method a :class:`Call`, and records whether the method computed or reused the work.

A method's ``apply(session, config)`` uses :meth:`on_step` (whole denoiser calls),
:meth:`on_sites` (blocks or modules) and, for anything else, :meth:`attach`; it calls the fused
kernels through :meth:`kernel`, so each run's Stats name the backends its own calls used.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from diffcache import hooks
from diffcache.adapter import Target
from diffcache.compiled import check_not_compiled_after
from diffcache.distributed import check_not_split_after
from diffcache.errors import RunError
from diffcache.lora import Rebind
from diffcache.runstate import RunState
from diffcache.sites import Site

Handler = Callable[["Call"], Any]
T = TypeVar("T")


class Call:
    """One call of a hooked site: its arguments, where it is in the run, and the real forward."""

    __slots__ = ("action", "args", "computed", "inner", "kwargs", "run", "site", "values")

    def __init__(self, run: RunState, site: Site, inner: Callable, args: tuple, kwargs: dict):
        self.run, self.site, self.inner, self.args, self.kwargs = run, site, inner, args, kwargs
        self.computed = False
        self.action: str | None = None  # the trace's action when not computed/reused
        self.values: dict[str, Any] = {}

    def explain(self, action: str | None = None, **values: Any) -> None:
        """What decided this call, for the trace (``action``: e.g. ``forecast`` where the
        answer was neither computed nor reused as is). Cheap: kept only when tracing."""
        if self.run.tracing:
            self.action = action or self.action
            self.values.update(values)

    def traced(self) -> None:
        """Record this call's trace event (computed / reused unless :meth:`explain` said)."""
        action = self.action or ("computed" if self.computed else "reused")
        self.run.trace(self.site.name, action, **self.values)

    def compute(self) -> Any:
        """Run the real forward (and count it as computed)."""
        self.computed = True
        return self.inner(*self.args, **self.kwargs)

    def arg(self, name: str, index: int | None) -> Any:
        """An argument by keyword, else by its positional ``index``; None when absent."""
        if name in self.kwargs:
            return self.kwargs[name]
        return self.args[index] if index is not None and index < len(self.args) else None

    @property
    def step(self) -> int:
        return self.run.step

    @property
    def branch(self) -> int:
        return self.run.branch

    def state(self, factory: Callable[[], Any], branch: int | None = None) -> Any:
        """This site's method state for ``branch`` (default: the current one) in this run."""
        b = self.run.branch if branch is None else branch
        return self.run.slot((self.site.name, self.site.expert, b), factory)


class Session:
    """One accelerated model: target, plan, run state, and every attach made on it."""

    def __init__(self, target: Target, plan: Any, run: RunState, calibration: Any = None):
        self.target, self.plan, self.run, self.calibration = target, plan, run, calibration
        self.attachments: list[hooks.Attachment] = []
        self.driver: Any = None
        self._step: Handler | None = None
        self._expected: list[Counter[str]] = [Counter() for _ in target.experts]
        self._seen: Counter[str] = Counter()  # site calls of each kind in this call
        self.rebind = Rebind(target.experts, self.attachments, self._hook)

    def kernel(self, op: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``op(*args, **kwargs)``, a :mod:`diffcache.kernels` op, on the plan's backend; the
        current run's ``Stats.kernels`` records which backend ran."""
        return op(*args, **kwargs, backend=self.run.kernels, record=self.run.stats.kernels)

    # -- attaching --------------------------------------------------------------------------
    def attach(self, obj: Any, attr: str, name: str, hook: hooks.Hook) -> None:
        """Wrap ``obj.<attr>`` and record it, so that ``close`` undoes exactly this."""
        self.attachments.append(hooks.attach(obj, attr, name, hook))

    def on_step(self, handler: Handler) -> None:
        """``handler(call)`` answers every denoiser call (compute it or return a reuse)."""
        assert self._step is None, "a session has one step handler"
        self._step = handler

    def on_sites(self, sites: Sequence[Site], handler: Handler, name: str) -> None:
        """``handler(call)`` answers every call of each site (blocks or modules)."""
        for site in sites:
            self._expected[site.expert][site.kind] += 1
            self._hook(site, handler, name)

    def _hook(self, site: Site, handler: Handler, name: str) -> None:
        hook = functools.partial(self._site_call, site, handler)
        self.attach(site.module, "forward", f"diffcache.{name}", hook)
        if site.spec is not None:  # a module site: peft may wrap it (diffcache.lora.Rebind)
            self.rebind.add(site, self.attachments[-1], handler, name)

    def install(self, driver: Any) -> None:
        """Attach the driver's hooks and the core's call hook on every expert (outermost)."""
        self.driver = driver
        driver.attach(self)
        for e, module in enumerate(self.target.experts):
            site = Site("step", self.target.expert_names[e], module, e)
            self.attach(module, "forward", "diffcache.call", functools.partial(self._call, site))

    def close(self) -> None:
        """Detach everything this session attached, newest first; idempotent."""
        while self.attachments:
            self.attachments.pop().detach()
        self.run.active = False

    def __deepcopy__(self, memo: dict) -> None:
        return None  # a deep copy of an accelerated pipeline is a plain pipeline

    # -- the core's wrappers ----------------------------------------------------------------
    def _call(self, site: Site, inner: Callable, *args: Any, **kwargs: Any) -> Any:
        """The hook on every expert: one denoiser call of the run."""
        run, expected = self.run, self._expected[site.expert]
        call = Call(run, site, inner, args, kwargs)
        self.driver.before_call(call)
        self.rebind()
        run.begin_call(site.expert)
        self._seen = Counter()
        try:
            out = self._step(call) if self._step is not None else call.compute()
        except BaseException:  # an error or an interrupt in the denoiser ends the run:
            run.end_run()  # its cached tensors are released now, not at the next call
            raise
        run.record("step", float(call.computed))
        if run.tracing and self._step is not None:
            call.traced()
        run.end_call(expected - self._seen)  # the sites that never ran: skipped
        self.driver.after_call()
        return out

    def _site_call(
        self, site: Site, handler: Handler, inner: Callable, *args: Any, **kwargs: Any
    ) -> Any:
        """The hook on every site a method asked for: ``handler`` answers the call."""
        call = Call(self.run, site, inner, args, kwargs)
        out = handler(call)
        self.run.record(site.kind, float(call.computed))
        if self.run.tracing:
            call.traced()
        self._seen[site.kind] += 1
        return out

    # -- checks -----------------------------------------------------------------------------
    def check_parts(self) -> None:
        """Raise (and clean the model) if the pipeline's scheduler or a denoiser was replaced,
        a hooked module was compiled in place since (``diffcache.compiled``), or context
        parallelism was enabled on a denoiser after ``accelerate``."""
        t = self.target
        check_not_compiled_after(self.attachments, self.run)
        owned = list(zip(t.expert_names, t.experts, strict=True))
        check_not_split_after(dict(owned), self.run, hooks.hooked)
        if t.pipe is None:
            return
        if t.scheduler is not None:
            owned.append(("scheduler", t.scheduler))
        for attr, obj in owned:
            if getattr(t.pipe, attr, None) is not obj:
                raise self.run.fail(
                    RunError(
                        f"the pipeline's {attr} was replaced after accelerate "
                        f"({self.run.where()}); diffcache detached itself: call "
                        "diffcache.accelerate() again."
                    )
                )
