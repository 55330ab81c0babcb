"""Our LLaDA and Dream modules: upstream tensor layout, folder loading, tokenizers, the
sub-function path, left padding, dtypes and the tiny builders."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import diffcache
from diffcache.errors import UnsupportedModelError
from diffcache.pipelines.dlm_layers import apply_rope, rope_cos_sin
from diffcache.pipelines.dlm_loading import detect_family, load_dlm_folder, load_dlm_tokenizer
from diffcache.pipelines.dlm_tokenizer import CharTokenizer
from diffcache.pipelines.dream.model import DreamConfig, DreamModel, build_tiny_dream
from diffcache.pipelines.llada.model import LLaDAConfig, LLaDAModelLM, build_tiny_llada

# The published config.json of LLaDA-8B-Instruct and Dream-v0-Instruct-7B (research/dlm.md §1.3).
LLADA_8B: dict[str, Any] = {
    "architectures": ["LLaDAModelLM"], "model_type": "llada", "auto_map": {"AutoModel": "x"},
    "d_model": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 32, "mlp_hidden_size": 12288,
    "mlp_ratio": 4, "vocab_size": 126464, "embedding_size": 126464, "max_sequence_length": 4096,
    "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "mask_token_id": 126336,
    "eos_token_id": 126081, "pad_token_id": 126081, "weight_tying": False,
    "include_bias": False, "include_qkv_bias": False, "use_cache": False,
    "activation_type": "silu", "block_type": "llama", "layer_norm_type": "rms", "rope": True,
    "rope_full_precision": True, "attention_layer_norm": False, "alibi": False,
    "flash_attention": False, "scale_logits": False, "input_emb_norm": False,
    "init_fn": "mitchell", "attention_dropout": 0.0, "residual_dropout": 0.0,
    "embedding_dropout": 0.0, "torch_dtype": "bfloat16",
}  # fmt: skip
DREAM_7B: dict[str, Any] = {
    "architectures": ["DreamModel"], "model_type": "Dream", "auto_map": {"AutoModel": "x"},
    "hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
    "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False,
    "mask_token_id": 151666, "pad_token_id": 151643, "eos_token_id": 151643,
    "bos_token_id": 151643, "hidden_act": "silu", "max_position_embeddings": 131072,
    "use_sliding_window": False, "sliding_window": 131072, "max_window_layers": 28,
    "attention_dropout": 0.0, "rope_scaling": None, "torch_dtype": "bfloat16", "use_cache": False,
}  # fmt: skip
# The same configs at micro size (vocab 256, special ids remapped inside it).
LLADA_SMALL = {
    **LLADA_8B, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4,
    "mlp_hidden_size": 64, "vocab_size": 256, "embedding_size": 256, "mask_token_id": 250,
    "eos_token_id": 251, "pad_token_id": 251,
}  # fmt: skip
DREAM_SMALL = {
    **DREAM_7B, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 256, "mask_token_id": 250,
    "pad_token_id": 251, "eos_token_id": 251, "bos_token_id": 251,
}  # fmt: skip
SMALL = {"llada": LLADA_SMALL, "dream": DREAM_SMALL}


def llada_layout(c: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of a LLaDA checkpoint (names of the 8B index file), from its config."""
    d, heads = c["d_model"], c["n_heads"]
    kv = (c.get("n_kv_heads") or heads) * (d // heads)
    v, m = c["embedding_size"] or c["vocab_size"], c["mlp_hidden_size"]
    t = "model.transformer."
    out = {t + "wte.weight": (v, d), t + "ln_f.weight": (d,), t + "ff_out.weight": (v, d)}
    for i in range(c["n_layers"]):
        b = f"{t}blocks.{i}."
        out.update({
            b + "attn_norm.weight": (d,), b + "ff_norm.weight": (d,),
            b + "q_proj.weight": (d, d), b + "k_proj.weight": (kv, d), b + "v_proj.weight": (kv, d),
            b + "attn_out.weight": (d, d), b + "ff_proj.weight": (m, d),
            b + "up_proj.weight": (m, d), b + "ff_out.weight": (d, m),
        })  # fmt: skip
    return out


def dream_layout(c: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Dream checkpoint (names of the 7B index file), from its config."""
    d, heads = c["hidden_size"], c["num_attention_heads"]
    v, m = c["vocab_size"], c["intermediate_size"]
    kv = c["num_key_value_heads"] * (d // heads)
    out = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}
    for i in range(c["num_hidden_layers"]):
        a, p = f"model.layers.{i}.self_attn.", f"model.layers.{i}."
        out.update({
            a + "q_proj.weight": (d, d), a + "q_proj.bias": (d,), a + "k_proj.weight": (kv, d),
            a + "k_proj.bias": (kv,), a + "v_proj.weight": (kv, d), a + "v_proj.bias": (kv,),
            a + "o_proj.weight": (d, d), p + "mlp.gate_proj.weight": (m, d),
            p + "mlp.up_proj.weight": (m, d), p + "mlp.down_proj.weight": (d, m),
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
        })  # fmt: skip
    return out


LAYOUT = {"llada": llada_layout, "dream": dream_layout}
MODEL = {"llada": (LLaDAConfig, LLaDAModelLM), "dream": (DreamConfig, DreamModel)}


def _random_state(layout: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    one = {k: 1.0 if k.endswith("norm.weight") else 0.0 for k in layout}
    return {k: torch.randn(s, generator=g) * 0.2 + one[k] for k, s in layout.items()}


def _write_tokenizer(folder: Path, template_file: bool = False) -> None:
    """A word-level tokenizer.json with the micro special ids, and its tokenizer_config.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {
        "[UNK]": 0,
        "hello": 1,
        "world": 2,
        "user": 3,
        "<|mdm_mask|>": 250,
        "<|endoftext|>": 251,
        "<|eot_id|>": 252,
    }
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.save(str(folder / "tokenizer.json"))
    config = {
        "eos_token": {"content": "<|endoftext|>", "__type": "AddedToken"},
        "pad_token": "<|endoftext|>", "chat_template": "CONFIG {{ messages[0]['content'] }}",
    }  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(json.dumps({"mask_token": "<|mdm_mask|>"}))
    if template_file:
        (folder / "chat_template.jinja").write_text("FILE {{ messages[0]['content'] }}")


def _write_folder(
    folder: Path, config: dict[str, Any], state: dict[str, torch.Tensor], shards: int = 1
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if shards == 1:
        save_file(state, str(folder / "model.safetensors"))
    else:
        names = sorted(state)
        weight_map = {}
        for s in range(shards):
            file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = names[s::shards]
            save_file({k: state[k] for k in part}, str(folder / file))
            weight_map.update(dict.fromkeys(part, file))
        index = {"metadata": {}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    _write_tokenizer(folder)
    return folder


# -- layout ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family,config", [("llada", LLADA_8B), ("dream", DREAM_7B)])
def test_full_size_layout_matches_the_checkpoint_index(family: str, config: dict) -> None:
    config_cls, model_cls = MODEL[family]
    with torch.device("meta"):
        model = model_cls(config_cls.from_dict(config))
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == LAYOUT[family](config)
    params = sum(p.numel() for p in model.parameters())
    assert abs(params - {"llada": 8.02e9, "dream": 7.62e9}[family]) < 0.01e9
    assert model.head_dim == 128 and model.mask_id == config["mask_token_id"]


# -- loading --------------------------------------------------------------------------------


@pytest.mark.parametrize("shards", [1, 2])
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_upstream_layout_loads_with_every_key(tmp_path: Path, family: str, shards: int) -> None:
    state = _random_state(LAYOUT[family](SMALL[family]))
    folder = _write_folder(tmp_path / family, SMALL[family], state, shards)
    assert detect_family(folder) == family
    model, tok = load_dlm_folder(folder, dtype=torch.float64)
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for k, v in state.items():
        assert loaded[k].dtype == torch.float64 and torch.equal(loaded[k].float(), v), k
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.config.extra["auto_map"] == {"AutoModel": "x"}
    assert (tok.mask_token_id, tok.eos_token_id, tok.pad_token_id) == (250, 251, 251)
    assert tok.encode("hello world") == [1, 2]
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "CONFIG hi"
    ids = torch.tensor([[1, 2, 250, 250]])
    assert model(ids).shape == (1, 4, 256)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_a_folder_with_a_chat_template_generates(tmp_path: Path, family: str) -> None:
    """transformers returns the chat ids as a BatchEncoding; the prompt is its input_ids."""
    state = _random_state(LAYOUT[family](SMALL[family]))
    pipe = diffcache.load_model(_write_folder(tmp_path / family, SMALL[family], state))
    assert pipe.encode(["hello world"], None) == [[0, 1, 2]]  # "CONFIG hello world"
    assert pipe.encode(["hello world"], False) == [[1, 2]]
    out = pipe("hello world", gen_length=4, steps=4)
    assert out.prompt_len == 3 and out.tokens.shape == (1, 7)  # the chat prompt, then 4


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_published_plan_accelerates_a_folder_loaded_in_bf16(tmp_path: Path, family: str) -> None:
    """The issue's user story: ``from_pretrained(folder, torch_dtype=torch.bfloat16)``, the
    published plan (``llada.yaml``: Elastic-Cache; ``dream.yaml``: dKV-Cache), then a call at
    gen_length 256 in blocks of 32 (the published plans hold for any length)."""
    from diffcache.pipelines.dream import DreamPipeline
    from diffcache.pipelines.llada import LLaDAPipeline

    state = _random_state(LAYOUT[family](SMALL[family]))
    folder = _write_folder(tmp_path / family, SMALL[family], state)
    cls = {"llada": LLaDAPipeline, "dream": DreamPipeline}[family]
    pipe = diffcache.accelerate(cls.from_pretrained(folder, torch_dtype=torch.bfloat16),
                                plan=f"{family}.yaml")  # fmt: skip
    blocks = {"block_length": 32} if family == "llada" else {}
    out = pipe("What is 12*7?", gen_length=256, steps=256, **blocks)
    assert out.tokens.shape[1] == out.prompt_len + 256
    stats = diffcache.stats(pipe)
    assert stats.method == {"llada": "elastic_cache", "dream": "dkv_cache"}[family]
    assert 0 < stats.compute_fraction < 1


def test_mismatched_weights_are_refused_naming_every_tensor(tmp_path: Path) -> None:
    state = _random_state(llada_layout(LLADA_SMALL))
    del state["model.transformer.blocks.1.up_proj.weight"]
    state["model.transformer.blocks.0.k_proj.weight"] = torch.zeros(16, 32)
    state["model.transformer.blocks.0.q_norm.weight"] = torch.zeros(32)
    folder = _write_folder(tmp_path / "bad", LLADA_SMALL, state)
    with pytest.raises(UnsupportedModelError) as e:
        load_dlm_folder(folder)
    msg = str(e.value)
    assert "1 missing: model.transformer.blocks.1.up_proj.weight" in msg
    assert "1 unexpected: model.transformer.blocks.0.q_norm.weight" in msg
    assert "model.transformer.blocks.0.k_proj.weight expected (32, 32) found (16, 32)" in msg

    few = {k: v for k, v in state.items() if "blocks" not in k}  # 18 block tensors missing
    folder = _write_folder(tmp_path / "few", LLADA_SMALL, few)
    with pytest.raises(UnsupportedModelError, match=r"18 missing: .* and 10 more"):
        load_dlm_folder(folder)


def _damaged(tmp_path: Path, name: str, family: str = "llada") -> Path:
    state = _random_state(LAYOUT[family](SMALL[family]))
    return _write_folder(tmp_path / name, SMALL[family], state)


def test_damaged_folders_are_refused_naming_the_file(tmp_path: Path) -> None:
    """Each damage is one UnsupportedModelError naming what is wrong (the CLI's one line)."""
    bad_json = _damaged(tmp_path, "bad-json")
    (bad_json / "config.json").write_text("{not json")
    string_width = _damaged(tmp_path, "string-width")
    (string_width / "config.json").write_text(json.dumps({**LLADA_SMALL, "d_model": "64"}))
    listed = _damaged(tmp_path, "listed")
    (listed / "config.json").write_text("[1, 2]")
    tokenizer = _damaged(tmp_path, "tokenizer")
    (tokenizer / "tokenizer.json").write_text("garbage")
    integer = tmp_path / "integer"
    state = _random_state(LAYOUT["llada"](LLADA_SMALL))
    state["model.transformer.ln_f.weight"] = torch.zeros(32, dtype=torch.int32)
    _write_folder(integer, LLADA_SMALL, state)
    cases = {
        bad_json: r"bad-json/config.json: cannot be read \(JSONDecodeError",
        string_width: r"config.json: does not describe a llada model \(TypeError",
        listed: r"no loader recognises this folder \(diffusers: model_index.json; llada: config",
        tokenizer: r"tokenizer: the tokenizer files cannot be loaded",
        integer: r"1 weight\(s\) are not floating point: model.transformer.ln_f.weight \(I32\)",
    }
    for folder, message in cases.items():
        with pytest.raises(UnsupportedModelError, match=message):
            diffcache.load_model(folder)


def test_a_folder_of_the_other_family_is_named(tmp_path: Path) -> None:
    from diffcache.pipelines.llada import LLaDAPipeline

    with pytest.raises(UnsupportedModelError, match="a dream checkpoint .*, not a llada one"):
        LLaDAPipeline.from_pretrained(_damaged(tmp_path, "dream", "dream"))


def test_tied_dream_head_may_be_absent_and_shares_the_embedding(tmp_path: Path) -> None:
    config = {**DREAM_SMALL, "tie_word_embeddings": True}
    state = _random_state(dream_layout(config))
    del state["lm_head.weight"]
    model, _ = load_dlm_folder(_write_folder(tmp_path / "tied", config, state))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, state["model.embed_tokens.weight"])


def test_tokenizer_files(tmp_path: Path) -> None:
    folder = tmp_path / "tok"
    folder.mkdir()
    with pytest.raises(UnsupportedModelError, match="no tokenizer.json"):
        load_dlm_tokenizer(folder)
    _write_tokenizer(folder, template_file=True)
    tok = load_dlm_tokenizer(folder)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "FILE x"


def test_vocab_and_merges_tokenizer(tmp_path: Path) -> None:
    """Dream ships vocab.json + merges.txt (no tokenizer.json): byte-level BPE, added tokens."""
    from tokenizers import pre_tokenizers

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({"he": 256, "hel": 257, "Ġw": 258})
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\nh e\nhe l\nĠ w\n")
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<|endoftext|>": 259, "<|mask|>": 260}))
    config = {
        "eos_token": "<|endoftext|>",
        "mask_token": "<|mask|>",
        "added_tokens_decoder": {"261": {"content": "<tool>", "special": False}},
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_dlm_tokenizer(tmp_path)
    ids = tok.encode("hello world<|mask|><tool>")
    assert ids[:2] == [257, vocab["l"]] and vocab["o"] in ids and 258 in ids
    assert ids[-2:] == [260, 261] and (tok.eos_token_id, tok.mask_token_id) == (259, 260)
    assert tok.decode(ids) == "hello world<|mask|><tool>"
    assert tok.decode(ids, skip_special_tokens=True) == "hello world<tool>"


def test_config_round_trip_and_refusals() -> None:
    c = LLaDAConfig.from_dict({**LLADA_8B, "n_kv_heads": None})
    assert c.kv_heads == 32 and c.eot_token_id == 126348 and c.extra["init_fn"] == "mitchell"
    assert LLaDAConfig.from_dict(c.to_dict()) == c
    d = DreamConfig.from_dict(DREAM_7B)
    assert DreamConfig.from_dict(d.to_dict()) == d and d.extra["sliding_window"] == 131072
    bad = {**LLADA_8B, "block_type": "sequential", "alibi": True, "weight_tying": True}
    with pytest.raises(UnsupportedModelError) as e:
        LLaDAConfig.from_dict(bad)
    assert all(k in str(e.value) for k in ("block_type", "alibi", "weight_tying"))
    with pytest.raises(UnsupportedModelError, match="rope_scaling"):
        DreamConfig.from_dict({**DREAM_7B, "rope_scaling": {"rope_type": "yarn", "factor": 4}})
    assert detect_family(Path("/nonexistent")) is None


@pytest.mark.parametrize(
    "config,width,heads,kv_heads",
    [
        (LLaDAConfig, "d_model", "n_heads", "n_kv_heads"),
        (DreamConfig, "hidden_size", "num_attention_heads", "num_key_value_heads"),
    ],
)
def test_size_refusals_name_the_family_fields(
    config: type, width: str, heads: str, kv_heads: str
) -> None:
    """Both families refuse each bad size by its own config.json name; zero key/value heads is
    one of them (it was a ZeroDivisionError for LLaDA and silently MHA for Dream)."""
    with pytest.raises(UnsupportedModelError) as e:
        config(**{width: 30, heads: 4, kv_heads: 0})
    message = str(e.value)
    assert f"{width}=30 not divisible by {heads}=4" in message
    assert f"head_dim={30 // 4} (needs an even head_dim)" in message
    assert f"{kv_heads}=0 (must divide {heads}=4)" in message


# -- numerics -------------------------------------------------------------------------------


def test_rope_is_the_half_split_rotation_and_relative() -> None:
    hd, theta = 8, 10000.0
    x = torch.randn(1, 1, 3, hd)
    pos = torch.tensor([[0, 1, 5]])
    cos, sin = rope_cos_sin(pos, hd, theta)
    assert cos.dtype == torch.float32 and cos.shape == (1, 3, hd)
    out = apply_rope(x, cos, sin)
    assert torch.equal(out[:, :, 0], x[:, :, 0])  # position 0 is the identity
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angle = 5 * inv
    x1, x2 = x[0, 0, 2, : hd // 2].double(), x[0, 0, 2, hd // 2 :].double()
    want = torch.cat((x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()))
    torch.testing.assert_close(out[0, 0, 2].double(), want, atol=1e-5, rtol=0)
    # q.k depends on the position difference only
    q, k = torch.randn(2, 1, 1, 1, hd).unbind(0)
    dots = []
    for shift in (0, 7):
        c, s = rope_cos_sin(torch.tensor([[3 + shift, 1 + shift]]), hd, theta)
        dots.append((apply_rope(q, c[:, :1], s[:, :1]) * apply_rope(k, c[:, 1:], s[:, 1:])).sum())
    torch.testing.assert_close(dots[0], dots[1], atol=1e-5, rtol=0)


BUILD = {"llada": build_tiny_llada, "dream": build_tiny_dream}


@pytest.fixture(scope="module")
def micro() -> dict[str, Any]:
    return {f: BUILD[f](micro=True)[0] for f in BUILD}


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_subset_rows_with_scattered_kv_equal_the_full_forward(micro: dict, family: str) -> None:
    model = micro[family]
    ids = torch.randint(0, 240, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    keys = mask.bool()[:, None, None, :]
    rows = torch.tensor([1, 4, 5, 11])
    with torch.no_grad():
        h = model.embed(ids)
        cos, sin = model.rope(pos)
        for layer in model.blocks():
            full = layer(h, cos, sin, keys)
            _, k, v = layer.qkv(h, cos, sin)
            q_s, k_s, v_s = layer.qkv(h[:, rows], cos[:, rows], sin[:, rows])
            k, v = k.clone(), v.clone()
            k[:, :, rows], v[:, :, rows] = k_s, v_s
            sub = layer.finish(h[:, rows], layer.attend(q_s, k, v, keys))
            assert torch.equal(sub, full[:, rows])
            h = full
        assert torch.equal(model.head(h), model(ids, mask))


@pytest.mark.parametrize("dtype,exact", [(torch.float32, False), (torch.float64, True)])
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_left_padded_row_equals_the_row_alone(
    micro: dict, family: str, dtype: torch.dtype, exact: bool
) -> None:
    model = copy.deepcopy(micro[family]).to(dtype)
    row = torch.randint(0, 240, (1, 8))
    other = torch.randint(0, 240, (1, 11))
    pad = model.config.pad_token_id
    batch = torch.cat([torch.cat([torch.full((1, 3), pad), row], 1), other])
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[0, :3] = 0
    with torch.no_grad():
        alone, padded, unpadded = model(row), model(batch, mask), model(other)
        assert torch.equal(unpadded, model(other, torch.ones(1, 11, dtype=torch.long)))
    if exact:
        assert torch.equal(padded[0, 3:], alone[0])
    else:
        torch.testing.assert_close(padded[0, 3:], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(padded[1], unpadded[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_bf16_forward_is_finite(family: str) -> None:
    model, tok = BUILD[family](dtype=torch.bfloat16)
    ids = torch.tensor([tok.encode("1+1=") + [model.mask_id] * 4])
    with torch.no_grad():
        logits = model(ids, torch.ones_like(ids))
    assert logits.dtype == torch.bfloat16 and logits.shape == (1, 8, model.vocab_size)
    assert torch.isfinite(logits).all()


def test_dream_gqa_shapes_and_protocol(micro: dict) -> None:
    model, tok = build_tiny_dream()
    assert (model.num_heads, model.num_kv_heads, model.head_dim) == (4, 2, 8)
    assert (model.logit_shift, model.mask_id, model.vocab_size, model.num_layers) == (
        1, 151666, 152064, 2,
    )  # fmt: skip
    layer = model.blocks()[0]
    h = model.embed(torch.tensor([[1, 2, 3, 151666, 151666]]))
    cos, sin = model.rope(torch.arange(5)[None])
    q, k, v = layer.qkv(h, cos, sin)
    assert q.shape == (1, 4, 5, 8) and k.shape == v.shape == (1, 2, 5, 8)
    assert layer.attend(q, k, v, None).shape == (1, 5, 32)
    assert model.head(h).shape == (1, 5, 152064)
    llada = micro["llada"]
    assert (llada.logit_shift, llada.num_kv_heads, llada.mask_id) == (0, 4, 250)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_tiny_builders_are_deterministic_and_round_trip(tmp_path: Path, family: str) -> None:
    rng = torch.random.get_rng_state()
    (a, tok), (b, _) = BUILD[family](), BUILD[family]()
    assert torch.equal(rng, torch.random.get_rng_state()), "builder moved the global RNG"
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    other = BUILD[family](seed=1)[0].state_dict()
    assert not any(torch.equal(sa[k], other[k]) for k in sa if "norm" not in k)
    special = {"llada": (126336, 126081, 126081), "dream": (151666, 151643, 151643)}[family]
    assert (tok.mask_token_id, tok.eos_token_id, tok.pad_token_id) == special
    assert a.mask_id == special[0] and len(tok) == a.vocab_size
    # save as a model folder (config.json + safetensors + char_tokenizer.json) and load it back
    folder = tmp_path / family
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(a.config.to_dict()))
    save_file(sa, str(folder / "model.safetensors"))
    tok.save(folder)
    model, loaded_tok = load_dlm_folder(folder)
    assert loaded_tok == tok
    ids = torch.tensor([tok.encode("2*3=6") + [a.mask_id] * 3])
    with torch.no_grad():
        assert torch.equal(model(ids), a(ids))


@pytest.mark.parametrize("name", ["llada-tiny", "dream-tiny"])
def test_a_prompt_the_tokenizer_cannot_encode_is_refused_before_any_model_call(
    name: str, monkeypatch
) -> None:
    from diffcache.pipelines.dlm_pipeline import RequestError

    pipe = diffcache.load_model(name)
    monkeypatch.setattr(pipe.model, "forward", lambda *a, **k: pytest.fail("the model ran"))
    with pytest.raises(RequestError, match=r"^prompt 1 of the batch: character\(s\) 'é' not"):
        pipe(["ok", "é"], gen_length=4)


def test_char_tokenizer() -> None:
    tok = CharTokenizer({"mask": 250, "eos": 251, "pad": 251, "eot": 252}, vocab_size=256)
    ids = tok.encode("a+b=\n")
    assert tok.decode(ids) == "a+b=\n" and len(tok) == 256 and tok.bos_token_id is None
    assert tok.decode([*ids, 250, 251, 252, 200]) == "a+b=\n\ufffd"
    assert tok.decode([250, 251, 252], skip_special_tokens=False) == "<|mask|><|eos|><|eot|>"
    with pytest.raises(ValueError, match=r"character\(s\) 'é', 'ü' not in this model's alphabet"):
        tok.encode("aébüé")
    assert tok.text_problem("a+b=\n") is None
    with pytest.raises(ValueError, match="fall in the character ids"):
        CharTokenizer({"mask": 5})
