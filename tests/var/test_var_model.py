"""VAR's modules: upstream state-dict names, configs from depth, Phi tick choice, sampler keep
sets (research/var.md §1.1.1, §1.1.2, §3.1)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest
import torch

from diffcache.errors import UnsupportedModelError
from diffcache.pipelines.var import VARPipeline, build_tiny
from diffcache.pipelines.var.config import VARConfig
from diffcache.pipelines.var.pipeline import load_strict
from diffcache.pipelines.var.quant import nearest_tick
from diffcache.pipelines.var.sampling import keep_mask
from diffcache.pipelines.var.transformer import VARTransformer

# research/var.md §1.1.1: the keys of one block with shared_aln=False
BLOCK_KEYS = {
    "attn.mat_qkv.weight", "attn.q_bias", "attn.v_bias", "attn.zero_k_bias",
    "attn.scale_mul_1H11", "attn.proj.weight", "attn.proj.bias", "ffn.fc1.weight",
    "ffn.fc1.bias", "ffn.fc2.weight", "ffn.fc2.bias", "ada_lin.1.weight", "ada_lin.1.bias",
}  # fmt: skip
TOP_KEYS = {
    "word_embed.weight", "word_embed.bias", "class_emb.weight", "pos_start", "pos_1LC",
    "lvl_embed.weight", "lvl_1L", "attn_bias_for_masking", "head_nm.ada_lin.1.weight",
    "head_nm.ada_lin.1.bias", "head.weight", "head.bias",
}  # fmt: skip


def test_transformer_keys_and_shapes_are_upstreams() -> None:
    config = VARConfig(depth=2, embed_dim=64, num_heads=2, num_classes=10, patch_nums=(1, 2, 3))
    state = VARTransformer(config).state_dict()
    want = TOP_KEYS | {f"blocks.{i}.{k}" for i in range(2) for k in BLOCK_KEYS}
    assert set(state) == want
    c, h, n = 64, 2, 1 + 4 + 9
    assert state["class_emb.weight"].shape == (11, c)  # + the null class
    assert state["pos_1LC"].shape == (1, n, c) and state["pos_start"].shape == (1, 1, c)
    assert state["lvl_embed.weight"].shape == (3, c)
    assert state["blocks.1.attn.mat_qkv.weight"].shape == (3 * c, c)
    assert state["blocks.0.attn.scale_mul_1H11"].shape == (1, h, 1, 1)
    assert state["blocks.0.ada_lin.1.weight"].shape == (6 * c, c)
    assert state["head_nm.ada_lin.1.weight"].shape == (2 * c, c)
    assert state["head.weight"].shape == (4096, c)
    assert state["lvl_1L"].tolist() == [[0] + [1] * 4 + [2] * 9]
    bias = state["attn_bias_for_masking"][0, 0]  # visible iff key scale <= query scale
    scale = state["lvl_1L"][0]
    assert torch.equal(bias == 0, scale[:, None] >= scale[None, :])


def test_shared_aln_keys() -> None:
    config = VARConfig(depth=2, embed_dim=64, num_heads=2, patch_nums=(1, 2), shared_aln=True)
    state = VARTransformer(config).state_dict()
    assert state["blocks.0.ada_gss"].shape == (1, 1, 6, 64)
    assert state["shared_ada_lin.1.weight"].shape == (6 * 64, 64)
    assert not any(k.startswith("blocks.0.ada_lin") for k in state)


@pytest.mark.parametrize(("depth", "params_m"), [(16, 310), (20, 600), (24, 1000), (30, 2000)])
def test_config_from_depth(depth: int, params_m: int) -> None:
    """build_vae_var's rule (heads = depth, width 64 * depth, FFN 4x); the parameter count is
    the README's (rounded there to 2 significant digits) and the per-layer formula's."""
    config = VARConfig.from_depth(depth)
    c = 64 * depth
    assert (config.num_heads, config.embed_dim, config.head_dim, config.ffn_dim) == (
        depth, c, 64, 4 * c,
    )  # fmt: skip
    with torch.device("meta"):
        model = VARTransformer(config)
    count = sum(p.numel() for p in model.parameters())
    block = 3 * c * c + 2 * c + depth + (c * c + c) + (8 * c * c + 5 * c) + (6 * c * c + 6 * c)
    embeds = (32 * c + c) + 1001 * c + c + 680 * c + 10 * c
    head = (2 * c * c + 2 * c) + (4096 * c + 4096)
    assert count == depth * block + embeds + head
    assert count == pytest.approx(params_m * 1e6, rel=0.05)


def test_phi_tick_choice() -> None:
    """Four Phi convs at ticks linspace(1/12, 11/12, 4); scale si of 10 uses the nearest to
    si/9. Exact arithmetic decides all but si = 2 and 7, which sit halfway (2/9 - 1/12 =
    13/36 - 2/9); float64 sends those to ticks 1 and 3, as upstream's numpy code does."""
    ticks = [Fraction(1, 12) + i * Fraction(10, 12) / 3 for i in range(4)]
    for si in range(10):
        dist = [abs(t - Fraction(si, 9)) for t in ticks]
        best = [i for i, d in enumerate(dist) if d == min(dist)]
        if len(best) == 1:
            assert nearest_tick(4, si / 9) == best[0], si
        else:
            assert si in (2, 7) and nearest_tick(4, si / 9) == {2: 1, 7: 3}[si] in best
    # other counts: the centres of equal bins
    assert [nearest_tick(2, si / 3) for si in range(4)] == [0, 0, 1, 1]
    assert [nearest_tick(10, si / 9) for si in range(10)] == list(range(10))


