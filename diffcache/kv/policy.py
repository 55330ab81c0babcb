"""What a text-diffusion step recomputes and commits: the decoding state, the step plan, and the
policy interface every DLM caching method implements (research/dlm.md §6.1).

Each step the pipeline asks its policy for a :class:`StepPlan`: the positions whose hidden states
are recomputed (their K/V rows are written to the :class:`~diffcache.kv.store.KVStore`), the
positions whose logits the sampler needs, and optionally a layer from which every position is
recomputed. It also asks the policy for the decoding rule: which masks are candidates, which of
the scored :class:`Candidates` to commit, and when a block ends. The base policy decodes by the
request's own rule (:class:`DecodingRule`, the pipeline's); a method with a rule of its own
(Fast-dLLM's threshold, Elastic-Cache's window, d²Cache's prior) overrides those hooks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, MutableMapping
from typing import Any, Protocol

import torch

from diffcache.kv.store import KVStore


@dataclasses.dataclass
class DecodeState:
    """The generation as policies see it. Positions are absolute indices into ``ids``."""

    ids: torch.Tensor  # [B, L] prompt (left-padded) + generated region
    mask_id: int
    prompt_len: int  # P: the generated region is [P, L)
    logit_shift: int  # Dream: the hidden state at p-1 gives the logits of p
    num_layers: int
    decoded_at: torch.Tensor  # [B, L] step each position was committed (-1: prompt; masks: -2)
    block: tuple[int, int] = (0, 0)  # current block [start, end)
    step: int = 0  # steps run so far in the generation
    block_step: int = 0  # steps run so far in the current block
    # [B, m] last step's confidence at plan.targets before the decoding prior (-inf: not a mask)
    confidence: torch.Tensor | None = None
    block_steps: int = 0  # steps per block (fixed-count samplers)
    start_masks: torch.Tensor | None = None  # [B] masks in the block when it started
    generator: Any = None  # the generation's generator(s), for policies that draw
    dropped: torch.Tensor | None = None  # [B, L] out of decoding: from a row's EOS on (real rows)
    eos_id: int | None = None  # the tokenizer's end-of-sequence token
    rule: DecodingRule | None = None  # the request's decoding rule (set by the pipeline)

    @property
    def masked(self) -> torch.Tensor:
        return self.ids == self.mask_id

    @property
    def length(self) -> int:
        return self.ids.shape[1]

    def decoded_before(self, step: int) -> torch.Tensor:
        """[B, L] positions that were already decoded when ``step`` began (prompt included)."""
        return (self.decoded_at >= -1) & (self.decoded_at < step)


@dataclasses.dataclass
class Candidates:
    """One step's scored candidates of the real batch rows, as a decoding rule sees them."""

    targets: torch.Tensor  # [B, m] their positions (padding repeats one)
    valid: torch.Tensor  # [B, m] the masks among them that may be committed (first occurrences)
    confidence: torch.Tensor  # [B, m] the sampler's confidence, -inf where not valid
    left: torch.Tensor  # [B] masks left in the block, candidates or not


class DecodingRule(Protocol):
    """The request's decoding rule (the family's sampler with the request's settings): what a
    policy without a rule of its own decodes by."""

    def commit(self, state: DecodeState, candidates: Candidates) -> torch.Tensor:
        """Which candidates this step commits ``[B, m]``."""
        ...

    def block_done(self, state: DecodeState) -> bool:
        """The block ends before its masks run out (a fixed step count spent)."""
        ...


@dataclasses.dataclass
class StepPlan:
    """One step's work. ``rows`` ``[B, n]`` are recomputed (None: every position); a ragged set
    is padded at its end by repeating its first position (:func:`pad_rows`; a row computed twice
    writes the same K/V), and ``counts`` ``[B]`` says how many are real: the engine then runs
    the position-wise work on the real ones only. ``targets`` ``[B, m]`` are the
    positions whose logits are returned, in that order. ``full_from`` ``[B]`` is set by the
    engine when a policy asks a batch row to recompute every position from some layer on (from
    the stored layer inputs: Elastic-Cache's depth refresh); None: no row did. ``idle`` ``[B]``
    marks batch rows with no candidate left this step (their targets are padding, their logits
    unused: the pipeline sets it)."""

    rows: torch.Tensor | None
    targets: torch.Tensor
    counts: torch.Tensor | None = None
    full_from: torch.Tensor | None = None
    idle: torch.Tensor | None = None

    def real_rows(self, length: int) -> torch.Tensor:
        """[B] recomputed positions per batch row (padding excluded)."""
        if self.rows is None:
            return torch.full((self.targets.shape[0],), length)
        if self.counts is None:
            return torch.full((self.rows.shape[0],), self.rows.shape[1])
        return self.counts


