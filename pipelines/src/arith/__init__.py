"""``llada-arith``: a small LLaDA-architecture masked diffusion LM trained here on synthetic tasks
with checkable answers (addition, sorting, copying, word problems; model card: ``README.md``
beside this file), run through our ``LLaDAPipeline``.

``load()`` builds the pipeline offline from the committed files; ``score(prompt, text)`` says
whether a generated text is exactly the prompt's answer; ``PROMPTS`` are the held-out prompts of
the bundled task file ``tasks.tsv`` (``prompt<TAB>answer``), ``CALIBRATION`` training-split
prompts for profiling (``data.calibration_prompts``) and ``DEFAULTS`` the default request.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from diffcache.pipelines._weights import Weights
from diffcache.pipelines.arith.data import (
    GEN_LENGTH,
    TASK_FILE,
    calibration_prompts,
    read_task_file,
    solve,
)

HERE = Path(__file__).parent
TRAIN = "python -m diffcache.pipelines.arith.train"
#: the model weights (relative to ``model/``), checked against ``model/sha256.json``
WEIGHTS = Weights("llada-arith", TRAIN, ("model.safetensors",))
#: the default request: one block, one token per step (greedy, low-confidence remasking)
DEFAULTS = {"gen_length": GEN_LENGTH, "steps": GEN_LENGTH, "block_length": GEN_LENGTH}
#: longer requests the model is trained for: the answer in the first block of 16, EOS after it
LONG = {n: {"gen_length": n, "steps": n, "block_length": GEN_LENGTH} for n in (32, 64)}


@functools.cache
def _tasks() -> dict[str, str]:
    return {ex.prompt: ex.answer for ex in read_task_file(TASK_FILE)}


def __getattr__(name: str) -> Any:
    """``PROMPTS``: the default evaluation inputs, the held-out prompts of ``tasks.tsv`` (read
    on first use); ``CALIBRATION``: the calibration inputs, training-split prompts."""
    if name == "PROMPTS":
        return tuple(_tasks())
    if name == "CALIBRATION":
        return tuple(calibration_prompts())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load(folder: Path | None = None) -> Any:
    """The ``LLaDAPipeline`` (fp32, CPU) from ``folder`` (default: the committed files), after
    checking its weights against their recorded sha256."""
    from diffcache.pipelines.llada import LLaDAPipeline

    model = Path(folder or HERE) / "model"
    WEIGHTS.check(model)
    try:
        return LLaDAPipeline.from_pretrained(model)
    except Exception as e:  # a damaged config or tokenizer file fails here
        raise WEIGHTS.refuse(model, f"cannot be loaded ({type(e).__name__}: {e})") from e


def answer(prompt: str) -> str:
    """The expected answer: from ``tasks.tsv``, else computed from the prompt's form
    (ValueError for a prompt of none of the four task forms)."""
    return _tasks().get(prompt) or solve(prompt)


def score(prompt: str, text: str) -> bool:
    """Whether ``text`` (EOS dropped by the pipeline) is exactly the answer, surrounding
    whitespace ignored; False for a prompt of none of the task forms."""
    try:
        return text.strip() == answer(prompt)
    except ValueError:
        return False
