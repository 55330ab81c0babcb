"""How a text-diffusion caching method attaches to our pipelines.

A method's ``apply`` hands :func:`attach_policy` a factory of its :class:`Policy`; the pipeline's
``cache_policy`` is wrapped (instance-level, undone by ``remove``) to return it, and every model
call is counted in token-layers: rows recomputed at each layer over all rows at all layers, per
batch row (``compute_fraction`` of the DLM methods), with the store's bytes as KV memory.
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

    def cache_policy(inner: Callable, *args: Any, **kwargs: Any) -> Policy:
        current[:] = [factory()]
        return current[0]

    def step(call: Call) -> Any:
        out = call.compute()
        plan: StepPlan = call.kwargs["plan"]
        ids = call.args[0]
        model = session.target.denoiser
        run.record("token_layer", *token_layers(plan, ids.shape[0], ids.shape[1], model.num_layers))
        store = current[0].store if current else None
        if store is not None:
            run.record_kv(store.nbytes())
        return out

    session.attach(pipe, "cache_policy", f"diffcache.{name}", cache_policy)
    session.on_step(step)
