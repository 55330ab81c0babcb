"""The BSQ VAE decoder: upstream key names, loading either naming, and a functional
reference of its forward (research/var.md Appendix B: infinity/models/bsq_vae)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffcache.errors import DiffCacheError
from diffcache.pipelines.infinity.bsq import BSQConfig, BSQDecoder, load_bsq_decoder
from diffcache.pipelines.infinity.pipeline import InfinityPipeline

SMALL = BSQConfig(d=4, ch_mult=(1, 2, 2), patch=4, ch=32)
RES = ("norm1.norm", "conv1.conv", "norm2.norm", "conv2.conv")


def test_key_names_are_upstreams():
    names = {k.rsplit(".", 1)[0] for k in BSQDecoder(SMALL).state_dict()}
    expect = {"decoder." + k for k in ("conv_in.conv", "norm_out.norm", "conv_out.conv")}
    expect |= {f"decoder.mid.block_{i}.{m}" for i in (1, 2) for m in RES}
    width = 32 * 2  # ch * ch_mult[-1]
    for level in (2, 1, 0):  # run from the last level; 3 blocks each
        out = 32 * SMALL.ch_mult[level]
        for i in range(3):
            expect |= {f"decoder.up.{level}.block.{i}.{m}" for m in RES}
            if width != out:
                expect.add(f"decoder.up.{level}.block.{i}.nin_shortcut.conv")
            width = out
        if level in (1, 2):  # log2(patch 4) = 2 upsamplings
            expect.add(f"decoder.up.{level}.upsample.conv.conv")
    assert names == expect


def reference(w: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    """The decoder written out: group norm (32 groups, eps 1e-6), x * sigmoid(x), 3x3 convs,
    nearest 2x upsampling, clamp to [-1, 1]."""

    def conv(name, x):
        weight = w[f"decoder.{name}.conv.weight"]
        return F.conv2d(x, weight, w[f"decoder.{name}.conv.bias"], padding=weight.shape[-1] // 2)

    def norm(name, x):
        g = w[f"decoder.{name}.norm.weight"]
        return F.group_norm(x, 32, g, w[f"decoder.{name}.norm.bias"], 1e-6)

    def act(x):
        return x * torch.sigmoid(x)

    def res(name, x):
        h = conv(
            f"{name}.conv2",
            act(norm(f"{name}.norm2", conv(f"{name}.conv1", act(norm(f"{name}.norm1", x))))),
        )
        skip = f"decoder.{name}.nin_shortcut.conv.weight"
        return (conv(f"{name}.nin_shortcut", x) if skip in w else x) + h

    h = res("mid.block_2", res("mid.block_1", conv("conv_in", z)))
    for level in (2, 1, 0):
        for i in range(3):
            h = res(f"up.{level}.block.{i}", h)
        if level:
            h = conv(
                f"up.{level}.upsample.conv", h.repeat_interleave(2, -1).repeat_interleave(2, -2)
            )
    return conv("conv_out", act(norm("norm_out", h))).clamp(-1, 1)


def test_decode_matches_the_reference():
    torch.manual_seed(0)
    model = BSQDecoder(SMALL).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    z = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    out = model.decode(z)
    assert out.shape == (2, 3, 12, 20)
    torch.testing.assert_close(out, reference(model.state_dict(), z), rtol=0, atol=1e-12)
    assert out.abs().max() == 1  # clamped


def _bare(key: str) -> str:
    """A key as a checkpoint of plain nn.Conv2d / nn.GroupNorm modules names it."""
    return (
        key.replace(".conv.weight", ".weight")
        .replace(".conv.bias", ".bias")
        .replace(".norm.weight", ".weight")
        .replace(".norm.bias", ".bias")
    )


@pytest.mark.parametrize("bare", [False, True])
def test_load_either_naming_from_the_vae_entry(tmp_path, bare):
    torch.manual_seed(1)
    src = BSQDecoder(SMALL)
    state = {(_bare(k) if bare else k): v for k, v in src.state_dict().items()}
    state["encoder.conv_in.conv.weight"] = torch.zeros(1)  # the rest of the AutoEncoder
    path = tmp_path / "vae.pth"
    torch.save({"vae": state}, path)
    loaded = load_bsq_decoder(path, SMALL)
    for k, v in src.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_missing_decoder_keys_in_one_line(tmp_path):
    state = BSQDecoder(SMALL).state_dict()
    del state["decoder.conv_out.conv.bias"]
    path = tmp_path / "vae.pth"
    torch.save(state, path)
    with pytest.raises(DiffCacheError) as err:
        load_bsq_decoder(path, SMALL)
    assert "\n" not in str(err.value) and "1 missing: decoder.conv_out.conv.bias" in str(err.value)


def test_from_pretrained_names_the_missing_files(tmp_path):
    (tmp_path / "infinity_2b_reg.pth").write_bytes(b"")
    with pytest.raises(DiffCacheError) as err:
        InfinityPipeline.from_pretrained(tmp_path)
    assert "no infinity_vae_d32reg.pth, flan-t5-xl" in str(err.value)
