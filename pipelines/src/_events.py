"""The events our own pipelines (text LMs, VAR, Infinity) send the ``pipeline`` driver: plain
they do nothing; ``accelerate`` wraps an instance's to tell its run where runs and steps are."""

from __future__ import annotations

from typing import Any


class DriverEvents:
    """Base of a pipeline driven by its own events (``Adapter.driver == "pipeline"``): its
    generation loop calls :meth:`begin_run`, :meth:`begin_step` each step and :meth:`end_run`."""

    def begin_run(self, num_steps: int | None, **facts: Any) -> None:
        """A generation of ``num_steps`` steps (scales) starts; ``facts`` are checked against
        plans."""

    def begin_step(self) -> None:
        """The next step (scale) starts."""

    def end_run(self) -> None:
        """The generation is over."""
