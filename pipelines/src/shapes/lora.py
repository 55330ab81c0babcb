"""``wan-shapes-lora``: a LoRA for ``wan-shapes`` that swaps the directions: with it, a prompt
"moving left" draws the shape moving right, "up" draws it moving down, and the other way round
(model card: ``lora/README.md``).

    python -m diffcache.pipelines.shapes.lora [--out DIR] [--steps N] [--threads N]

trains it (deterministic: seeded clips, noise and LoRA weights; a few minutes on one thread),
writes ``adapter.safetensors`` (fp16, diffusers' LoRA names: ``transformer.`` + peft's),
``sha256.json`` and ``training.json`` (losses, and the checker's reading of the evaluation
prompts' generations with and without the LoRA). It loads as any Wan LoRA does, through
``WanPipeline.load_lora_weights``: :func:`with_shapes_lora`, or ``--lora`` on the command line.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffcache.pipelines._training import mean_last, training_parser, write_summary
from diffcache.pipelines._weights import Weights
from diffcache.pipelines.shapes import data

HERE = Path(__file__).parent / "lora"
TRAIN = "python -m diffcache.pipelines.shapes.lora"
ADAPTER = "shapes_swap"
RANK = 8
#: every Linear of the transformer blocks: self- and cross-attention, feed-forward
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "net.0.proj", "net.2")
WEIGHTS = Weights("wan-shapes-lora", TRAIN, ("adapter.safetensors",))
#: the generations scored before and after training: every evaluation prompt x these seeds
SEEDS = (0, 1)
#: ``encode_clips``' seed for the training clips: clip seeds from 7,000,000 on, apart from
#: every stage of the base model's training
CLIPS_SEED = 50


def swapped(prompt: str) -> str:
    """The prompt whose motion the LoRA draws for ``prompt``: its direction reversed."""
    colour, shape, direction = data.parse(prompt)
    return data.prompt(colour, shape, direction ^ 1)  # left <-> right, up <-> down


def load() -> Any:
    """``wan-shapes`` with the direction-swap LoRA at weight 1: the built-in
    ``wan-shapes-lora``."""
    from diffcache.pipelines.shapes import load as load_base

    return with_shapes_lora(load_base())


def score(prompt: str, video: np.ndarray) -> bool:
    """Whether the checker reads the prompt's colour and its reversed direction in ``video``."""
    from diffcache.pipelines.shapes import score as score_clip

    return score_clip(swapped(prompt), video)


def with_shapes_lora(pipe: Any, weight: float = 1.0, folder: Path | None = None) -> Any:
    """Load the direction-swap LoRA into ``pipe`` (a ``wan-shapes`` WanPipeline) as the adapter
    ``shapes_swap`` at ``weight`` (``load_lora_weights`` + ``set_adapters``, as ``--lora``
    does); returns ``pipe``. Needs peft (extra ``lora``)."""
    from diffcache.lora_files import LoraFile, load_loras

    folder = Path(folder or HERE)
    WEIGHTS.check(folder)
    path = folder / "adapter.safetensors"
    return load_loras(pipe, [LoraFile(str(path), path, weight, ADAPTER)])


def lora_config() -> Any:
    from peft import LoraConfig

    return LoraConfig(r=RANK, lora_alpha=RANK, target_modules=list(TARGETS), lora_dropout=0.0)


def training_latents(pipe: Any, n: int) -> tuple[torch.Tensor, list[str]]:
    """``n`` fresh clips encoded by ``pipe``'s autoencoder and normalised as ``WanPipeline``
    expects, each captioned with its direction reversed."""
    from diffcache.pipelines.shapes.train import encode_clips, normalise

    latents, prompts = encode_clips(pipe.vae, n, seed=CLIPS_SEED)
    config = pipe.vae.config
    return normalise(latents, config.latents_mean, config.latents_std), [
        swapped(p) for p in prompts
    ]


