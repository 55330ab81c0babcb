"""Train ``var-digits``: a multi-scale VQ-VAE, then a class-conditional VAR transformer on its
token maps.

    python -m diffcache.pipelines.var_digits.train [--out DIR] [--steps-scale F] [--threads N]

Data and split are dit-digits' (``diffcache.pipelines.digits.train``: scikit-learn's digits,
bilinear to 32x32, 297 held out). The VQ-VAE learns reconstruction (MSE) with the multi-scale
residual quantiser (straight-through, codebook + 0.25 commitment loss); the transformer learns
next-scale prediction by teacher forcing with the block-causal mask, 10% of labels dropped to the
null class for CFG. Seeded init and batch order: a run is deterministic at one thread count.
Writes ``model/``: ``transformer.safetensors``, ``vae.safetensors`` (fp16), ``config.json`` and
``sha256.json``; and ``training.json`` (losses, codebook use, times, threads).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from diffcache.pipelines._training import mean_last, training_parser, write_summary
from diffcache.pipelines.digits.train import _training, fit
from diffcache.pipelines.var.config import VARConfig, VQVAEConfig
from diffcache.pipelines.var.transformer import VARTransformer
from diffcache.pipelines.var.vqvae import VQVAE
from diffcache.pipelines.var_digits import CONFIG, HERE, WEIGHTS

PATCH_NUMS = (1, 2, 3, 4, 6, 8)
VQ_CONFIG = VQVAEConfig(
    vocab_size=64, z_channels=8, ch=32, patch_nums=PATCH_NUMS, ch_mult=(1, 1, 2), num_res_blocks=1
)
VAR_CONFIG = VARConfig(
    depth=4, embed_dim=64, num_heads=4, num_classes=10, patch_nums=PATCH_NUMS,
    vocab_size=VQ_CONFIG.vocab_size, z_channels=VQ_CONFIG.z_channels,
)  # fmt: skip
#: the commitment loss weight (upstream's beta)
BETA = 0.25
COND_DROP = 0.1
#: optimiser steps of the two stages (``--steps-scale`` scales both)
VQ_STEPS, VAR_STEPS = 400, 1200


def vq_loss(vae: VQVAE, x: torch.Tensor) -> torch.Tensor:
    """Reconstruction MSE of images ``x`` through the quantiser (straight-through), plus the
    codebook loss and ``BETA`` times the commitment loss."""
    f = vae.quant_conv(vae.encoder(x))
    f_hat = vae.quantize.quantize_scales(f, to_fhat=True)[-1]
    vq = F.mse_loss(f_hat, f.detach()) + BETA * F.mse_loss(f_hat.detach(), f)
    recon = vae.decoder(vae.post_quant_conv(f + (f_hat - f).detach()))
    return F.mse_loss(recon, x) + vq


def train_vqvae(
    steps: int = VQ_STEPS, seed: int = 0, limit: int | None = None
) -> tuple[VQVAE, list[float]]:
    """The VQ-VAE on the training digits; the losses."""
    x, _ = _training(limit)
    torch.manual_seed(seed)  # the initial weights too
    vae = VQVAE(config=VQ_CONFIG).requires_grad_(True)

    def loss_of(idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return vq_loss(vae, x[idx])

    losses = fit(vae, loss_of, len(x), steps, 16, 2e-3, seed, "vq-vae")
    return vae.requires_grad_(False), losses


def train_var(
    vae: VQVAE, steps: int = VAR_STEPS, seed: int = 0, limit: int | None = None
) -> tuple[VARTransformer, list[float]]:
    """The transformer by teacher forcing on the VQ-VAE's token maps of the training digits,
    ``COND_DROP`` of the labels dropped to the null class; the losses."""
    x, y = _training(limit)
    with torch.no_grad():
        indices = vae.img_to_idxBl(x)
        inputs = vae.quantize.teacher_input(indices)
    targets = torch.cat(indices, dim=1)
    torch.manual_seed(seed)
    model = VARTransformer(VAR_CONFIG)
    model.init_weights()

    def loss_of(idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        labels = y[idx].clone()
        labels[torch.rand(len(idx), generator=gen) < COND_DROP] = VAR_CONFIG.num_classes
        logits = model.teacher_forcing(labels, inputs[idx])
        return F.cross_entropy(logits.flatten(0, 1), targets[idx].flatten())

    return model, fit(model, loss_of, len(x), steps, 32, 1e-3, seed, "var")


def codebook_usage(vae: VQVAE) -> int:
    """Codes the training digits use at any scale."""
    x, _ = _training(None)
    with torch.no_grad():
        return int(torch.cat(vae.img_to_idxBl(x), dim=1).unique().numel())


def save(out: Path, vae: VQVAE, model: VARTransformer) -> None:
    """fp16 weights (integer buffers as they are), the configs and the checksums in
    ``out/model``."""
    from safetensors.torch import save_file

    out = out / "model"
    out.mkdir(parents=True, exist_ok=True)
    for module, name in ((model, WEIGHTS.files[0]), (vae, WEIGHTS.files[1])):
        state = {
            k: (v.half() if v.is_floating_point() else v).contiguous()
            for k, v in module.state_dict().items()
        }
        save_file(state, str(out / name))
    configs = {"transformer": dataclasses.asdict(VAR_CONFIG), "vae": dataclasses.asdict(VQ_CONFIG)}
    (out / CONFIG).write_text(json.dumps(configs, indent=2) + "\n")
    WEIGHTS.record(out)


def main(argv: list[str] | None = None) -> None:
    p = training_parser(__doc__, HERE, threads=1)
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if not (math.isfinite(args.steps_scale) and min(VQ_STEPS, VAR_STEPS) * args.steps_scale >= 1):
        p.error(f"--steps-scale {args.steps_scale} leaves a stage with no step")
    torch.set_num_threads(args.threads)
    out, k = Path(args.out), args.steps_scale
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    vae, vae_losses = train_vqvae(int(VQ_STEPS * k))
    vae_s = time.perf_counter() - t0
    model, var_losses = train_var(vae, int(VAR_STEPS * k))
    total_s = time.perf_counter() - t0
    save(out, vae, model)

    summary = {
        "vqvae_loss": mean_last(vae_losses, 50),
        "var_loss": mean_last(var_losses, 50),
        "vqvae_steps": len(vae_losses),
        "var_steps": len(var_losses),
        "codes_used": codebook_usage(vae),
        "threads": args.threads,
        "vqvae_s": round(vae_s, 1),
        "var_s": round(total_s - vae_s, 1),
        "total_s": round(total_s, 1),
    }
    write_summary(out, summary)


if __name__ == "__main__":
    main()
