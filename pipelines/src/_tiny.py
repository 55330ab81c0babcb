"""Shared pieces for the code-built tiny pipelines: seeding and word-level tokenizers.

Everything here is built offline from config; nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

# Splits words, single punctuation marks and newline runs (each a token); drops other whitespace.
_TOKEN_PATTERN = r"\w+|[^\w\s]|\n+"

# A small prompt vocabulary; any other word maps to the unknown token.
WORDS = """
a an the of and or with in on at by to from for over under near behind through into
is are was very two three many some one small large big tiny huge old young new
cat dog bird fish horse cow lion tiger bear fox wolf rabbit mouse owl eagle duck panda
monkey elephant giraffe dragon robot astronaut person man woman child girl boy people
crowd knight wizard chef dancer musician soldier car bus train boat ship plane bicycle
rocket house castle tower bridge city street road village forest tree trees flower flowers
garden field mountain mountains hill river lake sea ocean beach wave waves island desert
snow rain storm cloud clouds sky sun moon star stars night day sunset sunrise morning
evening fire water ice stone wood glass metal gold silver light shadow smoke fog
red orange yellow green blue purple pink brown black white gray grey colorful dark bright
running walking jumping flying swimming surfing dancing sitting standing sleeping eating
playing riding reading singing cooking fighting driving falling smiling looking holding
wearing hat coat dress shirt glasses book table chair window door room kitchen library
painting photo photograph portrait landscape cinematic realistic detailed style art
drawing sketch cartoon anime oil watercolor digital render 3d 4k 8k hd high quality
best masterpiece low worst blurry blur noisy noise distorted ugly bad deformed static
motion camera close up wide shot view slow fast zoom pan background foreground scene
video image picture frame soft sharp warm cold beautiful happy sad calm peaceful epic
futuristic ancient medieval modern vintage neon golden hour cyberpunk fantasy magic
""".split()


def on_components(cls: type, pipe: Any, **changes: Any) -> Any:
    """A pipeline of class ``cls`` on ``pipe``'s components (those ``cls`` takes), with
    ``changes`` replacing some: a variant of a tiny pipeline sharing its modules."""
    takes = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in {**pipe.components, **changes}.items() if k in takes})


def on_tiny(cls_name: str, build: Callable[[int], Any]) -> Callable[[int], Any]:
    """A builder of the diffusers pipeline ``cls_name`` on the components of ``build(seed)``
    (a family's tiny pipeline): e.g. its img2img variant sharing the tiny modules."""

    def builder(seed: int = 0) -> Any:
        import diffusers

        return on_components(getattr(diffusers, cls_name), build(seed))

    builder.__doc__ = f"{cls_name} on the components of {build.__module__}.{build.__name__}."
    return builder


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block under ``torch.manual_seed(seed)`` without touching the caller's CPU RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def word_tokenizer(
    texts: Sequence[str] = (),
    *,
    specials: Sequence[str] = (),
    bos: str | None = None,
    eos: str | None = "</s>",
    pad: str = "<pad>",
    unk: str = "<unk>",
    prefix: Sequence[str] = (),
    pieces: Sequence[str] = (),
    model_max_length: int | None = None,
) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` built in code.

    Args:
        texts: extra text whose words join the vocabulary (e.g. a pipeline's prompt template).
        specials: tokens matched whole before pre-tokenization (chat-template markers).
        bos: token put before every sequence, if any.
        eos: token put after every sequence, if any.
        prefix: extra special tokens put first (after ``bos``) in every sequence.
        pieces: strings that are one token wherever they occur, inside words too, as a BPE
            merge makes them (``"'s"`` keeps ``user's`` two tokens; ``"transition"`` makes
            ``transitions`` two).
        model_max_length: the tokenizer's default maximum length.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    named = [t for t in (pad, eos, unk, bos) if t is not None]
    for token in [*named, *specials, *prefix, *pieces, *WORDS]:
        vocab.setdefault(token, len(vocab))
    for text in texts:
        for piece in pieces:  # the rest of a word a piece splits is a word of its own
            text = text.replace(piece, " ")
        for token in re.findall(_TOKEN_PATTERN, text):
            vocab.setdefault(token, len(vocab))

    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(_TOKEN_PATTERN), behavior="removed", invert=True)
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in pieces])
    head = [t for t in (bos, *prefix) if t is not None]
    tail = [eos] if eos is not None else []
    if head or tail:
        used = dict.fromkeys([*head, *tail])
        tk.post_processor = processors.TemplateProcessing(
            single=" ".join([*head, "$A", *tail]),
            pair=" ".join([*head, "$A", *tail, "$B", *tail]),
            special_tokens=[(t, vocab[t]) for t in used],
        )
    kwargs: dict[str, Any] = {"pad_token": pad, "unk_token": unk}
    if bos is not None:
        kwargs["bos_token"] = bos
    if eos is not None:
        kwargs["eos_token"] = eos
    if specials:
        kwargs["additional_special_tokens"] = list(specials)
    if model_max_length is not None:
        kwargs["model_max_length"] = model_max_length
    return PreTrainedTokenizerFast(tokenizer_object=tk, **kwargs)


def template_prefix_length(tokenizer: Any, template: str, end: str = "{}") -> int:
    """Number of tokens the tokenizer gives the part of ``template`` before ``end`` (its
    ``{}``, where the prompt goes)."""
    return len(tokenizer(template.split(end)[0]).input_ids)


def tiny_clip() -> tuple[Any, Any]:
    """A CLIP-slot tokenizer (77 tokens, start/end markers) and a 2-layer CLIP text model of
    width 32 whose ids match the tokenizer (the pooled output is read at the EOS position)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = word_tokenizer(bos="<|startoftext|>", eos="<|endoftext|>", model_max_length=77)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=32,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer, CLIPTextModel(config).eval()


def t5_encoder(
    tokenizer: Any,
    width: int,
    *,
    d_kv: int,
    d_ff: int,
    layers: int,
    heads: int,
    umt5: bool = False,
    **config: Any,
) -> Any:
    """A T5 (``umt5``: UMT5) encoder of ``width`` whose ids match the word-level ``tokenizer``,
    random weights from the global RNG; ``config``: other config fields."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    return model_cls(
        config_cls(
            vocab_size=len(tokenizer),
            d_model=width,
            d_kv=d_kv,
            d_ff=d_ff,
            num_layers=layers,
            num_heads=heads,
            relative_attention_num_buckets=8,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
            **config,
        )
    )


def tiny_t5(model_max_length: int, width: int = 32) -> tuple[Any, Any]:
    """A word-level tokenizer and a 2-layer T5 encoder of ``width`` (random weights from the
    global RNG)."""
    tokenizer = word_tokenizer(model_max_length=model_max_length)
    encoder = t5_encoder(tokenizer, width, d_kv=width // 4, d_ff=2 * width, layers=2, heads=4)
    return tokenizer, encoder.eval()