def train(
    pipe: Any, steps: int, clips: int = 2048, seed: int = 0, batch: int = 32, lr: float = 2e-3
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Train the adapter on :func:`training_latents` with the base model's flow-matching
    objective and prompt dropout (the text encoder frozen, so its embeddings are computed
    once); the adapter's state dict (diffusers' names) and the losses."""
    from peft import get_peft_model_state_dict, inject_adapter_in_model

    from diffcache.pipelines.shapes import train as base

    latents, prompts = training_latents(pipe, clips)
    vocab = sorted(set(prompts)) + [""]
    index = torch.tensor([vocab.index(p) for p in prompts])
    with torch.no_grad():
        hidden, bias = base.encode_text(pipe.tokenizer, pipe.text_encoder, vocab)
    dit = pipe.transformer
    dit.requires_grad_(False)
    torch.manual_seed(seed)  # the adapter's initial weights
    inject_adapter_in_model(lora_config(), dit, adapter_name=ADAPTER)
    processors = base.use_padded_cross_attention(dit)

    def loss_of(i: int, gen: torch.Generator) -> torch.Tensor:
        x0, noise, sigma, which = base.flow_batch(latents, index, len(vocab) - 1, batch, gen)
        return base.flow_loss(dit, processors, x0, noise, sigma, hidden[which], bias[which])

    params = [p for p in dit.parameters() if p.requires_grad]
    losses = base.fit(params, loss_of, steps, lr, seed, "lora")
    base.use_stock_attention(dit)
    dit.requires_grad_(False)
    state = get_peft_model_state_dict(dit, adapter_name=ADAPTER)
    return {f"transformer.{k}": v for k, v in state.items()}, losses


def readings(pipe: Any) -> np.ndarray:
    """The checker's (colour, motion) of every evaluation prompt x :data:`SEEDS` generation,
    (len(PROMPTS) x len(SEEDS), 2), seed-major."""
    from diffcache.generate import Request, generate
    from diffcache.models import builtin_models
    from diffcache.pipelines.shapes import PROMPTS, read

    defaults = builtin_models()["wan-shapes"].defaults
    videos = [
        generate(pipe, Request(prompt=p, seed=s).merged(defaults)) for s in SEEDS for p in PROMPTS
    ]
    return read(np.stack(videos))


def follows(got: np.ndarray, prompts: list[str]) -> float:
    """Fraction of :func:`readings` whose colour and motion are those of ``prompts``."""
    want = np.array([data.parse(p)[0::2] for p in prompts])
    return float((got == want).all(1).mean())


def main(argv: list[str] | None = None) -> None:
    from safetensors.torch import save_file

    from diffcache.pipelines.shapes import PROMPTS
    from diffcache.pipelines.shapes import load as load_base

    args = training_parser(__doc__, HERE, threads=1, steps=1200).parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    asked = [p for _ in SEEDS for p in PROMPTS]
    reversed_ = [swapped(p) for p in asked]
    before = readings(load_base())
    t0 = time.perf_counter()
    state, losses = train(load_base(), args.steps)
    seconds = time.perf_counter() - t0
    save_file(
        {k: v.half().contiguous() for k, v in state.items()}, str(out / "adapter.safetensors")
    )
    WEIGHTS.record(out)
    after = readings(with_shapes_lora(load_base(), folder=out))
    summary = {
        "steps": args.steps,
        "loss_first_50": round(float(np.mean(losses[:50])), 5),
        "loss_last_50": mean_last(losses, 50),
        "train_s": round(seconds, 1),
        "threads": args.threads,
        "samples": len(asked),
        "base_follows_prompt": round(follows(before, asked), 4),
        "base_reversed": round(follows(before, reversed_), 4),
        "lora_reversed": round(follows(after, reversed_), 4),
        "lora_follows_prompt": round(follows(after, asked), 4),
    }
    write_summary(out, summary)


if __name__ == "__main__":
    main()
