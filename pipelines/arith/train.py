"""Train ``llada-arith``: a small LLaDA-architecture masked diffusion LM on the synthetic tasks.

    python -m diffcache.pipelines.arith.train [--out DIR] [--steps N] [--lr F] [--threads N]

Objective: LLaDA's SFT loss. A sequence is the prompt, then the generated region of
``GEN_LENGTH`` tokens (the answer, then EOS to the end). The prompt is never masked; each sequence
draws t in (eps, 1] (stratified over the batch) and masks every generated-region token with
probability t; the loss is the cross-entropy on the masked tokens weighted 1/t, divided by the
region length. Sequences are packed into rows of 128 tokens with block-diagonal attention and
positions from 0 per sequence, which is exactly each sequence alone (as the pipeline decodes it)
without the padding. Fresh examples every step, the four task types in turn (the held-out prompts
never appear, ``data.is_held_out``); AdamW with warm-up and cosine decay.

Everything is seeded (data stream, initial weights, masks), so a run at one thread count is
deterministic on one machine. Writes ``model/`` (``model.safetensors`` in the upstream LLaDA
tensor names, ``config.json``, ``char_tokenizer.json`` and ``sha256.json``) and
``training.json`` (losses, held-out accuracy per task, times).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffcache.pipelines.arith import data
from diffcache.pipelines.dlm_tokenizer import CharTokenizer
from diffcache.pipelines.llada.model import LLaDAConfig, LLaDAModelLM

HERE = Path(__file__).parent
MODULE = "diffcache.pipelines.arith.train"
G = data.GEN_LENGTH
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
    region: torch.Tensor  # [N, G] flat indices (into R * ROW) of each generated region

    @property
    def attention(self) -> torch.Tensor:
        """Block-diagonal bool mask ``[R, 1, ROW, ROW]`` (padding attends to padding)."""
        return (self.segment[:, :, None] == self.segment[:, None, :])[:, None]


def pack(tok: CharTokenizer, batch: Sequence[data.Example], row: int = ROW) -> Packed:
    """First-fit-decreasing packing of ``batch`` (in a fixed order) into rows of ``row``."""
    seqs = []
    for ex in batch:
        answer = tok.encode(ex.answer)
        seqs.append(tok.encode(ex.prompt) + answer + [SPECIALS["eos"]] * (G - len(answer)))
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
    region = torch.zeros((len(seqs), G), dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            n = len(seqs[i])
            ids[r, at : at + n] = torch.tensor(seqs[i])
            segment[r, at : at + n] = i
            positions[r, at : at + n] = torch.arange(n)
            region[i] = r * row + at + n - G + torch.arange(G)
            at += n
    return Packed(ids, segment, positions, region)


def sft_loss(model: LLaDAModelLM, packed: Packed, gen: torch.Generator) -> torch.Tensor:
    """LLaDA's SFT loss of packed sequences: t per sequence, stratified over the batch
    (t_i = eps + (1 - eps)(pi_i + u) / N for a random permutation pi, one u ~ U(0, 1)), each
    generated-region token masked with probability t, masked cross-entropy weighted 1/t, summed
    and divided by N * G."""
    n = packed.region.shape[0]
    strata = torch.randperm(n, generator=gen).float()
    t = (EPS + (1 - EPS) * (strata + torch.rand(1, generator=gen)) / n)[:, None]
    masked = torch.rand(n, G, generator=gen) < t
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
    ce = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return ((ce * masked) / t).sum() / (n * G)


def batches(seed: int, size: int) -> Iterator[list[data.Example]]:
    stream = data.examples(seed)
    while True:
        yield list(itertools.islice(stream, size))


def train(
    steps: int = STEPS,
    batch: int = BATCH,
    lr: float = LR,
    seed: int = 0,
    log_every: int = 100,
    **overrides: Any,
) -> tuple[LLaDAModelLM, list[float]]:
    """The trained model (eval mode) and the loss of every step."""
    tok = tokenizer()
    model = build_model(seed, **overrides)
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
    model.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    for i, examples in zip(range(steps), batches(seed, batch), strict=False):
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


def accuracy(pipe: Any, tasks: Sequence[data.Example], batch: int = 50) -> dict[str, float]:
    """Exact-match accuracy per task type and ``overall`` at the default request."""
    from diffcache.pipelines.arith import DEFAULTS, score

    right: dict[str, list[bool]] = {}
    for i in range(0, len(tasks), batch):
        chunk = tasks[i : i + batch]
        texts = pipe([ex.prompt for ex in chunk], **DEFAULTS).texts
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
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
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
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    t0 = time.perf_counter()
    model, losses = train(args.steps, args.batch, args.lr)
    train_s = time.perf_counter() - t0
    save(model, out / "model")
    from diffcache.pipelines.arith import load

    t1 = time.perf_counter()
    scores = accuracy(load(out), data.held_out_tasks())
    summary = {
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "threads": args.threads,
        "final_loss": round(sum(losses[-100:]) / len(losses[-100:]), 5),
        "held_out_accuracy": {k: round(v, 4) for k, v in scores.items()},
        "train_s": round(train_s, 1),
        "eval_s": round(time.perf_counter() - t1, 1),
        "losses_every_100": [
            round(sum(losses[i : i + 100]) / 100, 4) for i in range(0, len(losses) - 99, 100)
        ],
    }
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "losses_every_100"}, indent=2))


if __name__ == "__main__":
    main()
