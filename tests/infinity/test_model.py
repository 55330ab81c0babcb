"""The transformer's state-dict names (research/var.md §1.2.4), chunk mapping and loading."""

from __future__ import annotations

import pytest
import torch

from diffcache.errors import DiffCacheError
from diffcache.pipelines.infinity.config import CONFIGS
from diffcache.pipelines.infinity.model import Infinity, flat_layer, init_random, load_transformer

TINY = CONFIGS["infinity_tiny"]

BLOCK = """sa.mat_qkv.weight sa.q_bias sa.v_bias sa.zero_k_bias sa.scale_mul_1H11 sa.proj.weight
sa.proj.bias ca.mat_q.weight ca.mat_q.bias ca.mat_kv.weight ca.v_bias ca.zero_k_bias
ca.proj.weight ca.proj.bias ca_norm.weight ca_norm.bias ffn.fc1.weight ffn.fc1.bias
ffn.fc2.weight ffn.fc2.bias ada_gss""".split()
GLOBAL = """text_norm.weight text_proj_for_sos.ca.mat_q text_proj_for_sos.ca.mat_kv.weight
text_proj_for_sos.ca.v_bias text_proj_for_sos.ca.zero_k_bias text_proj_for_sos.ca.proj.weight
text_proj_for_sos.ca.proj.bias text_proj_for_ca.0.weight text_proj_for_ca.0.bias
text_proj_for_ca.2.weight text_proj_for_ca.2.bias cfg_uncond pos_start lvl_embed.weight
word_embed.weight word_embed.bias shared_ada_lin.1.weight shared_ada_lin.1.bias
head_nm.ada_lin.1.weight head_nm.ada_lin.1.bias head.weight head.bias""".split()


def test_state_dict_names_are_upstreams():
    state = Infinity(TINY).state_dict()
    per = TINY.depth // TINY.block_chunks
    expect = set(GLOBAL) | {
        f"block_chunks.{c}.module.{j}.{name}"
        for c in range(TINY.block_chunks)
        for j in range(per)
        for name in BLOCK
    }
    assert set(state) == expect
    c, heads = TINY.embed_dim, TINY.num_heads
    assert state["lvl_embed.weight"].shape == (15, c)
    assert state["head.weight"].shape == (2 * TINY.d_vae, c)
    assert state["block_chunks.0.module.0.sa.scale_mul_1H11"].shape == (1, heads, 1, 1)
    assert state["block_chunks.0.module.0.ada_gss"].shape == (1, 1, 6, c)
    assert state["cfg_uncond"].shape == (TINY.text_maxlen, TINY.text_channels)
    # the pool: one head of width 128 per 128 T5 channels, over the model width
    assert state["text_proj_for_sos.ca.mat_q"].shape == (1, 1, c)


@pytest.mark.parametrize("name, heads", [("infinity_2b", 16), ("infinity_8b", 16)])
def test_pool_heads_of_the_real_models(name, heads):
    assert CONFIGS[name].pool_heads == heads  # T5-XL width 2048 over head width 128


def test_chunks_map_to_flat_layers():
    model = Infinity(TINY)
    per = TINY.depth // TINY.block_chunks
    assert [b.sa.layer for b in model.layers] == list(range(TINY.depth))
    params = dict(model.named_parameters())
    for c in range(TINY.block_chunks):
        for j in range(per):
            key = f"block_chunks.{c}.module.{j}.sa.mat_qkv.weight"
            assert flat_layer(key, per) == c * per + j
            assert params[key] is model.layers[c * per + j].sa.mat_qkv.weight
    assert flat_layer("head.weight", per) is None


def test_strict_round_trip(tmp_path):
    a, b = init_random(Infinity(TINY), 1), init_random(Infinity(TINY), 2)
    path = tmp_path / "w.pth"
    torch.save(a.state_dict(), path)
    load_transformer(b, path)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_missing_and_unexpected_keys_in_one_line(tmp_path):
    state = init_random(Infinity(TINY), 1).state_dict()
    del state["block_chunks.1.module.0.ffn.fc2.bias"]
    state["blocks.0.attn.mat_qkv.weight"] = torch.zeros(1)
    path = tmp_path / "w.pth"
    torch.save(state, path)
    with pytest.raises(DiffCacheError) as err:
        load_transformer(Infinity(TINY), path)
    msg = str(err.value)
    assert "\n" not in msg
    assert "1 missing: block_chunks.1.module.0.ffn.fc2.bias" in msg
    assert "1 unexpected: blocks.0.attn.mat_qkv.weight" in msg


def test_sharded_checkpoint_loads_through_transformers(tmp_path):
    import json

    a = init_random(Infinity(TINY), 3)
    state = a.state_dict()
    keys = list(state)
    shards = {"s1.bin": keys[: len(keys) // 2], "s2.bin": keys[len(keys) // 2 :]}
    for name, part in shards.items():
        torch.save({k: state[k] for k in part}, tmp_path / name)
    index = {"metadata": {}, "weight_map": {k: n for n, part in shards.items() for k in part}}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    b = load_transformer(init_random(Infinity(TINY), 4), tmp_path)
    assert all(torch.equal(x, b.state_dict()[k]) for k, x in state.items())
