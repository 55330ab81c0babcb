"""Toy pipelines of our own, driven by the ``pipeline`` driver, and toy KV methods for them.

``ToyTextPipeline`` is a masked-diffusion text LM: a prompt plus ``gen_length`` mask tokens, and at
each of ``steps`` steps the most confident masked positions are committed (argmax, no sampling).
``ToyScalePipeline`` is a next-scale model: scales of side 1, 2, 4; each scale attends over the
K/V history of the earlier scales, which every layer appends to through ``layer.keep(k, v)``.

Both share one attention block whose forward is built from ``qkv``, ``attend`` and ``finish``, so
a method that recomputes only some rows through the same sub-functions is bit-exact when the rows
are all of them. Toy methods (registered on import): ``toy_kv`` (text: recompute chosen rows per
layer, reuse the rest) and ``toy_budget`` (next-scale: keep only the last ``budget`` history
tokens per layer).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from diffcache.adapter import Adapter, Capabilities
from diffcache.methods.base import MethodConfig, option
from diffcache.pipelines._tiny import seeded
from diffcache.registry import adapters, register_adapter, register_method
from diffcache.request import Field
from diffcache.session import Call, Session
from diffcache.sites import Stack

VOCAB, WIDTH, HEADS, MAX_LEN = 16, 8, 2, 64
MASK_ID = 0
LETTERS = "_abcdefghijklmno"  # token id -> character; id 0 is the mask token
SIDES = (1, 2, 4)  # next-scale sides: 1, 4 and 16 tokens
START_CLASSES = 4  # start tokens of the next-scale toy, picked by the prompt

TEXT = Adapter(
    name="toy-text",
    pipelines=("ToyTextPipeline",),
    denoisers=("ToyTextModel",),
    experts=("model",),
    driver="pipeline",
    cfg="none",
    stacks=(Stack("layers"),),
    media="text",
    provides=Capabilities(("step", "block", "attention"), denoiser="masked-token"),
    output="texts",
    seed_arg="generator",
    fields=(
        Field("prompt", str, "what to generate", "prompt", required=True, input=True),
        Field("gen_length", int, "tokens to generate", "gen_length", min=1),
        Field("steps", int, "denoising steps", "steps", min=1, max=1000),
    ),
    valid_for={"gen_length": int},
)

SCALE = Adapter(
    name="toy-scale",
    pipelines=("ToyScalePipeline",),
    denoisers=("ToyScaleModel",),
    experts=("model",),
    driver="pipeline",
    cfg="none",
    stacks=(Stack("layers"),),
    media="image",
    provides=Capabilities(("step", "block", "attention"), "history", "next-scale"),
    output="scales",
    seed_arg="generator",
    fields=(Field("prompt", str, "what to generate", "prompt", required=True, input=True),),
)

for _adapter in (TEXT, SCALE):
    if _adapter.name not in adapters():
        register_adapter(_adapter)


def nbytes(*tensors: torch.Tensor) -> int:
    """Bytes held by these tensors' elements."""
    return sum(t.nelement() * t.element_size() for t in tensors)


