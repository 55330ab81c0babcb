"""Distil ``dit-digits-8step``: a student of ``dit-digits`` that samples in 8 or 4 DDIM steps.

    python -m diffcache.pipelines.digits_fewstep.train [--out DIR] [--steps-scale F] [--threads N]

Direct teacher-trajectory regression. The teacher (the committed dit-digits weights) samples
seeded noise for every class with classifier-free guidance 3.0 on a 40-step DDIM grid with
"trailing" spacing, which holds every step of the student's 8- and 4-step trailing grids. The
student (same architecture, initialised from the teacher) learns one DDIM step of each student
grid: from the teacher's latent at a grid timestep, its epsilon must land the DDIM update on the
teacher's latent at the next grid timestep (the final latent for the last step), conditional only
(guidance distilled in: it runs at guidance 1, one forward per step). Seeded noise, batch order and
single-threaded by default, so a run is deterministic on one machine. Writes ``model/`` (a diffusers
``DiTPipeline`` folder, fp16 weights, ``sha256.json``) and ``training.json`` (losses, times and the
classifier accuracy at each step count).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from diffcache.pipelines import digits
from diffcache.pipelines._training import mean_last, training_parser, write_summary
from diffcache.pipelines.digits.train import NULL_CLASS, fit
from diffcache.pipelines.digits_fewstep import STEPS, WEIGHTS

HERE = Path(__file__).parent
TEACHER_STEPS = 40
GUIDANCE = 3.0
FINAL = -1  # the key of the finished latent among the trajectory states


def scheduler(base: Any) -> Any:
    """The student's sampler: the teacher's DDIM scheduler with trailing timestep spacing."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(base.config, timestep_spacing="trailing")


def grid(sched: Any, steps: int) -> list[int]:
    sched.set_timesteps(steps)
    return [int(t) for t in sched.timesteps]


@torch.no_grad()
def trajectories(teacher: Any, n: int, seed: int) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """The teacher's guided DDIM latents at every timestep of its 40-step grid (and the final
    one, key ``FINAL``) for ``n`` seeded noises, classes 0-9 in turn; and the labels."""
    sched = scheduler(teacher.scheduler)
    dit = teacher.transformer
    labels = torch.arange(n) % 10
    x = torch.randn((n, 4, 8, 8), generator=torch.Generator().manual_seed(seed))
    both = torch.cat([labels, torch.full_like(labels, NULL_CLASS)])
    states = {}
    for t in grid(sched, TEACHER_STEPS):
        states[t] = x
        eps = torch.cat(
            [
                dit(chunk, timestep=torch.full((len(chunk),), t), class_labels=lab).sample
                for chunk, lab in zip(torch.cat([x, x]).split(1024), both.split(1024), strict=True)
            ]
        )
        cond, uncond = eps.chunk(2)
        x = sched.step(uncond + GUIDANCE * (cond - uncond), t, x).prev_sample
    states[FINAL] = x
    return states, labels


def transitions(sched: Any) -> list[tuple[int, int]]:
    """Every (timestep, next timestep) step of the student grids; ``FINAL`` after the last."""
    pairs = []
    for steps in STEPS:
        ts = grid(sched, steps)
        pairs += list(zip(ts, [*ts[1:], FINAL], strict=True))
    return pairs


def ddim_step(sched: Any, eps: torch.Tensor, x: torch.Tensor, t: torch.Tensor, nxt: torch.Tensor):
    """The deterministic DDIM update of ``x`` at timesteps ``t`` to ``nxt`` (per sample)."""
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    final = torch.as_tensor(sched.final_alpha_cumprod)
    a_next = torch.where(nxt >= 0, sched.alphas_cumprod[nxt.clamp(min=0)], final).view(-1, 1, 1, 1)
    x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    return a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps


def distil(teacher: Any, n: int = 512, steps: int = 1200, seed: int = 0) -> tuple[Any, list[float]]:
    """The student, initialised from the teacher, after ``steps`` batches of 64 transitions
    drawn from ``n`` teacher trajectories; the losses."""
    states, labels = trajectories(teacher, n, seed)
    sched = scheduler(teacher.scheduler)
    pairs = transitions(sched)
    t_of = torch.tensor([p[0] for p in pairs])
    next_of = torch.tensor([p[1] for p in pairs])
    student = type(teacher.transformer).from_config(teacher.transformer.config)
    student.load_state_dict(teacher.transformer.state_dict())

    def loss_of(idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        traj, k = idx // len(pairs), idx % len(pairs)
        t, nxt = t_of[k], next_of[k]
        x = torch.stack([states[int(a)][i] for a, i in zip(t, traj, strict=True)])
        target = torch.stack([states[int(b)][i] for b, i in zip(nxt, traj, strict=True)])
        eps = student(x, timestep=t, class_labels=labels[traj]).sample
        return F.mse_loss(ddim_step(sched, eps, x, t, nxt), target)

    return student, fit(student, loss_of, n * len(pairs), steps, 64, 2e-4, seed, "student")


def accuracy(pipe: Any, steps: int, guidance: float, seeds: int = 8) -> float:
    """The classifier's accuracy on classes 0-9 x seeds 0..``seeds``-1 (one call per sample)."""
    right = []
    for seed in range(seeds):
        for c in range(10):
            gen = torch.Generator("cpu").manual_seed(seed)
            image = pipe(
                class_labels=[c], num_inference_steps=steps, guidance_scale=guidance,
                generator=gen, output_type="np",
            ).images  # fmt: skip
            right.append(int(digits.classify(np.asarray(image))[0]) == c)
    return float(np.mean(right))


def main(argv: list[str] | None = None) -> None:
    from diffusers import DiTPipeline

    p = training_parser(__doc__, HERE, threads=1, steps_help="scale the training steps")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    teacher = digits.load()
    t0 = time.perf_counter()
    student, losses = distil(teacher, steps=int(1200 * args.steps_scale))
    train_s = time.perf_counter() - t0
    pipe = DiTPipeline(
        transformer=student.half(), vae=teacher.vae.half(), scheduler=scheduler(teacher.scheduler),
        id2label={i: str(i) for i in range(10)},
    )  # fmt: skip
    pipe.save_pretrained(out / "model")
    WEIGHTS.record(out / "model")
    from diffcache.pipelines.digits_fewstep import load

    saved = load(out)
    summary = {
        "loss_first_50": round(float(np.mean(losses[:50])), 5),
        "loss_last_50": mean_last(losses, 50),
        "train_s": round(train_s, 1),
        "threads": args.threads,
        **{f"accuracy_{s}_steps": accuracy(saved, s, 1.0) for s in STEPS},
    }
    write_summary(out, summary)


if __name__ == "__main__":
    main()
