"""Train ``wan-shapes``: a video autoencoder, a text encoder + Wan transformer, and a checker.

    python -m diffcache.pipelines.shapes.train [--out DIR] [--steps-scale F] [--threads N]

Data: the procedural clips of ``data.py`` (one coloured shape moving left, right, up or down;
9 frames of 32x32), drawn fresh from seeds, so nothing is downloaded and nothing repeats between
the stages. Stages, each seeded (weights and batches), so a run is deterministic on one machine:

1. ``AutoencoderKLWan`` at a tiny width (4x spatial, 4x temporal, 8 latent channels), trained on
   reconstruction (MSE + L1, shape pixels weighted up) with a small KL term, then frozen.
2. A fixed set of clips is encoded once (posterior means, normalised per channel with the
   statistics written to the VAE config as ``latents_mean`` / ``latents_std``, which is how
   ``WanPipeline`` undoes it before decoding).
3. A tiny ``UMT5EncoderModel`` (word-level tokenizer over the closed vocabulary) and a small
   ``WanTransformer3DModel``, trained jointly with the flow-matching objective of
   ``UniPCMultistepScheduler(prediction_type="flow_prediction")``: ``x_t = (1 - s) x0 + s n`` at
   ``timestep = 1000 s`` and the model predicts ``n - x0``; 10% of prompts are dropped to the
   empty prompt (WanPipeline's default negative prompt) so classifier-free guidance works.
4. The checker: a small 3D CNN reading the colour and the motion (4 directions or still) of a
   decoded clip, trained on real clips and their autoencoder reconstructions.

Writes a diffusers ``WanPipeline`` folder (``model/``, tokenizer included), ``checker.safetensors``
and ``training.json`` (losses, accuracy, times).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffcache.pipelines._training import mean_last, training_parser, write_summary
from diffcache.pipelines.shapes import WEIGHTS, data
from diffcache.pipelines.shapes.checker import checker_net, checker_predict

HERE = Path(__file__).parent
Z_DIM = 8
TEXT_DIM = 32
FLOW_SHIFT = 2.0
#: WanPipeline pads every prompt embedding to this many tokens (its ``max_sequence_length``)
TEXT_TOKENS = 512
#: training pads the text to this many tokens and weights the padding to stand for the rest
SHORT_TOKENS = 8
PROMPT_DROPOUT = 0.1
VOCABULARY = " ".join([*data.COLOURS, *data.SHAPES, "moving", *data.DIRECTIONS])
#: seeds of the clip streams, apart so no two stages share clips
SEEDS = {"vae": 1_000_000, "latents": 2_000_000, "checker": 3_000_000, "held_out": 4_000_000}


# ---------------------------------------------------------------------------------------------
# models


def vae_model() -> Any:
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(
        base_dim=8,
        z_dim=Z_DIM,
        dim_mult=[1, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[True, True],
        scale_factor_spatial=4,
        scale_factor_temporal=4,
        latents_mean=[0.0] * Z_DIM,
        latents_std=[1.0] * Z_DIM,
    )


def tokenizer_model() -> Any:
    from diffcache.pipelines._tiny import word_tokenizer

    return word_tokenizer([VOCABULARY], model_max_length=TEXT_TOKENS)


def text_encoder_model(tokenizer: Any) -> Any:
    from diffcache.pipelines._tiny import t5_encoder

    return t5_encoder(
        tokenizer, TEXT_DIM, d_kv=16, d_ff=64, layers=2, heads=2, umt5=True, dropout_rate=0.0
    )


def transformer_model() -> Any:
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=32,
        in_channels=Z_DIM,
        out_channels=Z_DIM,
        text_dim=TEXT_DIM,
        freq_dim=64,
        ffn_dim=256,
        num_layers=4,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
    )


def scheduler() -> Any:
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=FLOW_SHIFT
    )


# ---------------------------------------------------------------------------------------------
# training helpers


def fit(
    params: Sequence[nn.Parameter],
    loss_of: Callable[[int, torch.Generator], torch.Tensor],
    steps: int,
    lr: float,
    seed: int,
    desc: str,
    warmup: int = 20,
    on_step: Callable[[int], None] | None = None,
) -> list[float]:
    """AdamW with linear warm-up and cosine decay over ``steps`` seeded steps; the losses."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    params = list(params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))

    def factor(i: int) -> float:
        return min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * i / max(steps, 1)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    losses = []
    for i in tqdm(range(steps), desc=desc, disable=steps < 50, leave=False):
        loss = loss_of(i, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if on_step is not None:
            on_step(i)
        losses.append(loss.item())
    return losses


def _background() -> torch.Tensor:
    return torch.tensor(data.BACKGROUND).view(1, 3, 1, 1, 1) * 2 - 1


def train_vae(steps: int = 800, seed: int = 0, batch: int = 8) -> tuple[Any, list[float]]:
    """The autoencoder on fresh clips: (MSE + 0.1 L1) with shape pixels weighted 10x, plus
    1e-3 x the KL per latent element (posterior samples are decoded)."""
    torch.manual_seed(seed)
    vae = vae_model().train()
    bg = _background()

    def loss_of(i: int, gen: torch.Generator) -> torch.Tensor:
        x = data.clips(batch, SEEDS["vae"] + seed * 100_000 + i).video
        weight = 1 + 9 * ((x - bg).abs().amax(1, keepdim=True) > 0.02).float()
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        err = vae.decode(z).sample - x
        kl = 0.5 * (post.mean**2 + post.var - 1 - post.logvar).mean()
        return (weight * err**2).mean() + 0.1 * (weight * err.abs()).mean() + 1e-3 * kl

    losses = fit(vae.parameters(), loss_of, steps, 3e-3, seed, "vae")
    return vae.eval().requires_grad_(False), losses


@torch.no_grad()
def encode_clips(
    vae: Any, n: int, seed: int = 0, batch: int = 32
) -> tuple[torch.Tensor, list[str]]:
    """Posterior means (N, Z, 3, 8, 8) of ``n`` fresh clips and their prompts."""
    from tqdm.auto import tqdm

    means, prompts = [], []
    for start in tqdm(range(0, n, batch), desc="encode", disable=n < 512, leave=False):
        clips = data.clips(min(batch, n - start), SEEDS["latents"] + seed * 100_000 + start)
        means.append(vae.encode(clips.video).latent_dist.mean)
        prompts += clips.prompts()
    return torch.cat(means), prompts


def latent_stats(latents: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of (N, Z, F, H, W) latents."""
    flat = latents.transpose(0, 1).flatten(1)
    return flat.mean(1).tolist(), flat.std(1).tolist()


def normalise(latents: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(N, Z, F, H, W) latents normalised per channel (what ``WanPipeline`` undoes before
    decoding with the VAE config's ``latents_mean`` / ``latents_std``)."""
    shape = (1, -1, 1, 1, 1)
    return (latents - torch.tensor(mean).view(shape)) / torch.tensor(std).view(shape)


class PaddedCrossAttention:
    """Training-only cross-attention processor for ``WanAttention`` that treats a short text
    sequence as WanPipeline's 512-token one.

    WanPipeline zero-pads every prompt embedding to 512 tokens, and all padding rows give one and
    the same key and value. Softmax attention over ``n`` real tokens plus ``512 - n`` equal
    padding keys equals attention over the real tokens plus ``k`` padding copies whose logits
    carry ``log((512 - n) / k)``. ``bias`` (B, L) holds those log-multiplicities (0 on real
    tokens); training then costs L keys instead of 512 and matches the stock forward exactly
    (up to float rounding; ``tests/test_shapes.py`` checks it).
    """

    def __init__(self) -> None:
        self.bias: torch.Tensor | None = None

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: Any = None,
    ) -> torch.Tensor:
        assert encoder_hidden_states is not None and self.bias is not None
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(attn.to_k(encoder_hidden_states)).unflatten(2, (attn.heads, -1))
        value = attn.to_v(encoder_hidden_states).unflatten(2, (attn.heads, -1))
        mask = self.bias[:, None, None, :].to(query.dtype)
        out = F.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=mask
        )
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def use_padded_cross_attention(transformer: Any) -> list[PaddedCrossAttention]:
    """Install :class:`PaddedCrossAttention` on every block's ``attn2``; the processors."""
    processors = [PaddedCrossAttention() for _ in transformer.blocks]
    for block, proc in zip(transformer.blocks, processors, strict=True):
        block.attn2.set_processor(proc)
    return processors


