"""The profiling observer of the next-scale KV calibrators (HACK, ScaleKV).

:class:`HistoryRecorder` wraps the pipeline's history seam (``Adapter.kv.policy``) for the
plain calibration runs, so every layer's attention at every scale is seen with its queries and
the whole key set they attend (the history, then the new map), exactly as the plain model's
``FullHistory`` uses them. A calibrator hands it ``statistic(call, q, k)``, which returns the
``[L, ...]`` sums it adds up (or None to skip the call); outputs stay bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from diffcache.kv.history import History, ScaleCall
from diffcache.kv.history_method import history_seam
from diffcache.session import Session

#: ``statistic(call, q, k)``: the values to add to the running sum at ``call.layer`` (None: none)
Statistic = Callable[[ScaleCall, torch.Tensor, torch.Tensor], torch.Tensor | None]


class HistoryRecorder:
    """Profiling observer (``methods.base.Observer``) on the history seam: ``statistic`` of
    each layer's ``(q, k)`` at each scale, summed per layer over the calibration runs."""

    kinds: tuple[str, ...] = ()  # no denoiser sites: it sees the history seam instead

    def __init__(self, name: str, statistic: Statistic) -> None:
        self.name, self.statistic = name, statistic
        self.sums: dict[int, torch.Tensor] = {}
        self.calls = 0  # the (layer, scale) attentions seen

    def attach(self, session: Session) -> None:
        """Wrap the pipeline's history seam for this profiling session (undone by its close)."""
        seam = history_seam(session, self.name)
        hook = lambda inner, *a, **kw: _Observed(inner(*a, **kw), self)  # noqa: E731
        session.attach(session.target.pipe, seam, f"diffcache.{self.name}.profile", hook)

    def see(self, call: Any, output: Any) -> None:  # no sites of its own
        pass

    def end_request(self) -> None:
        pass

    def add(self, call: ScaleCall, q: torch.Tensor, k: torch.Tensor) -> None:
        self.calls += 1
        value = self.statistic(call, q, k)
        if value is not None:
            value = value.detach().to("cpu", torch.float64)
            self.sums[call.layer] = self.sums.get(call.layer, 0) + value

    def result(self) -> dict[str, torch.Tensor]:
        """``sums``: the per-layer sums stacked ``[L, ...]`` (nothing if no call was seen)."""
        if not self.sums:
            return {}
        return {"sums": torch.stack([self.sums[layer] for layer in sorted(self.sums)])}


class _Observed:
    """A generation's history store, watched: each call's q and the keys it attends are handed
    to the recorder, then the store answers as it would."""

    def __init__(self, inner: History, recorder: HistoryRecorder) -> None:
        self.inner, self.recorder = inner, recorder
        self.keys: dict[int, torch.Tensor] = {}

    def attend(
        self, call: ScaleCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        before = self.keys.get(call.layer)
        keys = k if before is None else torch.cat((before, k), dim=2)
        self.keys[call.layer] = keys
        self.recorder.add(call, q, keys)
        return self.inner.attend(call, q, k, v)

    def nbytes(self) -> int:
        return self.inner.nbytes()

    def history_nbytes(self) -> int:
        return self.inner.history_nbytes()

    def peak_nbytes(self) -> int:
        return self.inner.peak_nbytes()