# ----------------------------------------------------------------------------- shared block
class ToyAttentionBlock(nn.Module):
    """Pre-norm attention + feed-forward, split into the sub-functions methods reuse."""

    def __init__(self, width: int = WIDTH, heads: int = HEADS) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.to_qkv = nn.Linear(width, 3 * width)
        self.to_out = nn.Linear(width, width)
        self.ff = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def qkv(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of rows ``h`` (B, n, W), each contiguous (B, n, W)."""
        q, k, v = self.to_qkv(self.norm1(h)).chunk(3, dim=-1)
        return q.contiguous(), k.contiguous(), v.contiguous()

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Non-causal attention of queries (B, n, W) over keys and values (B, m, W)."""

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        qh, kh, vh = split(q), split(k), split(v)
        weights = (qh @ kh.transpose(-1, -2) * qh.shape[-1] ** -0.5).softmax(dim=-1)
        return (weights @ vh).transpose(1, 2).flatten(2)

    def finish(self, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The block's output rows from its input rows and their attention rows."""
        h = h + self.to_out(attn)
        return h + self.ff(self.norm2(h))


# ----------------------------------------------------------------------------- text toy
class ToyTextLayer(ToyAttentionBlock):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(h)
        return self.finish(h, self.attend(q, k, v))


class ToyTextModel(nn.Module):
    """Token ids (B, L) -> logits (B, L, VOCAB), non-causal."""

    def __init__(self, layers: int = 2) -> None:
        super().__init__()
        self.mask_id = MASK_ID
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.pos = nn.Embedding(MAX_LEN, WIDTH)
        self.layers = nn.ModuleList(ToyTextLayer() for _ in range(layers))
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids) + self.pos(torch.arange(input_ids.shape[1]))
        for layer in self.layers:
            h = layer(h)
        return self.head(self.norm(h))


@dataclasses.dataclass
class TextOutput:
    texts: list[str]
    tokens: torch.Tensor  # (1, P + G): prompt and generated ids
    logits: torch.Tensor  # (steps, 1, P + G, VOCAB): the model's logits at every step
    committed_at: torch.Tensor  # (G,): the step each generated position was committed at


def tokenize(prompt: str) -> torch.Tensor:
    """Characters -> ids 1..VOCAB-1 (never the mask id)."""
    return torch.tensor([1 + ord(c) % (VOCAB - 1) for c in prompt], dtype=torch.long)


class ToyTextPipeline:
    """Masked-diffusion decoding: every step commits the most confident masked positions."""

    def __init__(self, model: ToyTextModel) -> None:
        self.model = model

    # driver events (the ``pipeline`` driver listens here; plain, they do nothing)
    def begin_run(self, num_steps: int, **facts: Any) -> None:
        """A generation of ``num_steps`` steps starts; ``facts`` are checked against plans."""

    def begin_step(self) -> None:
        """The next step starts."""

    def end_run(self) -> None:
        """The generation is over."""

    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        gen_length: int = 8,
        steps: int = 4,
        generator: torch.Generator | None = None,
    ) -> TextOutput:
        model, prompt_ids = self.model, tokenize(prompt)
        n = len(prompt_ids)
        if n + gen_length > MAX_LEN:
            raise ValueError(f"prompt + gen_length must be <= {MAX_LEN}, got {n + gen_length}")
        ids = torch.cat([prompt_ids, torch.full((gen_length,), model.mask_id)])[None]
        committed_at = torch.full((gen_length,), -1)
        all_logits = []
        self.begin_run(steps, gen_length=gen_length)
        for step in range(steps):
            self.begin_step()
            logits = model(ids)
            all_logits.append(logits)
            masked = ids[0] == model.mask_id
            count = gen_length // steps + int(step < gen_length % steps)
            no_mask = logits[0].index_fill(-1, torch.tensor([model.mask_id]), float("-inf"))
            confidence, tokens = no_mask.softmax(dim=-1).max(dim=-1)
            confidence = confidence.masked_fill(~masked, -1.0)
            pick = torch.argsort(confidence, descending=True, stable=True)[:count]
            ids[0, pick] = tokens[pick]
            committed_at[pick - n] = step
        self.end_run()
        text = "".join(LETTERS[i] for i in ids[0, n:].tolist())
        return TextOutput([text], ids, torch.stack(all_logits), committed_at)


def toy_text_pipeline(layers: int = 2, seed: int = 0) -> ToyTextPipeline:
    with seeded(seed):
        return ToyTextPipeline(ToyTextModel(layers).eval())