class Policy:
    """Caching policy of a text-diffusion generation; the base class recomputes everything
    (no cache). Hooks are called by the pipeline in this order: ``start`` once, then per block
    ``block_start``, and per step ``block_done`` -> ``candidates`` -> ``plan`` -> the model
    forward -> ``commit`` -> ``step_end``. The decoding rule (``block_length``, ``block_done``,
    ``candidates``, ``commit``) is the request's unless a method overrides it."""

    name = "none"
    uses_store = False
    kernels = "torch"  # kernel backend of the store and the sampler (a plan's ``kernels:``)
    kernel_record: MutableMapping[str, str] | None = None  # where they note the backend that ran
    tracer: Callable[..., None] | None = None  # the run's trace while tracing (attach_policy)

    @property
    def tracing(self) -> bool:
        return self.tracer is not None

    def trace(self, site: str, action: str, **values: Any) -> None:
        """Keep one decision in the run's trace (``RunState.trace``); a no-op unless tracing."""
        if self.tracer is not None:
            self.tracer(site, action, **values)

    def __init__(self) -> None:
        self.store: KVStore | None = None
        self.hidden: list[torch.Tensor] | None = (
            None  # per-layer inputs, for policies that keep them
        )

    def decoding(self, settings: dict[str, Any]) -> dict[str, Any]:
        """The sampler settings this policy runs with (a method that needs the sampler to
        score or count in its own way, e.g. dKV-Cache-Greedy's random remasking, changes
        them here)."""
        return settings

    def block_length(self, gen_length: int, block_length: int) -> int:
        """The length of the blocks the generation is decoded in (the request's)."""
        return block_length

    def block_done(self, state: DecodeState) -> bool:
        """The current block ends now although it has masks left (the request's rule: its
        step count is spent). A block always ends when it has no masks left."""
        return state.rule.block_done(state)

    def candidates(self, state: DecodeState, masked: torch.Tensor) -> torch.Tensor:
        """[B, L] the masks this step may commit, among the block's ``masked`` ones."""
        return masked

    def commit(self, state: DecodeState, candidates: Candidates) -> torch.Tensor:
        """Which ``candidates`` this step commits ``[B, m]`` (the request's rule)."""
        return state.rule.commit(state, candidates)

    def start(self, state: DecodeState, store: KVStore | None) -> None:
        self.store = store

    def block_start(self, state: DecodeState) -> None:
        """A new semi-autoregressive block begins (``state.block``)."""

    def plan(self, state: DecodeState, targets: torch.Tensor) -> StepPlan:
        """Rows to recompute for logits at ``targets`` ``[B, m]``."""
        return StepPlan(rows=None, targets=targets)

    def step_end(self, state: DecodeState, plan: StepPlan, committed: torch.Tensor) -> None:
        """The step committed tokens at ``committed`` ``[B, L]`` (already in ``state.ids``)."""

    def layer_end(self, layer: int, view: LayerView) -> torch.Tensor | bool:
        """Called after each layer's attention when ``wants_layers``: which batch rows
        (``[B]`` bool, or one bool for all) recompute every position from layer ``layer + 1``
        on."""
        return False

    wants_layers = False  # layer_end is called
    keeps_inputs = False  # the engine keeps every layer's inputs in ``hidden``


@dataclasses.dataclass
class LayerView:
    """What a policy may read after one layer's attention (Elastic-Cache, d2Cache)."""

    layer: int
    rows: torch.Tensor | None  # [B, n] positions recomputed at this layer (None: all)
    q: torch.Tensor  # [B, H, n, hd] post-RoPE queries of those rows
    k: torch.Tensor  # [B, H_kv, L, hd] the layer's keys after this step's write
    old_k: torch.Tensor | None  # [B, H_kv, n, hd] the rows' keys before the write (None: unknown)
    scale: float
    full: torch.Tensor  # [B] batch rows already recomputing every position at this layer
    key_mask: torch.Tensor | None = None  # [B, L] False at padding keys (None: no padding)

    def probs(self, q: torch.Tensor, previous: bool = False) -> torch.Tensor:
        """fp32 attention probabilities ``[B, H, n, L]`` of queries ``[B, H, n, hd]`` over this
        layer's keys, padding keys masked, GQA heads shared. ``previous``: over the keys as they
        were before this step's write (the recomputed rows' scores from ``old_k``)."""
        scores = self._scores(q, self.k)
        if previous:
            n, rows = q.shape[2], self.rows
            index = rows[:, None, None, :].expand(-1, scores.shape[1], n, -1)
            scores.scatter_(-1, index, self._scores(q, self.old_k))
        if self.key_mask is not None:
            scores = scores.masked_fill(~self.key_mask[:, None, None, :], float("-inf"))
        return scores.softmax(-1)

    def _scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        groups = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(groups, dim=1) if groups > 1 else k
        return (q.float() @ k.float().transpose(-1, -2)) * self.scale


def pad_rows(sets: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged per-row position sets -> ``[B, n]`` padded by repeating each row's first position
    (an empty set gets position 0), and the real counts ``[B]``."""
    n = max(max((len(s) for s in sets), default=0), 1)
    out = []
    for s in sets:
        fill = s[:1] if len(s) else torch.zeros(1, dtype=torch.long, device=s.device)
        out.append(torch.cat([s, fill.expand(n - len(s))]))
    counts = torch.tensor([len(s) for s in sets])
    return torch.stack(out), counts


def row_sets(mask: torch.Tensor) -> list[torch.Tensor]:
    """[B, L] bool -> per row, the sorted positions where it is True."""
    return [m.nonzero().flatten() for m in mask]


def union_rows(
    mask: torch.Tensor, targets: torch.Tensor, shift: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions set in ``mask`` [B, L] plus the logit sources of ``targets`` (p - shift, at
    least 0), as padded rows and counts."""
    need = mask.clone()
    src = (targets - shift).clamp(min=0)
    need.scatter_(1, src, True)
    return pad_rows(row_sets(need))
