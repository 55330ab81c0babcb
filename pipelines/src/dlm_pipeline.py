"""The decoding loop shared by our LLaDA and Dream pipelines.

A prompt (left-padded in a batch) is followed by ``gen_length`` mask tokens. The generated region
is decoded in semi-autoregressive blocks of ``block_length``; each step runs the model on the rows
the cache policy chose, scores the block's masked positions (the family's sampler) and commits
some of them (a fixed count per step, or a parallel-decoding rule). Committed tokens are never
re-masked. The policy (:class:`diffcache.kv.Policy`) comes from :meth:`cache_policy`, which
``diffcache.accelerate`` hooks to install a method; plain, every step recomputes every row. The
loop asks its policy for the decoding rule too (candidates, what to commit, when a block ends);
a policy without a rule of its own decodes by the request's (:class:`RequestRule`).

Batching: every decision is per row and positions are ``cumsum(attention_mask) - 1``, so a row of
a batch decodes as it would alone: the same tokens at temperature 0. With sampling (one generator
per row) the noise is the same, but a padded batch's matrix products round differently (float32
logits differ by ~1e-6), which can flip a near-tied sample.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from diffcache.adapter import KVSeam
from diffcache.errors import DiffCacheError
from diffcache.kv import DecodeState, KVStore, Policy, pad_rows, row_sets
from diffcache.kv.policy import Candidates
from diffcache.pipelines import dlm_loading
from diffcache.pipelines._events import DriverEvents
from diffcache.pipelines.sampling import rules

#: sampler settings that are non-negative numbers when given (None: the setting is off)
NON_NEGATIVE = ("temperature", "cfg_scale", "alg_temp", "threshold", "factor")

#: the generation length of a call that gives none
GEN_LENGTH = 128


def lengths(values: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    """``(gen_length, steps, block_length)`` of a request's values, with the call's defaults
    (one step per token, one block)."""
    gen_length = values.get("gen_length", GEN_LENGTH)
    return gen_length, values.get("steps", gen_length), values.get("block_length", gen_length)


def rule(
    problem: Callable[[int, int, int], str | None],
) -> Callable[[Mapping[str, Any]], str | None]:
    """An adapter's request rule from a ``(gen_length, steps, block_length)`` check."""
    return lambda values: problem(*lengths(values))


def block_problem(gen_length: int, steps: int, block_length: int) -> str | None:
    """The generation must split into whole blocks (``steps``: for one signature of rules)."""
    if gen_length % block_length:
        return f"gen_length {gen_length} is not a multiple of block_length {block_length}"
    return None


class RequestError(DiffCacheError, ValueError):
    """A generation request the pipeline cannot run (checked before any model call)."""


@dataclasses.dataclass
class TextOutput:
    """Generated texts, the full token ids and when each generated position was committed."""

    texts: list[str]
    tokens: torch.Tensor  # [B, P + G]
    prompt_len: int  # P (after left padding)
    committed_at: torch.Tensor  # [B, G] step of commitment; -1: never (left masked)
    steps: int  # steps (model calls) run
    generated: torch.Tensor  # [B] tokens generated up to and including the first EOS


P = TypeVar("P", bound="DiffusionLMPipeline")


