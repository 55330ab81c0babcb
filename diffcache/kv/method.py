"""How a text-diffusion caching method attaches to our pipelines.

A method's ``apply`` hands :func:`attach_policy` a factory of its :class:`Policy`; the pipeline
method the adapter's KV seam names (``Adapter.kv.policy``: our text LMs' ``cache_policy``) is
wrapped (instance-level, undone by ``remove``) to return it, and every model call is counted in
token-layers (rows recomputed at each layer, per batch row), with the store's bytes as KV memory.

``compute_fraction`` of the DLM methods is the token-layers recomputed over those of the plain
generation: ``steps`` model calls of every row at every layer. A method that decodes in fewer
calls (parallel decoding) is credited for the calls it never made, as a DiT step cache is for the
steps it skips, so 1 / compute_fraction is the ideal speedup over no cache in both. A decoding
rule that makes more calls than ``steps`` (a confidence threshold commits at least one token a
call, where the plain generation of ``steps < gen_length`` commits several) is charged for them:
its fraction can then pass 1.

The plan's ``kernels:`` backend goes to the policy (the store's K/V scatter and the sampler's
fused confidence statistics) with a record of this generation's own: at its end the run's Stats
name the backend each of them used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from diffcache.errors import UnsupportedModelError
from diffcache.kv.policy import Policy, StepPlan
from diffcache.session import Call, Session


def token_layers(plan: StepPlan, batch: int, length: int, layers: int) -> tuple[float, float]:
    """(computed, total) token-layers of one forward that followed ``plan``."""
    total = float(batch * length * layers)
    if plan.rows is None:
        return total, total
    rows = plan.real_rows(length).double().cpu()
    if plan.full_from is None:
        return float(rows.sum()) * layers, total
    full = plan.full_from.double().cpu()
    return float((rows * full + length * (layers - full)).sum()), total


class _Generations:
    """The policy of each generation of one session's pipeline, and what it counts: its model
    calls and the token-layers of one full call (for the calls parallel decoding saved)."""

    def __init__(self, session: Session, factory: Callable[[], Policy]) -> None:
        self.session, self.run, self.factory = session, session.run, factory
        self.policy: Policy | None = None
        self.calls = 0
        self.full_call = 0.0

    def new_policy(self, inner: Callable, *args: Any, **kwargs: Any) -> Policy:
        """A fresh policy for the generation that begins."""
        policy = self.factory()
        policy.kernels, policy.kernel_record = self.session.run.kernels, {}  # Stats start later
        if self.run.tracing:
            policy.tracer = self.run.trace
        self.policy, self.calls, self.full_call = policy, 0, 0.0
        return policy

    def step(self, call: Call) -> Any:
        """Run one model call; count its token-layers and the store's bytes."""
        run = self.run
        out = call.compute()
        plan: StepPlan = call.kwargs["plan"]
        ids = call.args[0]
        model = self.session.target.denoiser
        done, total = token_layers(plan, ids.shape[0], ids.shape[1], model.num_layers)
        run.record("token_layer", done, total)
        if run.tracing and plan.rows is not None:
            rows = plan.rows.cpu()
            counts = plan.real_rows(ids.shape[1]).tolist()
            full = None if plan.full_from is None else plan.full_from.tolist()
            call.explain(
                "partial", rows=[r[:n] for r, n in zip(rows, counts, strict=True)], full_from=full
            )
        self.calls, self.full_call = self.calls + 1, total
        store = None if self.policy is None else self.policy.store
        if store is not None:
            run.record_kv(store.nbytes())
        return out

    def end_run(self, inner: Callable, *args: Any, **kwargs: Any) -> Any:
        """Charge the plain generation's calls this one did not make; record the kernels."""
        run = self.run
        unmade = (run.num_steps or 0) - self.calls
        if unmade and self.calls:  # the total is the plain generation's calls: those saved by
            run.record("token_layer", 0.0, self.full_call * unmade)  # parallel decoding, or fewer
        if self.policy is not None and self.policy.kernel_record:
            run.stats.kernels.update(self.policy.kernel_record)
        return inner(*args, **kwargs)


def attach_policy(session: Session, name: str, factory: Callable[[], Policy]) -> None:
    """Install ``factory()`` as the policy of every generation of the session's pipeline,
    through the KV seam its adapter declares (``Adapter.kv``)."""
    adapter = session.target.adapter
    if adapter.kv is None:
        raise UnsupportedModelError(
            f"{name} needs a model with a KV store; {adapter.name} declares none (Adapter.kv)"
        )
    generations = _Generations(session, factory)
    pipe = session.target.pipe
    session.attach(pipe, adapter.kv.policy, f"diffcache.{name}", generations.new_policy)
    session.attach(pipe, "end_run", f"diffcache.{name}.calls", generations.end_run)
    session.on_step(generations.step)
