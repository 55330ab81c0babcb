"""Train ``llada-arith``: a small LLaDA-architecture masked diffusion LM on the synthetic tasks.

    python -m diffcache.pipelines.arith.train [--out DIR] [--steps N] [--extend-steps N]
                                                [--lr F] [--threads N]

Objective: LLaDA's SFT loss. A sequence is the prompt, then the generated region: the answer,
then EOS to the end. The prompt is never masked; each sequence draws t in (eps, 1] (stratified
over the batch) and masks every generated-region token with probability t; the loss is the
cross-entropy on the masked tokens weighted 1/t, divided by 16 per sequence. Sequences are packed
into rows of 128 tokens with block-diagonal attention and positions from 0 per sequence, which is
exactly each sequence alone (as the pipeline decodes it) without the padding. Fresh examples every
step, the four task types in turn (the held-out prompts never appear, ``data.is_held_out``);
AdamW with warm-up and cosine decay.

Two phases. The first trains a fresh model on 16-token regions (``--steps``; these are the
weights of the first llada-arith release, byte for byte). The second goes on from them with
regions of 16, 32 and 64 tokens drawn per example (``data.REGIONS``, ``--extend-steps``, a lower
learning rate and another data seed), so the model answers at every generation length a user
asks for and fills the rest with EOS, as LLaDA's SFT pads with EOS. One phase on mixed lengths
from scratch learned the addition carries too late (48% after 4,500 steps): the carries are
learned in a sudden drop of the loss, and the EOS fill delayed it past the schedule. LLaDA
divides each sequence's loss by its region length; the constant 16 keeps an answer token's weight
the same at every length.

Everything is seeded (data stream, initial weights, masks), so a run at one thread count is
deterministic on one machine. Writes ``model/`` (``model.safetensors`` in the upstream LLaDA
tensor names, ``config.json``, ``char_tokenizer.json`` and ``sha256.json``) and
``training.json`` (losses, held-out accuracy per task at the default request and at
generation lengths 32 and 64, times).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import math
import os
import random
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffcache.pipelines._training import mean_last, write_summary
from diffcache.pipelines.arith import data
from diffcache.pipelines.dlm_tokenizer import CharTokenizer
from diffcache.pipelines.llada.model import LLaDAConfig, LLaDAModelLM

HERE = Path(__file__).parent
MODULE = "diffcache.pipelines.arith.train"
EPS = 1e-3
#: special ids right after the 96 characters (newline and printable ASCII at ids 0..95)
SPECIALS = {"eos": 96, "pad": 96, "eot": 97, "mask": 98, "bos": 99}
VOCAB = 128
CONFIG: dict[str, Any] = dict(
    d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, mlp_hidden_size=384, vocab_size=VOCAB,
    embedding_size=VOCAB, max_sequence_length=128, rope_theta=10000.0, rms_norm_eps=1e-5,
    mask_token_id=SPECIALS["mask"], eos_token_id=SPECIALS["eos"], pad_token_id=SPECIALS["pad"],
    eot_token_id=SPECIALS["eot"],
)  # fmt: skip
ROW = 128  # packed row length
STEPS, BATCH, LR, WARMUP = 3000, 96, 2e-3, 150
#: the second phase: every region length of ``data.REGIONS``, from the first phase's weights
EXTEND_STEPS, EXTEND_LR, EXTEND_SEED = 1500, 1e-3, 1


def tokenizer() -> CharTokenizer:
    """The character tokenizer of ``llada-arith``."""
    return CharTokenizer(SPECIALS, vocab_size=VOCAB)


def build_model(seed: int = 0, **overrides: Any) -> LLaDAModelLM:
    """A freshly initialised model: every matrix (embeddings included) N(0, 1/fan_in), norms 1.
    (GPT-2's N(0, 0.02²) is far too small at this width: the attention stays uniform for
    hundreds of steps and the tasks that need exact positions are not learned in time.)"""
    config = LLaDAConfig(**{**CONFIG, **overrides})
    gen = torch.Generator().manual_seed(seed)
    model = LLaDAModelLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[1] ** -0.5)
    return model


@dataclasses.dataclass
class Packed:
    """Training sequences packed into rows of ``ROW`` tokens: each sequence (prompt, answer, EOS
    fill) attends only to itself and has its own positions from 0, exactly as when alone."""

    ids: torch.Tensor  # [R, ROW]
    segment: torch.Tensor  # [R, ROW] the sequence of each slot; -1: padding
    positions: torch.Tensor  # [R, ROW]
    region: torch.Tensor  # [T] flat indices (into R * ROW) of every generated-region token
    owner: torch.Tensor  # [T] the sequence of each of them
    lengths: torch.Tensor  # [N] the generated-region length of each sequence

    @property
    def attention(self) -> torch.Tensor:
        """Block-diagonal bool mask ``[R, 1, ROW, ROW]`` (padding attends to padding)."""
        return (self.segment[:, :, None] == self.segment[:, None, :])[:, None]


def pack(tok: CharTokenizer, batch: Sequence[tuple[data.Example, int]], row: int = ROW) -> Packed:
    """First-fit-decreasing packing of ``batch`` (examples with their generated-region lengths,
    in a fixed order) into rows of ``row``."""
    seqs = []
    for ex, length in batch:
        answer = tok.encode(ex.answer)
        seqs.append(tok.encode(ex.prompt) + answer + [SPECIALS["eos"]] * (length - len(answer)))
    rows: list[list[int]] = []  # the sequence indices of each row
    used: list[int] = []
    for i in sorted(range(len(seqs)), key=lambda i: (-len(seqs[i]), i)):
        n = len(seqs[i])
        r = next((r for r, u in enumerate(used) if u + n <= row), None)
        if r is None:
            rows.append([])
            used.append(0)
            r = len(rows) - 1
        rows[r].append(i)
        used[r] += n
    ids = torch.full((len(rows), row), SPECIALS["pad"])
    segment = torch.full((len(rows), row), -1)
    positions = torch.zeros((len(rows), row), dtype=torch.long)
    lengths = torch.tensor([length for _, length in batch])
    region = [torch.empty(0, dtype=torch.long)] * len(seqs)
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            n = len(seqs[i])
            ids[r, at : at + n] = torch.tensor(seqs[i])
            segment[r, at : at + n] = i
            positions[r, at : at + n] = torch.arange(n)
            region[i] = r * row + at + n - lengths[i] + torch.arange(lengths[i])
            at += n
    owner = torch.arange(len(seqs)).repeat_interleave(lengths)
    return Packed(ids, segment, positions, torch.cat(region), owner, lengths)


def sft_loss(model: LLaDAModelLM, packed: Packed, gen: torch.Generator) -> torch.Tensor:
    """LLaDA's SFT loss of packed sequences: t per sequence, stratified over the batch
    (t_i = eps + (1 - eps)(pi_i + u) / N for a random permutation pi, one u ~ U(0, 1)), each
    generated-region token masked with probability t, masked cross-entropy weighted 1/t, summed
    and divided by N * 16 (the default region length, whatever each region's length)."""
    n = packed.lengths.shape[0]
    strata = torch.randperm(n, generator=gen).float()
    t = (EPS + (1 - EPS) * (strata + torch.rand(1, generator=gen)) / n)[packed.owner]
    masked = torch.rand(t.shape, generator=gen) < t
    flat = packed.ids.flatten()
    targets = flat[packed.region]
    noisy = flat.clone()
    noisy[packed.region[masked]] = model.mask_id
    h = model.embed(noisy.view_as(packed.ids))
    cos, sin = model.rope(packed.positions)
    mask = packed.attention
    for layer in model.blocks():
        h = layer(h, cos, sin, mask)
    logits = model.head(h.flatten(0, 1)[packed.region])
    # classes on axis 1 of a [1, V, T] view: the memory layout of the first release's [N, V, 16]
    # call, so that phase 1 still writes its weights byte for byte
    ce = F.cross_entropy(logits.T[None], targets[None], reduction="none")[0]
    return (ce * masked / t).sum() / (n * data.GEN_LENGTH)


def batches(
    seed: int, size: int, regions: dict[int, int]
) -> Iterator[list[tuple[data.Example, int]]]:
    """Batches of fresh training examples, each with a generated-region length drawn from
    ``regions`` (length: weight) by its own seeded stream (independent of the task type)."""
    stream = data.examples(seed)
    rng = random.Random(seed + 1)
    lengths, weights = zip(*regions.items(), strict=True)
    while True:
        chosen = rng.choices(lengths, weights, k=size)
        yield list(zip(itertools.islice(stream, size), chosen, strict=True))


def train(
    steps: int = STEPS,
    batch: int = BATCH,
    lr: float = LR,
    seed: int = 0,
    log_every: int = 100,
    regions: dict[int, int] | None = None,
    model: LLaDAModelLM | None = None,
    **overrides: Any,
) -> tuple[LLaDAModelLM, list[float]]:
    """The trained model (eval mode) and the loss of every step: ``model`` (default: a fresh
    one) trained on regions of ``regions`` (default: 16 tokens only)."""
    tok = tokenizer()
    model = build_model(seed, **overrides) if model is None else model
    decay = [p for p in model.parameters() if p.dim() > 1]
    rest = [p for p in model.parameters() if p.dim() == 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
    )
    warmup = min(WARMUP, max(1, steps // 10))

    def factor(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    gen = torch.Generator().manual_seed(seed)
    model.train().requires_grad_(True)
    losses: list[float] = []
    t0 = time.perf_counter()
    stream = batches(seed, batch, regions or {data.GEN_LENGTH: 1})
    for i, examples in zip(range(steps), stream, strict=False):
        loss = sft_loss(model, pack(tok, examples), gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log_every and ((i + 1) % log_every == 0 or i + 1 == steps):
            recent = losses[-log_every:]
            print(
                f"step {i + 1}/{steps}  loss {sum(recent) / len(recent):.4f}  "
                f"lr {sched.get_last_lr()[0]:.2e}  {time.perf_counter() - t0:.0f}s",
                flush=True,
            )
    return model.eval().requires_grad_(False), losses


def accuracy(
    pipe: Any, tasks: Sequence[data.Example], batch: int = 50, request: dict | None = None
) -> dict[str, float]:
    """Exact-match accuracy per task type and ``overall`` at ``request`` (default: the
    default request)."""
    from diffcache.pipelines.arith import DEFAULTS, score

    right: dict[str, list[bool]] = {}
    for i in range(0, len(tasks), batch):
        chunk = tasks[i : i + batch]
        texts = pipe([ex.prompt for ex in chunk], **(request or DEFAULTS)).texts
        for ex, text in zip(chunk, texts, strict=True):
            right.setdefault(ex.task, []).append(score(ex.prompt, text))
    out = {task: sum(r) / len(r) for task, r in right.items()}
    every = [x for r in right.values() for x in r]
    return {**out, "overall": sum(every) / len(every)}


def save(model: LLaDAModelLM, folder: Path) -> None:
    """``model.safetensors`` (fp32, the model's own upstream names), config.json,
    char_tokenizer.json and sha256.json."""
    from safetensors.torch import save_file

    from diffcache.pipelines.arith import WEIGHTS

    folder.mkdir(parents=True, exist_ok=True)
    save_file(_state(model), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    tokenizer().save(folder)
    WEIGHTS.record(folder)


def _passive_openmp() -> None:
    """Re-run this command once with ``OMP_WAIT_POLICY=PASSIVE`` unless it is set: libgomp reads
    it when torch loads, and its default spin-waiting makes a step several times slower when
    another process shares the two cores (the results are the same either way)."""
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, "-m", MODULE, *sys.argv[1:]])


def main(argv: list[str] | None = None) -> None:
    if argv is None:
        _passive_openmp()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(HERE))
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--extend-steps", type=int, default=EXTEND_STEPS)
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    t0 = time.perf_counter()
    model, losses = train(args.steps, args.batch, args.lr)
    first_sha = _sha256(model)
    model, extended = train(
        args.extend_steps, args.batch, EXTEND_LR, EXTEND_SEED, regions=data.REGIONS, model=model
    )
    train_s = time.perf_counter() - t0
    save(model, out / "model")
    from diffcache.pipelines.arith import LONG, load

    t1 = time.perf_counter()
    pipe, tasks = load(out), data.held_out_tasks()
    scores = accuracy(pipe, tasks)
    longer = {n: accuracy(pipe, tasks, request=request) for n, request in LONG.items()}
    summary = {
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "first_phase_sha256": first_sha,
        "extend_steps": args.extend_steps,
        "extend_lr": EXTEND_LR,
        "regions": data.REGIONS,
        "threads": args.threads,
        "final_loss": mean_last(extended, 100),
        "first_phase_final_loss": mean_last(losses, 100),
        "held_out_accuracy": {k: round(v, 4) for k, v in scores.items()},
        "held_out_accuracy_at_gen_length": {
            n: {k: round(v, 4) for k, v in s.items()} for n, s in longer.items()
        },
        "train_s": round(train_s, 1),
        "eval_s": round(time.perf_counter() - t1, 1),
        "losses_every_100": _every_100(losses),
        "extend_losses_every_100": _every_100(extended),
    }
    write_summary(out, summary, {k: v for k, v in summary.items() if "every_100" not in k})


def _sha256(model: LLaDAModelLM) -> str:
    """The sha256 of ``model``'s weights as ``save`` writes them."""
    from safetensors.torch import save

    return hashlib.sha256(save(_state(model))).hexdigest()


def _state(model: LLaDAModelLM) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def _every_100(losses: list[float]) -> list[float]:
    return [round(sum(losses[i : i + 100]) / 100, 4) for i in range(0, len(losses) - 99, 100)]


if __name__ == "__main__":
    main()
