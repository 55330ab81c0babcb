"""Distil ``wan-shapes-8step``: a student of ``wan-shapes`` that samples in 8 Euler steps, no CFG.

    python -m diffcache.pipelines.shapes_fewstep.train [--out DIR] [--steps-scale F] [--threads N]

Direct teacher-trajectory regression. The teacher (the committed wan-shapes weights) integrates
its guided flow ODE (classifier-free guidance 4.0, the empty prompt as the unconditional one)
from seeded noise for every training caption, with Heun steps on a fine grid that holds every
point of the student's 8-step grid (``FlowMatchEulerDiscreteScheduler`` with wan-shapes' shift
2.0). The student (same architecture, initialised from the teacher; the text encoder stays the
teacher's) learns each Euler step of its grid: from the teacher's latent at a grid sigma, its
velocity must land the Euler update on the teacher's latent at the next grid sigma, MSE on the
latents; conditional only, so guidance is distilled in and a step is one forward (not two).
Seeded noise, weights and batch order, single-threaded by default, so a run is deterministic on one
machine. Writes ``model/`` (a ``WanPipeline`` folder holding the student transformer and its
scheduler; the autoencoder, text encoder and tokenizer are loaded from wan-shapes' folder) with
``sha256.json``, and ``training.json`` (losses, times and the checker's accuracy).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from diffcache.pipelines import shapes
from diffcache.pipelines._training import mean_last, training_parser, write_summary
from diffcache.pipelines.shapes import data
from diffcache.pipelines.shapes.train import (
    FLOW_SHIFT,
    encode_text,
    fit,
    use_padded_cross_attention,
    use_stock_attention,
)
from diffcache.pipelines.shapes_fewstep import SHARED, STEPS, WEIGHTS

HERE = Path(__file__).parent
GUIDANCE = 4.0
#: Heun steps of the teacher between two neighbouring points of the student's grid
SUBSTEPS = 2
#: every caption of the training distribution (colour x shape x direction)
CAPTIONS = tuple(
    data.prompt(c, s, d)
    for c in range(len(data.COLOURS))
    for s in range(len(data.SHAPES))
    for d in range(len(data.DIRECTIONS))
)
#: the seed of the trajectories' noise: apart from the evaluation seeds (0-4 per clip)
NOISE_SEED = 5_000_000
LATENT_SHAPE = (8, 3, 8, 8)  # wan-shapes' latents of 9 frames of 32x32


def scheduler() -> Any:
    """The student's sampler: flow-matching Euler with the teacher's shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=FLOW_SHIFT)


def grid(steps: int = STEPS) -> torch.Tensor:
    """The student's sigmas: the ``steps`` it samples at and the final 0."""
    sched = scheduler()
    sched.set_timesteps(steps)
    return sched.sigmas.clone()


class Denoiser:
    """The transformer on the frozen teacher text embeddings of ``CAPTIONS`` plus the empty
    prompt, with the short padded cross-attention (equal to WanPipeline's 512-token one)."""

    def __init__(self, pipe: Any, transformer: Any) -> None:
        self.transformer = transformer
        self.processors = use_padded_cross_attention(transformer)
        with torch.no_grad():
            self.hidden, self.bias = encode_text(pipe.tokenizer, pipe.text_encoder, [*CAPTIONS, ""])

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """The predicted velocity (noise - x0) at per-sample ``sigma`` for caption indices
        ``prompt`` (``len(CAPTIONS)`` is the empty prompt)."""
        for proc in self.processors:
            proc.bias = self.bias[prompt]
        t = (sigma * 1000).expand(len(x))
        return self.transformer(
            x, timestep=t, encoder_hidden_states=self.hidden[prompt], return_dict=False
        )[0]


