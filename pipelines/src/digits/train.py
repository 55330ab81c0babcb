"""Train ``dit-digits``: a small autoencoder, a class-conditional DiT and a digit classifier.

    python -m diffcache.pipelines.digits.train [--out DIR] [--steps-scale F] [--threads N]

Data: scikit-learn's bundled 8x8 digits (1,797 images, offline), upsampled to 32x32 grey RGB in
[-1, 1]; a fixed split keeps 297 images out of every training for the classifier's held-out
accuracy. Everything is seeded and the batch order comes from seeded generators, so a run is
deterministic on one machine. Writes a diffusers ``DiTPipeline`` folder (``model/``: fp16
weights and ``sha256.json``, their checksums), ``classifier.safetensors`` and ``training.json``
(losses, accuracy, times).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffcache.pipelines._training import mean_last, training_parser, write_summary
from diffcache.pipelines.digits import WEIGHTS
from diffcache.pipelines.digits.classifier import classifier_net

HERE = Path(__file__).parent
SIZE = 32
NULL_CLASS = 1000  # DiTPipeline's hard-coded unconditional class id
HELD_OUT = 297
BETAS = {"beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All digits as (N, 3, 32, 32) in [-1, 1] and their labels, in a fixed shuffled order."""
    x, y = _digits()
    return x.clone(), y.clone()


@functools.cache
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    x = (x * 2 - 1).clamp(-1, 1).repeat(1, 3, 1, 1)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[order], torch.tensor(data.target)[order]


def vae_model() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=SIZE,
    )


def dit_model() -> Any:
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_attention_heads=4,
        attention_head_dim=32,
        in_channels=4,
        out_channels=4,
        num_layers=4,
        norm_num_groups=8,
        sample_size=SIZE // 4,
        patch_size=2,
        num_embeds_ada_norm=NULL_CLASS,
    )


def fit(
    model: nn.Module,
    loss_of: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
    n: int,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    desc: str,
) -> list[float]:
    """AdamW over ``steps`` seeded mini-batches of indices into ``n`` items; the losses."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc=desc, disable=steps < 50, leave=False):
        idx = torch.randint(0, n, (batch,), generator=gen)
        loss = loss_of(idx, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def _training(limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The training digits (all but the held-out ones), or their first ``limit`` for short runs."""
    x, y = digits()
    return x[HELD_OUT:][:limit], y[HELD_OUT:][:limit]


def train_vae(
    steps: int = 1200, seed: int = 0, limit: int | None = None
) -> tuple[Any, list[float]]:
    """The autoencoder: MSE reconstruction + 1e-5 KL on the training digits; the losses."""
    x, _ = _training(limit)
    torch.manual_seed(seed)  # the initial weights too
    vae = vae_model()

    def loss_of(idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        post = vae.encode(x[idx]).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        return F.mse_loss(recon, x[idx]) + 1e-5 * post.kl().mean()

    return vae, fit(vae, loss_of, len(x), steps, 32, 2e-3, seed, "vae")


def train_dit(
    vae: Any, steps: int = 2500, seed: int = 0, limit: int | None = None
) -> tuple[Any, float, list[float]]:
    """The DiT on the autoencoder's latents (its mean, scaled to unit std), epsilon objective,
    10% of labels dropped to the null class so CFG works."""
    x, y = _training(limit)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
    scale = float(1.0 / z.std())
    z = z * scale
    torch.manual_seed(seed)
    dit = dit_model()
    return dit, scale, fit(dit, epsilon_loss(dit, z, y), len(z), steps, 128, 3e-4, seed, "dit")


def epsilon_loss(
    dit: Any, z: torch.Tensor, labels: torch.Tensor
) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    """``fit``'s loss of the DiT on latents ``z`` with class ``labels``: the epsilon objective
    at uniform timesteps, 10% of the labels dropped to the null class so CFG works."""
    from diffusers import DDPMScheduler

    noise_schedule = DDPMScheduler(num_train_timesteps=1000, **BETAS)

    def loss_of(idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        noise = torch.randn(z[idx].shape, generator=gen)
        t = torch.randint(0, 1000, (len(idx),), generator=gen)
        classes = labels[idx].clone()
        classes[torch.rand(len(idx), generator=gen) < 0.1] = NULL_CLASS
        noisy = noise_schedule.add_noise(z[idx], noise, t)
        return F.mse_loss(dit(noisy, timestep=t, class_labels=classes).sample, noise)

    return loss_of


def train_classifier(
    vae: Any, steps: int = 800, seed: int = 0, limit: int | None = None
) -> tuple[nn.Module, list[float]]:
    """The scorer, on real digits and their autoencoder reconstructions, in [0, 1]."""
    x, y = _training(limit)
    with torch.no_grad():
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    images = torch.cat([x, recon]) / 2 + 0.5
    labels = torch.cat([y, y])
    torch.manual_seed(seed)
    net = classifier_net()

    def loss_of(idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return F.cross_entropy(net(images[idx]), labels[idx])

    return net, fit(net, loss_of, len(images), steps, 128, 2e-3, seed, "classifier")


def held_out_accuracy(net: nn.Module) -> float:
    x, y = digits()
    with torch.no_grad():
        return float((net(x[:HELD_OUT] / 2 + 0.5).argmax(1) == y[:HELD_OUT]).float().mean())


def save(out: Path, vae: Any, dit: Any, scale: float, classifier: nn.Module) -> None:
    from diffusers import DDIMScheduler, DiTPipeline
    from safetensors.torch import save_file

    vae.register_to_config(scaling_factor=scale)
    scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, **BETAS)
    pipe = DiTPipeline(
        transformer=dit.half(), vae=vae.half(), scheduler=scheduler,
        id2label={i: str(i) for i in range(10)},
    )  # fmt: skip
    pipe.save_pretrained(out / "model")
    WEIGHTS.record(out / "model")
    state = {k: v.half().contiguous() for k, v in classifier.state_dict().items()}
    save_file(state, str(out / "classifier.safetensors"))


def main(argv: list[str] | None = None) -> None:
    p = training_parser(__doc__, HERE, threads=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out, k = Path(args.out), args.steps_scale
    times, t0 = {}, time.perf_counter()
    vae, vae_losses = train_vae(int(1200 * k))
    times["vae_s"] = time.perf_counter() - t0
    dit, scale, dit_losses = train_dit(vae, int(2500 * k))
    times["dit_s"] = time.perf_counter() - t0 - times["vae_s"]
    net, net_losses = train_classifier(vae, int(800 * k))
    times["total_s"] = time.perf_counter() - t0
    accuracy = held_out_accuracy(net)
    save(out, vae, dit, scale, net)

    summary = {
        "vae_loss": mean_last(vae_losses, 50),
        "dit_loss": mean_last(dit_losses, 50),
        "classifier_loss": mean_last(net_losses, 50),
        "classifier_held_out_accuracy": round(accuracy, 4),
        "latent_scaling_factor": round(scale, 5),
        "threads": args.threads,
        **{key: round(v, 1) for key, v in times.items()},
    }
    write_summary(out, summary)


if __name__ == "__main__":
    main()