@pytest.mark.parametrize(
    ("top_k", "top_p"), [(0, 0.0), (5, 0.0), (0, 0.7), (6, 0.8), (1, 0.5), (0, 1.0), (40, 0.3)]
)
def test_keep_sets(top_k: int, top_p: float, keep_of) -> None:
    logits = torch.randn(3, 4, 17, dtype=torch.float64) * 2
    keep = keep_mask(logits, top_k, top_p)
    for b in range(3):
        for i in range(4):
            got = set(torch.nonzero(keep[b, i]).flatten().tolist())
            assert got == keep_of(logits[b, i].tolist(), top_k, top_p), (b, i)


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save(state, path)
    return path


def test_strict_load_round_trip(tmp_path: Path) -> None:
    """A saved var-tiny loads into a differently seeded build (built on meta) and generates the
    same images."""
    pipe = build_tiny(seed=0)
    with torch.device("meta"):
        other = build_tiny(seed=1)
    for module, name in ((other.transformer, "var.pth"), (other.vae, "vae.pth")):
        source = getattr(pipe, "transformer" if name == "var.pth" else "vae")
        load_strict(module, _save(source.state_dict(), tmp_path / name))
        for key, value in source.state_dict().items():
            assert torch.equal(module.state_dict()[key], value), key
    a, b = pipe([1, 2], top_k=4, seed=3), other([1, 2], top_k=4, seed=3)
    assert all((x == y).all() for x, y in zip(a.images, b.images, strict=True))


def test_a_missing_and_an_unexpected_key_are_listed_in_one_error(tmp_path: Path) -> None:
    pipe = build_tiny()
    state = pipe.transformer.state_dict()
    state["blocks.0.attn.extra"] = state.pop("blocks.1.attn.q_bias")
    path = _save(state, tmp_path / "var_d2.pth")
    with pytest.raises(UnsupportedModelError) as err:
        load_strict(build_tiny(seed=1).transformer, path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    assert "1 missing: blocks.1.attn.q_bias" in message
    assert "1 unexpected: blocks.0.attn.extra" in message


def test_from_pretrained_names_the_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModelError, match=r"var_d16\.pth: no such checkpoint file"):
        VARPipeline.from_pretrained(tmp_path, depth=16)


@pytest.mark.slow
def test_from_pretrained_loads_released_layouts(tmp_path: Path) -> None:
    """Files with the released names and layouts (a depth-2 transformer by build_vae_var's rule,
    the full-size tokenizer) load strictly through from_pretrained, in the dtype asked."""
    from diffcache.pipelines.var.config import VQVAEConfig
    from diffcache.pipelines.var.vqvae import VQVAE

    transformer = VARTransformer(VARConfig.from_depth(2))
    transformer.init_weights()
    vae = VQVAE(config=VQVAEConfig())
    torch.save(transformer.state_dict(), tmp_path / "var_d2.pth")
    torch.save(vae.state_dict(), tmp_path / "vae_ch160v4096z32.pth")
    pipe = VARPipeline.from_pretrained(tmp_path, depth=2, torch_dtype=torch.float64)
    for source, loaded in ((transformer, pipe.transformer), (vae, pipe.vae)):
        want, got = source.state_dict(), loaded.state_dict()
        assert want.keys() == got.keys()
        for key, value in want.items():
            assert torch.equal(got[key], value.to(got[key].dtype)), key
    assert pipe.transformer.head.weight.dtype == torch.float64