# ----------------------------------------------------------------------------- next-scale toy
class ToyScaleLayer(ToyAttentionBlock):
    """Attends over the K/V history of the earlier scales plus its own scale's."""

    def __init__(self) -> None:
        super().__init__()
        self.past: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(h)
        keys, values = k, v
        if self.past is not None:
            keys, values = torch.cat([self.past[0], k], 1), torch.cat([self.past[1], v], 1)
        out = self.finish(h, self.attend(q, keys, values))
        self.keep(k, v)
        return out

    def keep(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append this scale's keys and values to the history (all of them, by default)."""
        if self.past is None:
            self.past = (k, v)
        else:
            self.past = (torch.cat([self.past[0], k], 1), torch.cat([self.past[1], v], 1))

    def held_bytes(self) -> int:
        return nbytes(*self.past) if self.past is not None else 0

    def reset(self) -> None:
        self.past = None


class ToyScaleModel(nn.Module):
    """One scale's tokens (B, n, W) -> its output tokens (B, n, W)."""

    def __init__(self, layers: int = 2) -> None:
        super().__init__()
        self.start = nn.Embedding(START_CLASSES, WIDTH)
        self.scale_pos = nn.Embedding(len(SIDES), WIDTH)
        self.layers = nn.ModuleList(ToyScaleLayer() for _ in range(layers))
        self.head = nn.Linear(WIDTH, WIDTH)

    def forward(self, hidden_states: torch.Tensor, scale: int) -> torch.Tensor:
        h = hidden_states + self.scale_pos.weight[scale]
        for layer in self.layers:
            h = layer(h)
        return self.head(h)

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()


@dataclasses.dataclass
class ScaleOutput:
    scales: list[torch.Tensor]  # per scale (1, side * side, W)


def upsample(tokens: torch.Tensor, side: int, new_side: int) -> torch.Tensor:
    """(B, side², W) tokens -> (B, new_side², W), nearest neighbour on the square grid."""
    grid = tokens.transpose(1, 2).unflatten(-1, (side, side))
    grid = F.interpolate(grid, size=(new_side, new_side), mode="nearest")
    return grid.flatten(2).transpose(1, 2)


class ToyScalePipeline:
    """Next-scale generation: each scale starts from the upsampled output of the last one."""

    def __init__(self, model: ToyScaleModel) -> None:
        self.model = model

    def begin_run(self, num_steps: int, **facts: Any) -> None:
        """A generation of ``num_steps`` scales starts."""

    def begin_step(self) -> None:
        """The next scale starts."""

    def end_run(self) -> None:
        """The generation is over."""

    @torch.no_grad()
    def __call__(self, prompt: str = "", generator: torch.Generator | None = None) -> ScaleOutput:
        model = self.model
        model.reset()
        x = model.start.weight[sum(map(ord, prompt)) % START_CLASSES].view(1, 1, WIDTH)
        outs: list[torch.Tensor] = []
        self.begin_run(len(SIDES))
        for s, side in enumerate(SIDES):
            self.begin_step()
            if s:
                x = upsample(outs[-1], SIDES[s - 1], side)
            outs.append(model(x, s))
        self.end_run()
        model.reset()
        return ScaleOutput(outs)


def toy_scale_pipeline(layers: int = 2, seed: int = 0) -> ToyScalePipeline:
    with seeded(seed):
        return ToyScalePipeline(ToyScaleModel(layers).eval())


# ----------------------------------------------------------------------------- toy_kv
#: When a list, ``toy_kv`` appends (step, layer index, rows recomputed) to it (for tests).
ROW_TRACE: list[tuple[int, int, tuple[int, ...]]] | None = None


@dataclasses.dataclass(frozen=True)
class ToyKVConfig(MethodConfig):
    """Per layer, recompute only rows R (their q, k, v, stored K/V rows, attention over the full
    store, output rows) and reuse the other rows' last output. R is every row on steps divisible
    by ``refresh_every``, else the rows masked at this step's start or committed at the last."""

    name: ClassVar[str] = "toy_kv"
    granularity: ClassVar[str] = "kv"
    kind: ClassVar[str] = "token_layer"
    needs: ClassVar[Capabilities] = Capabilities(("block", "attention"), denoiser="masked-token")
    refresh_every: int = option(4, "recompute every row on steps divisible by this", min=1)

    @classmethod
    def identity(cls) -> ToyKVConfig:
        return cls(refresh_every=1)

    @classmethod
    def aggressive(cls) -> ToyKVConfig:
        return cls(refresh_every=1000)


@dataclasses.dataclass
class _Rows:
    """Per run, shared by the layers: last step's mask, this step's rows, bytes per layer."""

    masked: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    held: dict[int, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _LayerKV:
    """Per run and layer: stored K, V by absolute position, and the last output rows."""

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    out: torch.Tensor | None = None


@register_method(ToyKVConfig)
def _apply_kv(session: Session, cfg: ToyKVConfig) -> None:
    run, mask_id = session.run, session.target.denoiser.mask_id

    def rows_state() -> _Rows:
        return run.slot("toy_kv.rows", _Rows)

    def step(call: Call) -> Any:
        ids = call.arg("input_ids", 0)
        st = rows_state()
        masked = (ids == mask_id).any(dim=0)
        if call.step % cfg.refresh_every == 0 or st.masked is None:
            st.rows = torch.arange(ids.shape[1])
        else:
            committed = st.masked & ~masked
            st.rows = (masked | committed).nonzero().flatten()
        st.masked = masked
        return call.compute()

    def layer(call: Call) -> torch.Tensor:
        block: ToyTextLayer = call.site.module
        h = call.arg("h", 0)
        rows, kv = rows_state().rows, call.state(_LayerKV)
        if kv.out is None:
            kv.k, kv.v, kv.out = h.new_zeros(h.shape), h.new_zeros(h.shape), h.new_zeros(h.shape)
        h_rows = h.index_select(1, rows)
        q, k, v = block.qkv(h_rows)
        kv.k.index_copy_(1, rows, k)
        kv.v.index_copy_(1, rows, v)
        kv.out = kv.out.index_copy(1, rows, block.finish(h_rows, block.attend(q, kv.k, kv.v)))
        batch, length, n = h.shape[0], h.shape[1], rows.numel()
        call.computed = n == length  # the whole block ran
        run.record("token_layer", n * batch, length * batch)
        held = rows_state().held
        held[call.site.index] = nbytes(kv.k, kv.v)
        run.record_kv(sum(held.values()))
        if ROW_TRACE is not None:
            ROW_TRACE.append((call.step, call.site.index, tuple(rows.tolist())))
        return kv.out

    session.on_step(step)
    session.on_sites(session.target.sites("block"), layer, "toy_kv")


# ----------------------------------------------------------------------------- toy_budget
@dataclasses.dataclass(frozen=True)
class ToyBudgetConfig(MethodConfig):
    """After each scale, every layer keeps only the last ``budget`` tokens of its K/V history."""

    name: ClassVar[str] = "toy_budget"
    granularity: ClassVar[str] = "kv"
    kind: ClassVar[str] = "scale"
    needs: ClassVar[Capabilities] = Capabilities(("block",), "history")
    budget: int = option(8, "history tokens each layer keeps", min=1)

    @classmethod
    def identity(cls) -> ToyBudgetConfig:
        return cls(budget=1_000_000)

    @classmethod
    def aggressive(cls) -> ToyBudgetConfig:
        return cls(budget=1)


@register_method(ToyBudgetConfig)
def _apply_budget(session: Session, cfg: ToyBudgetConfig) -> None:
    layers: list[ToyScaleLayer] = [s.module for s in session.target.sites("block")]

    def trim(layer: ToyScaleLayer) -> Any:
        def keep(call_next: Any, k: torch.Tensor, v: torch.Tensor) -> None:
            call_next(k, v)
            keys, values = layer.past
            if keys.shape[1] > cfg.budget:
                layer.past = (keys[:, -cfg.budget :].clone(), values[:, -cfg.budget :].clone())

        return keep

    def scale(call: Call) -> Any:
        out = call.compute()
        call.run.record("scale", 1, 1)
        call.run.record_kv(sum(layer.held_bytes() for layer in layers))
        return out

    for layer in layers:
        session.attach(layer, "keep", f"diffcache.{cfg.name}", trim(layer))
    session.on_step(scale)