@torch.no_grad()
def trajectories(
    teacher: Any, n: int, seed: int = NOISE_SEED, batch: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's guided latents (N, STEPS + 1, *LATENT_SHAPE) at every sigma of the student's
    grid for ``n`` seeded noises, captions in turn; and the caption indices."""
    model = Denoiser(teacher, teacher.transformer)
    prompts = torch.arange(n) % len(CAPTIONS)
    noise = torch.randn((n, *LATENT_SHAPE), generator=torch.Generator().manual_seed(seed))
    sigmas = grid()
    states = []
    for x, p in zip(noise.split(batch), prompts.split(batch), strict=True):
        empty = torch.full_like(p, len(CAPTIONS))

        def velocity(x: torch.Tensor, s: torch.Tensor, p=p, empty=empty) -> torch.Tensor:
            cond, uncond = model(torch.cat([x, x]), s, torch.cat([p, empty])).chunk(2)
            return uncond + GUIDANCE * (cond - uncond)

        path = [x]
        for a, b in zip(sigmas[:-1], sigmas[1:], strict=True):
            fine = torch.linspace(float(a), float(b), SUBSTEPS + 1)
            for s, s_next in zip(fine[:-1], fine[1:], strict=True):
                v = velocity(x, s)
                guess = x + (s_next - s) * v
                x = guess if s_next == 0 else x + (s_next - s) * (v + velocity(guess, s_next)) / 2
            path.append(x)
        states.append(torch.stack(path, 1))
    use_stock_attention(teacher.transformer)
    return torch.cat(states), prompts


def distil(
    teacher: Any, n: int = 1536, steps: int = 2000, seed: int = 0, batch: int = 64
) -> tuple[Any, list[float]]:
    """The student, initialised from the teacher, after ``steps`` batches of ``batch``
    transitions drawn from ``n`` teacher trajectories; the losses."""
    states, prompts = trajectories(teacher, n)
    sigmas = grid()
    torch.manual_seed(seed)
    student = type(teacher.transformer).from_config(teacher.transformer.config)
    student.load_state_dict(teacher.transformer.state_dict())
    student.train()
    model = Denoiser(teacher, student)

    def loss_of(i: int, gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, n * STEPS, (batch,), generator=gen)
        traj, k = idx // STEPS, idx % STEPS
        x, target = states[traj, k], states[traj, k + 1]
        s, s_next = sigmas[k], sigmas[k + 1]
        v = model(x, s, prompts[traj])
        return F.mse_loss(x + (s_next - s).view(-1, 1, 1, 1, 1) * v, target)

    losses = fit(student.parameters(), loss_of, steps, 5e-4, seed, "student")
    use_stock_attention(student)
    return student.eval().requires_grad_(False), losses


def save(out: Path, teacher: Any, student: Any) -> None:
    """``out/model``: a WanPipeline folder with the student transformer (fp32) and scheduler
    (the shared parts are left out: ``load`` takes them from wan-shapes), and its sha256."""
    from diffusers import WanPipeline

    folder = out / "model"
    pipe = WanPipeline(
        transformer=student, scheduler=scheduler(), **{k: getattr(teacher, k) for k in SHARED}
    )
    pipe.save_pretrained(folder)
    for name in SHARED:
        shutil.rmtree(folder / name)
    WEIGHTS.record(folder)


def accuracy(pipe: Any, seeds: int = 5) -> float:
    """The checker's accuracy on wan-shapes' 16 prompts x seeds 0..``seeds``-1 at the
    student's defaults (8 steps, guidance 1), one call per clip."""
    right = []
    for seed in range(seeds):
        for prompt in shapes.PROMPTS:
            video = pipe(
                prompt=prompt, height=data.SIZE, width=data.SIZE, num_frames=data.FRAMES,
                num_inference_steps=STEPS, guidance_scale=1.0, output_type="np",
                generator=torch.Generator("cpu").manual_seed(seed),
            ).frames[0]  # fmt: skip
            right.append(shapes.score(prompt, video))
    return float(np.mean(right))


def main(argv: list[str] | None = None) -> None:
    p = training_parser(__doc__, HERE, threads=1, steps_help="scale the training steps")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    teacher = shapes.load()
    t0 = time.perf_counter()
    student, losses = distil(teacher, steps=int(2000 * args.steps_scale))
    train_s = time.perf_counter() - t0
    save(out, teacher, student)
    from diffcache.pipelines.shapes_fewstep import load

    summary = {
        "loss_first_50": round(float(np.mean(losses[:50])), 5),
        "loss_last_50": mean_last(losses, 50),
        "train_s": round(train_s, 1),
        "threads": args.threads,
        "steps_scale": args.steps_scale,
        f"accuracy_{STEPS}_steps": accuracy(load(out)),
    }
    write_summary(out, summary)


if __name__ == "__main__":
    main()
