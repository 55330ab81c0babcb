"""``torch.compile`` and diffcache: where our hooks sit on compiled modules.

Compile first, then ``accelerate`` (README, "Using with torch.compile"):

- ``pipe.transformer = torch.compile(pipe.transformer)``: the pipeline holds torch's wrapper
  (``OptimizedModule``); diffcache sees the model through it (:func:`unwrap`) and hooks the
  wrapper's compiled ``forward`` from outside, so a step method decides eagerly and the steps it
  computes run the compiled graph (no graph break).
- ``module.compile()`` / diffusers' ``compile_repeated_blocks``: a ``forward`` hook goes on the
  module's compiled call (:data:`SLOT`), outside its graph, for the same result per block.
- So: step methods (EasyCache, ERTACache) under either; block methods (HyCa) with the blocks
  compiled on their own; module methods (InvarDiff) with the cached modules compiled on their
  own. No graph break in any of these.
- Every hook runs under ``torch.compiler.disable`` once torch's compiler is loaded
  (:func:`runner`): a graph that still reaches one breaks there instead of tracing our
  decisions, which read Python step counters (guards: a recompile per step).

Compiling a hooked module afterwards would trace our hooks into its graph: the session refuses
it at the next call (:func:`check_not_compiled_after`); block and module sites that a compiled
graph would hold are refused at ``accelerate`` (:func:`check_site`).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

from diffcache.errors import RunError, UnsupportedModelError

SLOT = "_compiled_call_impl"  # where nn.Module.compile() keeps the compiled call


def unwrap(module: Any) -> Any:
    """The module that ``torch.compile(module)`` wrapped (its ``OptimizedModule`` forwards
    attributes, but its own class and ``forward`` signature are torch's), else ``module``."""
    if type(module).__name__ != "OptimizedModule":
        return module
    return getattr(module, "_orig_mod", module)


def compiled_in_place(obj: Any) -> bool:
    """``obj.compile()`` ran on this module (diffusers' ``compile_repeated_blocks`` calls it)."""
    return getattr(obj, "__dict__", {}).get(SLOT) is not None


def check_site(expert: Any, block: Any, name: str, kind: str) -> None:
    """Refuse a ``block`` or ``module`` site (``block`` at ``name``, or a module inside it)
    that a compiled graph would hold: every block of a transformer compiled whole, and the
    modules inside a block compiled on its own. Our hook would break that graph in the middle,
    and torch would then give up the whole graph for the rest of the process (``remove`` could
    not bring it back)."""
    if kind == "module" and compiled_in_place(block):
        held = "inside a block compiled on its own (compile_repeated_blocks or .compile())"
    elif unwrap(expert) is not expert:
        held = "inside a transformer compiled whole (torch.compile)"
    else:
        return
    fix = {
        "block": "compile its blocks on their own instead "
        "(transformer.compile_repeated_blocks(fullgraph=True), or .compile() on each block)",
        "module": "compile the modules it caches on their own instead "
        "(.compile() on each block's attention and feed-forward modules)",
    }[kind]
    raise UnsupportedModelError(f"{name}: {kind} caching {held} would break its graph; {fix}")


def check_not_compiled_after(attachments: list[Any], run: Any) -> None:
    """Raise (detaching everything, ``run.fail``) if a module hooked outside its compiled call
    was compiled in place since: its graph would now trace our hook."""
    late = next((a.obj for a in attachments if a.slot != SLOT and compiled_in_place(a.obj)), None)
    if late is not None:
        raise run.fail(
            RunError(
                f"{type(late).__name__} was compiled after accelerate ({run.where()}); "
                "diffcache detached itself: compile first, then call diffcache.accelerate()."
            )
        )


def _call(hook: Callable[..., Any], inner: Callable, *args: Any, **kwargs: Any) -> Any:
    return hook(inner, *args, **kwargs)


def runner() -> Callable[..., Any]:
    """How a hook layer calls its hook: kept out of compiled graphs once torch's compiler is
    loaded (``torch.compile`` loads it; a process without it has no graph to keep out of, and
    does not pay for loading it)."""
    return _disabled_call() if "torch._dynamo" in sys.modules else _call


@functools.cache
def _disabled_call() -> Callable[..., Any]:
    import torch

    return torch.compiler.disable(_call, reason="diffcache decides outside compiled graphs")