class DiffusionLMPipeline(DriverEvents):
    """Base of :class:`LLaDAPipeline` and :class:`DreamPipeline`: the decoding loop; the family
    subclass scores candidates (:meth:`score`) and says how many to commit (:meth:`count`)."""

    #: The family's name in config.json detection and loading (``"llada"``, ``"dream"``).
    family: ClassVar[str]
    #: Default sampler settings of the family (call keywords override them).
    defaults: dict[str, Any] = {}

    def __init__(self, model: torch.nn.Module, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(
        cls: type[P],
        folder: str | Path,
        torch_dtype: torch.dtype = torch.float32,
        device: str = "cpu",
    ) -> P:
        """The pipeline of a model folder of this family (:func:`dlm_loading.load_dlm_folder`)."""
        model, tokenizer = dlm_loading.load_dlm_folder(folder, cls.family, torch_dtype, device)
        return cls(model, tokenizer)

    def cache_policy(self) -> Policy:
        """The caching policy of the next generation (plain: recompute every row)."""
        return Policy()

    # -- family hooks ------------------------------------------------------------------------
    def score(
        self,
        logits: torch.Tensor,
        settings: dict[str, Any],
        generator: Any,
        valid: torch.Tensor,
        backend: str,
        record: MutableMapping[str, str] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``[B, m]`` and confidences ``[B, m]`` for candidates' logits ``[B, m, V]``
        (``valid``: the real candidates, leading in each row; ``backend``: the cache policy's
        kernel backend, which may fuse the confidence statistics; ``record``: where the backend
        that ran is written)."""
        raise NotImplementedError

    def count(
        self, masks_left: torch.Tensor, start_masks: torch.Tensor, i: int, steps: int, s: dict
    ) -> torch.Tensor:
        """How many candidates each row commits at block step ``i`` of ``steps`` ``[B]``."""
        raise NotImplementedError

    def check_request(self, gen_length: int, steps: int, block_length: int) -> None:
        """Family rules on the step count (raise :class:`RequestError`)."""

    # -- tokenization ------------------------------------------------------------------------
    @property
    def max_length(self) -> int:
        return int(self.model.max_positions)

    def prompt_problem(self, text: str) -> str | None:
        """Why ``text`` cannot be a prompt of this model (characters its tokenizer cannot
        encode), or None; checked with the request, before any model call."""
        problem = getattr(self.tokenizer, "text_problem", None)
        return problem(text) if problem is not None else None

    def encode(self, prompts: Sequence[str], chat: bool | None) -> list[list[int]]:
        """Prompt token ids; with ``chat`` (default: when the tokenizer has a chat template) the
        prompt is wrapped as one user turn with the assistant turn opened."""
        template = getattr(self.tokenizer, "chat_template", None)
        use_chat = bool(template) if chat is None else chat
        out = []
        for text in prompts:
            if use_chat:
                if not template:
                    raise RequestError("chat=True but this tokenizer has no chat template")
                messages = [{"role": "user", "content": text}]
                ids = self.tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=True
                )
                ids = ids["input_ids"] if isinstance(ids, Mapping) else ids  # BatchEncoding
            else:
                ids = self.tokenizer.encode(text)
            out.append(list(ids))
        return out

    def decode(self, ids: torch.Tensor) -> str:
        return self.tokenizer.decode(ids.tolist(), skip_special_tokens=True)

    # -- the loop ----------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        gen_length: int = GEN_LENGTH,
        steps: int | None = None,
        block_length: int | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        chat: bool | None = None,
        **sampler: Any,
    ) -> TextOutput:
        """Generate ``gen_length`` tokens after each prompt in ``steps`` steps (default: one per
        token) in blocks of ``block_length`` (default: one block). Family sampler keywords
        (temperature, remasking, alg, threshold, factor ...) are listed in ``defaults``."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        steps = gen_length if steps is None else steps
        block_length = gen_length if block_length is None else block_length
        settings = self._settings(sampler)
        self._check(prompts, gen_length, steps, block_length)
        encoded = self.encode(prompts, chat)
        self._check_lengths(encoded, gen_length)
        policy = self.cache_policy()
        settings = policy.decoding(settings)
        return self._generate(encoded, gen_length, steps, block_length, settings, policy, generator)

    def _settings(self, given: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(given) - set(self.defaults))
        if unknown:
            raise RequestError(
                f"{type(self).__name__} takes no {', '.join(unknown)}; sampler settings: "
                f"{', '.join(self.defaults)}"
            )
        settings = {**self.defaults, **given}
        bad = [
            f"{key} must be a finite number >= 0, got {settings[key]!r}"
            for key in NON_NEGATIVE
            if key in settings
            and settings[key] is not None
            and not (
                isinstance(settings[key], (int, float))
                and not isinstance(settings[key], bool)
                and 0 <= settings[key] < math.inf
            )
        ]
        if bad:
            raise RequestError("; ".join(bad))
        return settings

    def _check(self, prompts: list[str], gen_length: int, steps: int, block_length: int) -> None:
        problems = []
        if not prompts:
            problems.append("no prompt given")
        empty = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
        if empty:
            problems.append(f"prompt(s) {empty} of the batch are empty")
        for name, value in (
            ("gen_length", gen_length),
            ("steps", steps),
            ("block_length", block_length),
        ):
            if not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be a positive whole number, got {value!r}")
        problems += [
            f"prompt {i} of the batch: {problem}"
            for i, p in enumerate(prompts)
            if i not in empty and (problem := self.prompt_problem(p))
        ]
        if not problems and block_problem(gen_length, steps, block_length):
            problems.append(block_problem(gen_length, steps, block_length))
        if problems:
            raise RequestError("; ".join(problems))
        self.check_request(gen_length, steps, block_length)

    def _check_lengths(self, encoded: list[list[int]], gen_length: int) -> None:
        longest = max(len(ids) for ids in encoded)
        if longest + gen_length > self.max_length:
            raise RequestError(
                f"prompt of {longest} tokens + gen_length {gen_length} exceeds the model's "
                f"context of {self.max_length} tokens; shorten the prompt or gen_length"
            )
        if any(not ids for ids in encoded):
            raise RequestError("a prompt encodes to no tokens")

    def _inputs(
        self, encoded: list[list[int]], gen_length: int
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Left-padded ids ``[B, P + G]``, the key mask (None without padding) and positions."""
        model, device = self.model, next(self.model.parameters()).device
        width = max(len(ids) for ids in encoded)
        pad = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0)
        rows, keep = [], []
        for ids in encoded:
            n = width - len(ids)
            rows.append([pad] * n + ids + [model.mask_id] * gen_length)
            keep.append([0] * n + [1] * (len(ids) + gen_length))
        ids = torch.tensor(rows, device=device)
        key = torch.tensor(keep, dtype=torch.bool, device=device)
        positions = (key.long().cumsum(1) - 1).clamp(min=0)
        return ids, (None if bool(key.all()) else key), positions

    def _generate(
        self,
        encoded: list[list[int]],
        gen_length: int,
        steps: int,
        block_length: int,
        s: dict[str, Any],
        policy: Policy,
        generator: Any,
    ) -> TextOutput:
        model = self.model
        ids, key_mask, positions = self._inputs(encoded, gen_length)
        batch, length = ids.shape
        prompt_len = length - gen_length
        cfg = float(s.get("cfg_scale") or 0.0)
        if (
            cfg
        ):  # unconditional rows: the same sequence with the prompt masked (after the real rows)
            key_mask = None if key_mask is None else torch.cat([key_mask, key_mask])
            positions = torch.cat([positions, positions])
        rows = 2 * batch if cfg else batch
        decoded_at = torch.full((rows, length), -2, dtype=torch.long, device=ids.device)
        decoded_at[:, :prompt_len] = -1
        state = DecodeState(
            ids=self._with_uncond(ids, prompt_len) if cfg else ids,
            mask_id=model.mask_id,
            prompt_len=prompt_len,
            logit_shift=model.logit_shift,
            num_layers=model.num_layers,
            decoded_at=decoded_at,
            generator=generator,
            # from a row's EOS on (a policy with an EOS rule sets it)
            dropped=torch.zeros(batch, length, dtype=torch.bool, device=ids.device),
            eos_id=self.tokenizer.eos_token_id,
            rule=RequestRule(self, s),
        )
        store = (
            KVStore.for_model(model, state.ids, policy.kernels, policy.kernel_record)
            if policy.uses_store
            else None
        )
        span = policy.block_length(gen_length, block_length)
        blocks = gen_length // span
        self.begin_run(steps, gen_length=gen_length, block_length=block_length)
        policy.start(state, store)
        try:
            for b in range(blocks):
                start = prompt_len + b * span
                state.block, state.block_step = (start, start + span), 0
                state.start_masks = self._masked(state, batch, *state.block).sum(1)
                state.block_steps = steps // blocks
                policy.block_start(state)
                while True:
                    masked = self._masked(state, batch, *state.block) & ~state.dropped
                    left = masked.sum(1)
                    if not bool(left.any()) or policy.block_done(state):
                        break
                    masked = policy.candidates(state, masked)
                    self._step(state, policy, masked, left, s, key_mask, positions, store, cfg)
        finally:
            self.end_run()
        out = state.ids[:batch]
        committed = state.decoded_at[:batch, prompt_len:].clamp(min=-1)
        texts = [self.decode(row[prompt_len:][row[prompt_len:] != model.mask_id]) for row in out]
        gen = out[:, prompt_len:]
        eos = gen == self.tokenizer.eos_token_id
        first = torch.where(eos.any(1), eos.long().argmax(1) + 1, gen.shape[1])
        self.last_output = TextOutput(texts, out, prompt_len, committed, state.step, first.cpu())
        return self.last_output

    @staticmethod
    def _until_done(s: dict[str, Any]) -> bool:
        """The request's parallel-decoding rule runs a block until it has no masks left."""
        return any(s.get(k) is not None for k in ("threshold", "factor"))

    def _masked(self, state: DecodeState, batch: int, start: int, end: int) -> torch.Tensor:
        """[B, L] masked positions of the real rows inside [start, end)."""
        masked = state.ids[:batch] == state.mask_id
        span = torch.zeros_like(masked)
        span[:, start:end] = True
        return masked & span

    def _with_uncond(self, ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
        un = ids.clone()
        un[:, :prompt_len] = self.model.mask_id
        return torch.cat([ids, un])

    def _step(
        self,
        state: DecodeState,
        policy: Policy,
        masked: torch.Tensor,
        left: torch.Tensor,
        s: dict[str, Any],
        key_mask: torch.Tensor | None,
        positions: torch.Tensor,
        store: KVStore | None,
        cfg: float,
    ) -> None:
        """One step: the model on the policy's rows, the family's scores of the ``masked``
        candidates ``[B, L]`` (real rows; ``left`` ``[B]`` masks left in the block), the
        policy's commit."""
        self.begin_step()
        batch = masked.shape[0]
        targets, counts = pad_rows(row_sets(masked))
        plan = policy.plan(state, torch.cat([targets, targets]) if cfg else targets)
        idle = (counts == 0).to(targets.device)
        plan.idle = torch.cat([idle, idle]) if cfg else idle
        logits = self.model(
            state.ids, key_mask, positions, plan=plan, store=store, policy=policy, step=state.step
        )
        if cfg:
            logits = self.mix_cfg(logits[:batch], logits[batch:], cfg)
        targets = plan.targets[:batch]  # a policy may narrow the candidates (d2Cache)
        valid = first_occurrence(targets) & masked.gather(1, targets)
        tokens, confidence = self.score(
            logits, s, state.generator, valid, policy.kernels, policy.kernel_record
        )
        # what policies read: every masked target (a policy may widen the targets beyond the
        # block, d2Cache at step 0), before the policy's decoding rule
        scored = first_occurrence(targets) & (state.ids[:batch].gather(1, targets) == state.mask_id)
        state.confidence = confidence.masked_fill(~scored, float("-inf"))
        confidence = confidence.masked_fill(~valid, float("-inf"))
        commit = policy.commit(state, Candidates(targets, valid, confidence, left))
        # padding repeats a position in ``targets``: write through the committed entries only
        row, col = (commit & valid).nonzero(as_tuple=True)
        position = targets[row, col]
        committed = torch.zeros_like(masked)
        committed[row, position] = True
        ids = state.ids[:batch].clone()
        ids[row, position] = tokens[row, col]
        step_committed = committed
        if cfg:
            state.ids[:batch], state.ids[batch:] = (
                ids,
                self._with_uncond(ids, state.prompt_len)[batch:],
            )
            step_committed = torch.cat([committed, committed])
        else:
            state.ids = ids
        state.decoded_at[step_committed] = state.step
        if policy.tracing:
            where = row_sets(committed)
            tokens = [row[w] for row, w in zip(ids, where, strict=True)]
            policy.trace("decode", "committed", positions=where, tokens=tokens)
        policy.step_end(state, plan, step_committed)
        state.step += 1
        state.block_step += 1

    def commit(
        self,
        confidence: torch.Tensor,
        valid: torch.Tensor,
        left: torch.Tensor,
        start_masks: torch.Tensor,
        per_block: int,
        i: int,
        s: dict[str, Any],
        generator: Any,
    ) -> torch.Tensor:
        """Which candidates to commit [B, m] by the request's rule: its parallel-decoding rule
        when one is set, else the family's count of the most confident."""
        parallel = rules.commit_parallel(confidence, valid, s.get("threshold"), s.get("factor"))
        if parallel is not None:
            return parallel
        k = self.count(left, start_masks, i, per_block, s).clamp(max=left)
        return rules.commit_topk(confidence, k)

    def mix_cfg(self, cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
        """Unsupervised classifier-free guidance (SMDM / LLaDA): un + (s + 1)(cond − un)."""
        return uncond + (scale + 1.0) * (cond - uncond)


@dataclasses.dataclass
class RequestRule:
    """The request's decoding rule (:class:`diffcache.kv.policy.DecodingRule`): its parallel
    rule (``threshold`` / ``factor``) until the block has no masks left, else the family's
    count of the most confident over the block's steps."""

    pipe: DiffusionLMPipeline
    settings: dict[str, Any]

    def commit(self, state: DecodeState, candidates: Candidates) -> torch.Tensor:
        c = candidates
        return self.pipe.commit(
            c.confidence,
            c.valid,
            c.left,
            state.start_masks,
            state.block_steps,
            state.block_step,
            self.settings,
            state.generator,
        )

    def block_done(self, state: DecodeState) -> bool:
        return not self.pipe._until_done(self.settings) and state.block_step >= state.block_steps


#: the KV seam of our text LMs (their adapters declare it): a position store, and each
#: generation's policy from :meth:`DiffusionLMPipeline.cache_policy`; a family adds what its
#: sampler offers policies (``semi_autoregressive``, ``random_remasking``)
KV_SEAM = KVSeam(policy=DiffusionLMPipeline.cache_policy.__name__)


def first_occurrence(targets: torch.Tensor) -> torch.Tensor:
    """[B, m] True where a target position appears for the first time in its row (padding of
    ragged sets repeats positions)."""
    m = targets.shape[1]
    index = torch.arange(m, device=targets.device).expand_as(targets)
    first = torch.full((targets.shape[0], int(targets.max()) + 1), m, device=targets.device)
    first.scatter_reduce_(1, targets, index, reduce="amin")
    return first.gather(1, targets) == index