def use_stock_attention(transformer: Any) -> None:
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    for block in transformer.blocks:
        block.attn2.set_processor(WanAttnProcessor())


def encode_text(
    tokenizer: Any, text_encoder: Any, prompts: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt embeddings as WanPipeline makes them, but ``SHORT_TOKENS`` long (B, L, D), and the
    cross-attention bias (B, L) that makes them stand for the 512-token version."""
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=SHORT_TOKENS,
        truncation=True,
        return_tensors="pt",
    )
    mask = ids.attention_mask
    lengths = mask.sum(1)
    if int(lengths.max()) >= SHORT_TOKENS:
        raise ValueError(f"a prompt is {int(lengths.max())} tokens; raise SHORT_TOKENS")
    hidden = text_encoder(ids.input_ids, mask).last_hidden_state * mask[..., None]
    pads = (SHORT_TOKENS - lengths).float()
    weight = torch.log((TEXT_TOKENS - lengths).float() / pads)
    bias = torch.where(mask.bool(), torch.zeros(()), weight[:, None])
    return hidden, bias


def flow_sigmas(u: torch.Tensor, shift: float = FLOW_SHIFT) -> torch.Tensor:
    """Uniform ``u`` mapped by the scheduler's timestep shift: where sampling spends its steps."""
    return shift * u / (1 + (shift - 1) * u)


def flow_batch(
    latents: torch.Tensor, prompt_index: torch.Tensor, empty: int, batch: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random training batch from ``gen``: latents, their noise, noise levels and prompt
    indices (``prompt_index`` of each latent, ``PROMPT_DROPOUT`` of them set to ``empty``)."""
    idx = torch.randint(0, len(latents), (batch,), generator=gen)
    x0 = latents[idx]
    noise = torch.randn(x0.shape, generator=gen)
    sigma = flow_sigmas(torch.rand(batch, generator=gen))
    drop = torch.rand(batch, generator=gen) < PROMPT_DROPOUT
    return x0, noise, sigma, torch.where(drop, empty, prompt_index[idx])


def flow_loss(
    transformer: Any,
    processors: Sequence[PaddedCrossAttention],
    x0: torch.Tensor,
    noise: torch.Tensor,
    sigma: torch.Tensor,
    hidden: torch.Tensor,
    bias: torch.Tensor,
) -> torch.Tensor:
    """The flow-matching loss of ``transformer`` on latents ``x0`` noised to ``sigma`` (B,)
    with ``noise``, under the short prompt embeddings ``hidden`` and their ``bias`` (B, L)."""
    s = sigma.view(-1, 1, 1, 1, 1)
    noisy = (1 - s) * x0 + s * noise
    for proc in processors:
        proc.bias = bias
    pred = transformer(
        noisy, timestep=sigma * 1000, encoder_hidden_states=hidden, return_dict=False
    )[0]
    return F.mse_loss(pred, noise - x0)


def train_denoiser(
    latents: torch.Tensor,
    prompts: Sequence[str],
    steps: int = 3000,
    seed: int = 0,
    batch: int = 64,
    lr: float = 1e-3,
    ema_decay: float = 0.995,
) -> tuple[Any, Any, Any, list[float]]:
    """Text encoder + transformer on normalised latents; (tokenizer, text encoder (EMA),
    transformer (EMA), losses)."""
    tokenizer = tokenizer_model()
    torch.manual_seed(seed)
    text_encoder = text_encoder_model(tokenizer).train()
    transformer = transformer_model().train()
    processors = use_padded_cross_attention(transformer)
    vocab = sorted(set(prompts)) + [""]
    prompt_index = torch.tensor([vocab.index(p) for p in prompts])
    params = [*text_encoder.parameters(), *transformer.parameters()]
    ema = [p.detach().clone() for p in params]

    def loss_of(i: int, gen: torch.Generator) -> torch.Tensor:
        x0, noise, sigma, which = flow_batch(latents, prompt_index, len(vocab) - 1, batch, gen)
        hidden, bias = encode_text(tokenizer, text_encoder, vocab)
        return flow_loss(transformer, processors, x0, noise, sigma, hidden[which], bias[which])

    def update_ema(i: int) -> None:
        decay = min(ema_decay, (1 + i) / (10 + i))
        with torch.no_grad():
            for e, p in zip(ema, params, strict=True):
                e.lerp_(p.detach(), 1 - decay)

    losses = fit(params, loss_of, steps, lr, seed, "denoiser", warmup=100, on_step=update_ema)
    with torch.no_grad():
        for e, p in zip(ema, params, strict=True):
            p.copy_(e)
    use_stock_attention(transformer)
    return (
        tokenizer,
        text_encoder.eval().requires_grad_(False),
        transformer.eval().requires_grad_(False),
        losses,
    )


def train_transformer(steps: int = 5, seed: int = 0, clips: int = 32) -> list[float]:
    """A short seeded run of stage 3 on clips encoded by a freshly initialised autoencoder (no
    committed files needed): the losses (for determinism tests)."""
    torch.manual_seed(seed)
    vae = vae_model().eval()
    latents, prompts = encode_clips(vae, clips, seed)
    latents = normalise(latents, *latent_stats(latents))
    return train_denoiser(latents, prompts, steps=steps, seed=seed, batch=8)[3]


# ---------------------------------------------------------------------------------------------
# checker


def checker_labels(clips: data.Clips) -> torch.Tensor:
    return torch.stack([clips.colour, clips.direction], 1)


def checker_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    n = len(data.COLOURS)
    return F.cross_entropy(logits[:, :n], labels[:, 0]) + F.cross_entropy(
        logits[:, n:], labels[:, 1]
    )


@torch.no_grad()
def autoencode(vae: Any, video: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """The autoencoder's reconstruction (posterior mean decoded) of (N, 3, F, H, W) clips."""
    return torch.cat(
        [vae.decode(vae.encode(v).latent_dist.mean).sample for v in video.split(batch)]
    )


def train_checker(
    vae: Any, steps: int = 500, seed: int = 0, batch: int = 32, pool: int = 1024
) -> tuple[nn.Module, list[float]]:
    """The checker: each batch is half fresh real clips, half autoencoder reconstructions from a
    fixed pool of ``pool`` clips (15% still everywhere), so it reads clean and decoded clips."""
    still = 0.15
    recon = data.clips(pool, SEEDS["checker"] + seed * 100_000, still=still)
    recon_video = autoencode(vae, recon.video)
    torch.manual_seed(seed)
    net = checker_net().train()

    def loss_of(i: int, gen: torch.Generator) -> torch.Tensor:
        half = batch // 2
        real = data.clips(half, SEEDS["checker"] + seed * 100_000 + 1 + i, still=still)
        idx = torch.randint(0, pool, (batch - half,), generator=gen)
        video = torch.cat([real.video, recon_video[idx]])
        labels = torch.cat([checker_labels(real), checker_labels(recon)[idx]])
        return checker_loss(net(video / 2 + 0.5), labels)

    losses = fit(net.parameters(), loss_of, steps, 2e-3, seed, "checker")
    return net.eval().requires_grad_(False), losses


def held_out_accuracy(net: nn.Module, n: int = 512, vae: Any = None) -> float:
    """Fraction of ``n`` held-out real clips (15% still; autoencoded if ``vae``) whose colour and
    motion the checker both reads right."""
    clips = data.clips(n, SEEDS["held_out"], still=0.15)
    video = clips.video if vae is None else autoencode(vae, clips.video)
    pred = checker_predict(net, video / 2 + 0.5)
    return float((pred == checker_labels(clips)).all(1).float().mean())


# ---------------------------------------------------------------------------------------------
# saving and the command line


def save(
    out: Path,
    vae: Any,
    tokenizer: Any,
    text_encoder: Any,
    transformer: Any,
    checker: nn.Module,
) -> None:
    from diffusers import WanPipeline
    from safetensors.torch import save_file

    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=scheduler(),
        transformer=transformer,
    )
    pipe.save_pretrained(out / "model")
    WEIGHTS.record(out / "model")
    state = {k: v.contiguous() for k, v in checker.state_dict().items()}
    save_file(state, str(out / "checker.safetensors"))


def main(argv: list[str] | None = None) -> None:
    p = training_parser(__doc__, HERE, threads=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out, k = Path(args.out), args.steps_scale
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t0 = time.perf_counter()

    def lap(name: str) -> None:
        times[name] = time.perf_counter() - t0 - sum(times.values())

    vae, vae_losses = train_vae(int(800 * k))
    lap("vae_s")
    latents, prompts = encode_clips(vae, max(int(6144 * k), 64))
    mean, std = latent_stats(latents)
    vae.register_to_config(latents_mean=mean, latents_std=std)
    latents = normalise(latents, mean, std)
    lap("encode_s")
    tokenizer, text_encoder, transformer, losses = train_denoiser(latents, prompts, int(3000 * k))
    lap("denoiser_s")
    checker, checker_losses = train_checker(vae, int(500 * k))
    lap("checker_s")
    accuracy = held_out_accuracy(checker)
    accuracy_decoded = held_out_accuracy(checker, vae=vae)
    save(out, vae, tokenizer, copy.deepcopy(text_encoder), transformer, checker)
    times["total_s"] = time.perf_counter() - t0

    summary = {
        "vae_loss": mean_last(vae_losses, 100),
        "denoiser_loss": mean_last(losses, 100),
        "checker_loss": mean_last(checker_losses, 100),
        "checker_held_out_accuracy": round(accuracy, 4),
        "checker_held_out_accuracy_autoencoded": round(accuracy_decoded, 4),
        "latents_mean": [round(v, 4) for v in mean],
        "latents_std": [round(v, 4) for v in std],
        "threads": args.threads,
        "steps_scale": k,
        **{key: round(v, 1) for key, v in times.items()},
    }
    write_summary(out, summary)


if __name__ == "__main__":
    main()
