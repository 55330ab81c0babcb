"""How a text-diffusion caching method attaches to our pipelines.

A method's ``apply`` hands :func:`attach_policy` a factory of its :class:`Policy`; the pipeline's
``cache_policy`` is wrapped (instance-level, undone by ``remove``) to return it, and every model
call is counted in token-layers (rows recomputed at each layer, per batch row), with the store's
bytes as KV memory.

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


def attach_policy(session: Session, name: str, factory: Callable[[], Policy]) -> None:
    """Install ``factory()`` as the policy of every generation of the session's pipeline."""
    pipe, run = session.target.pipe, session.run
    current: list[Policy] = []
    calls = [0, 0.0]  # model calls of this generation, token-layers of one full call

    def cache_policy(inner: Callable, *args: Any, **kwargs: Any) -> Policy:
        policy = factory()
        policy.kernels, policy.kernel_record = session.kernels, {}  # the run's Stats start later
        if run.tracing:
            policy.tracer = run.trace
        current[:] = [policy]
        calls[:] = [0, 0.0]
        return policy

    def step(call: Call) -> Any:
        out = call.compute()
        plan: StepPlan = call.kwargs["plan"]
        ids = call.args[0]
        model = session.target.denoiser
        done, total = token_layers(plan, ids.shape[0], ids.shape[1], model.num_layers)
        run.record("token_layer", done, total)
        if run.tracing and plan.rows is not None:
            rows = plan.rows.cpu()
            counts = plan.real_rows(ids.shape[1]).tolist()
            full = None if plan.full_from is None else plan.full_from.tolist()
            call.explain(
                "partial", rows=[r[:n] for r, n in zip(rows, counts, strict=True)], full_from=full
            )
        calls[:] = [calls[0] + 1, total]
        store = current[0].store if current else None
        if store is not None:
            run.record_kv(store.nbytes())
        return out

    def end_run(inner: Callable, *args: Any, **kwargs: Any) -> Any:
        unmade = (run.num_steps or 0) - calls[0]
        if unmade and calls[0]:  # the total is the plain generation's calls: those saved by
            run.record("token_layer", 0.0, calls[1] * unmade)  # parallel decoding, or fewer
        if current and current[0].kernel_record:
            run.stats.kernels.update(current[0].kernel_record)
        return inner(*args, **kwargs)

    session.attach(pipe, "cache_policy", f"diffcache.{name}", cache_policy)
    session.attach(pipe, "end_run", f"diffcache.{name}.calls", end_run)
    session.on_step(step)
