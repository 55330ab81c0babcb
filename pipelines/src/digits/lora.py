"""``dit-digits-lora``: a LoRA for ``dit-digits`` that shifts the classes: with it, class label
``c`` draws the digit ``(c + 1) % 10`` (model card: ``lora/README.md``).

    python -m diffcache.pipelines.digits.lora [--out DIR] [--steps N] [--threads N]

trains it (deterministic: seeded data order, noise and LoRA weights; a few minutes on one
thread), writes ``adapter.safetensors`` (fp16), ``sha256.json`` and ``training.json`` (losses,
and the classifier's reading of 40 generations with and without the LoRA). DiTPipeline has no
LoRA loader in diffusers, so the adapter goes into the transformer with peft's
``inject_adapter_in_model``: :func:`with_digits_lora`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffcache.pipelines._training import mean_last, training_parser, write_summary
from diffcache.pipelines._weights import Weights

HERE = Path(__file__).parent / "lora"
TRAIN = "python -m diffcache.pipelines.digits.lora"
ADAPTER = "digits-shift"
RANK = 16
#: every Linear of the DiT blocks and each block's class-embedding table
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj", "net.2", "linear", "embedding_table")
WEIGHTS = Weights("dit-digits-lora", TRAIN, ("adapter.safetensors",))
#: the generations scored before and after training: every class x these seeds
SEEDS = (0, 1, 2, 3)


def shifted(class_label: int) -> int:
    """The digit the LoRA draws for ``class_label``."""
    return (int(class_label) + 1) % 10


def load() -> Any:
    """``dit-digits`` with the class-shift LoRA at weight 1: the built-in ``dit-digits-lora``."""
    from diffcache.pipelines.digits import load as load_base

    return with_digits_lora(load_base())


def score(class_label: int, image: np.ndarray) -> bool:
    """Whether the digit classifier reads the shifted digit of ``class_label`` in ``image``."""
    from diffcache.pipelines.digits import score as score_digit

    return score_digit(shifted(class_label), image)


def lora_config() -> Any:
    from peft import LoraConfig

    return LoraConfig(r=RANK, lora_alpha=RANK, target_modules=list(TARGETS), lora_dropout=0.0)


def with_digits_lora(pipe: Any, weight: float = 1.0, folder: Path | None = None) -> Any:
    """Put the class-shift LoRA into ``pipe.transformer`` (a ``dit-digits`` DiTPipeline) as the
    peft adapter ``digits-shift`` at ``weight``; returns ``pipe``. Needs peft (extra ``lora``)."""
    from diffcache.lora_files import inject_lora_state

    folder = Path(folder or HERE)
    WEIGHTS.check(folder)
    state = WEIGHTS.state(folder / "adapter.safetensors")
    inject_lora_state(pipe.transformer, state, ADAPTER, lora_config())
    set_weight(pipe.transformer, weight)
    return pipe


def set_weight(transformer: torch.nn.Module, weight: float, adapter: str = ADAPTER) -> None:
    """Scale ``adapter`` in every LoRA layer of ``transformer`` (diffusers' ``set_adapters``
    weight, for a model without diffusers' LoRA mixin)."""
    from peft.tuners.lora import LoraLayer

    for module in transformer.modules():
        if isinstance(module, LoraLayer) and adapter in module.scaling:
            module.set_scale(adapter, weight)


def train(pipe: Any, steps: int, seed: int = 0) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Train the adapter on the training digits with labels moved back by one (an image of
    digit d is labelled d - 1), 10% of labels dropped to the null class as in the base model;
    the adapter's state dict and the losses."""
    from peft import get_peft_model_state_dict, inject_adapter_in_model

    from diffcache.pipelines.digits.train import _training, epsilon_loss, fit

    x, y = _training(None)
    with torch.no_grad():
        z = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
    dit = pipe.transformer
    dit.requires_grad_(False)
    torch.manual_seed(seed)  # the adapter's initial weights
    inject_adapter_in_model(lora_config(), dit, adapter_name=ADAPTER)

    losses = fit(dit, epsilon_loss(dit, z, (y - 1) % 10), len(z), steps, 64, 2e-3, seed, "lora")
    dit.requires_grad_(False)
    return get_peft_model_state_dict(dit, adapter_name=ADAPTER), losses


def readings(pipe: Any) -> np.ndarray:
    """The classifier's digit for every class x :data:`SEEDS` generation, (10, len(SEEDS))."""
    from diffcache.pipelines.digits import classify

    out = np.zeros((10, len(SEEDS)), dtype=int)
    for j, seed in enumerate(SEEDS):
        gen = torch.Generator().manual_seed(seed)
        images = pipe(class_labels=list(range(10)), generator=gen, output_type="np").images
        out[:, j] = classify(images)
    return out


def shift_accuracy(digits: np.ndarray) -> float:
    """Fraction of :func:`readings` that show the shifted digit of their class."""
    want = np.array([shifted(c) for c in range(10)])[:, None]
    return float((digits == want).mean())


def main(argv: list[str] | None = None) -> None:
    from safetensors.torch import save_file

    import diffcache

    args = training_parser(__doc__, HERE, threads=1, steps=800).parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = diffcache.load_model("dit-digits")
    before = readings(pipe)
    t0 = time.perf_counter()
    state, losses = train(pipe, args.steps)
    seconds = time.perf_counter() - t0
    half = {k: v.half().contiguous() for k, v in state.items()}
    save_file(half, str(out / "adapter.safetensors"))
    WEIGHTS.record(out)
    after = readings(with_digits_lora(diffcache.load_model("dit-digits"), folder=out))
    plain = np.arange(10)[:, None]
    summary = {
        "steps": args.steps,
        "loss_first_50": round(float(np.mean(losses[:50])), 5),
        "loss_last_50": mean_last(losses, 50),
        "train_s": round(seconds, 1),
        "threads": args.threads,
        "base_draws_class": round(float((before == plain).mean()), 4),
        "base_shift_accuracy": round(shift_accuracy(before), 4),
        "lora_shift_accuracy": round(shift_accuracy(after), 4),
        "lora_draws_class": round(float((after == plain).mean()), 4),
    }
    write_summary(out, summary)


if __name__ == "__main__":
    main()
