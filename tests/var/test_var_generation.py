"""VAR generation against a naive loop written from research/var.md §1.1.2-§1.1.3 (its own
torch.cat K/V cache, its own block arithmetic), the history seam, the driver's events, request
errors and the CLI (§3.2 item 1)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import imageio.v3 as iio
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffcache.cli import main
from diffcache.kv.history import FullHistory, History, ScaleCall
from diffcache.pipelines.dlm_pipeline import RequestError
from diffcache.pipelines.var import VARPipeline, build_tiny

# var-tiny's four scales sit at si/3 = 0, 1/3, 2/3, 1: nearest ticks of linspace(1/12, 11/12, 4)
PHI_OF_SCALE = (0, 1, 2, 3)


def _adaln(linear: torch.nn.Linear, cond: torch.Tensor, chunks: int) -> tuple[torch.Tensor, ...]:
    c = linear.weight.shape[1]
    return F.linear(F.silu(cond), linear.weight, linear.bias).view(-1, 1, chunks, c).unbind(2)


def reference(
    pipe: VARPipeline, labels: list[int], cfg: float, top_k: int, top_p: float, seed: int, keep_of
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Generator]:
    """Per-scale indices, per-scale logits (before CFG), the final f_hat and the generator."""
    model, quant = pipe.transformer, pipe.vae.quantize
    config = model.config
    c, heads, sides = config.embed_dim, config.num_heads, config.patch_nums
    d, b, last = c // heads, len(labels), sides[-1]
    gen = torch.Generator().manual_seed(seed)
    rows = labels + [config.num_classes] * b if cfg > 0 else labels
    cond = model.class_emb.weight[rows]
    lvl_pos = model.lvl_embed.weight[model.lvl_1L[0]] + model.pos_1LC[0]  # [L, C]
    x = cond[:, None] + model.pos_start + lvl_pos[:1]
    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    f_hat = torch.zeros(b, config.z_channels, last, last, dtype=cond.dtype)
    all_idx, all_logits, start = [], [], 0
    for si, pn in enumerate(sides):
        n = x.shape[1]
        for i, block in enumerate(model.blocks):
            g1, g2, s1, s2, t1, t2 = _adaln(block.ada_lin[1], cond, 6)
            attn = block.attn
            h = F.layer_norm(x, (c,), eps=1e-6) * (1 + s1) + t1
            bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
            qkv = F.linear(h, attn.mat_qkv.weight, bias).view(len(rows), n, 3, heads, d)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            q = F.normalize(q, dim=-1) * attn.scale_mul_1H11.clamp_max(math.log(100)).exp()
            k = F.normalize(k, dim=-1)
            if i in cache:
                k, v = torch.cat([cache[i][0], k], 2), torch.cat([cache[i][1], v], 2)
            cache[i] = (k, v)
            a = F.scaled_dot_product_attention(q, k, v, scale=1.0).transpose(1, 2)
            x = x + F.linear(a.reshape(len(rows), n, c), attn.proj.weight, attn.proj.bias) * g1
            h = F.layer_norm(x, (c,), eps=1e-6) * (1 + s2) + t2
            ffn = block.ffn
            hidden = F.gelu(F.linear(h, ffn.fc1.weight, ffn.fc1.bias), approximate="tanh")
            x = x + F.linear(hidden, ffn.fc2.weight, ffn.fc2.bias) * g2
        scale, shift = _adaln(model.head_nm.ada_lin[1], cond, 2)
        h = F.layer_norm(x, (c,), eps=1e-6) * (1 + scale) + shift
        logits = F.linear(h, model.head.weight, model.head.bias)
        all_logits.append(logits)
        if cfg > 0:
            t = cfg * si / (len(sides) - 1)
            logits = (1 + t) * logits[:b] - t * logits[b:]
        keep = torch.zeros_like(logits, dtype=torch.bool)
        for r in range(b):
            for j in range(n):
                keep[r, j, sorted(keep_of(logits[r, j].tolist(), top_k, top_p))] = True
        probs = logits.masked_fill(~keep, -torch.inf).softmax(-1)
        idx = torch.multinomial(probs.view(b * n, -1), 1, generator=gen).view(b, n)
        all_idx.append(idx)
        codes = quant.embedding.weight[idx].transpose(1, 2).reshape(b, -1, pn, pn)
        if si < len(sides) - 1:
            codes = F.interpolate(codes, size=(last, last), mode="bicubic")
        conv = quant.quant_resi.qresi_ls[PHI_OF_SCALE[si]]
        phi = 0.5 * codes + 0.5 * F.conv2d(codes, conv.weight, conv.bias, padding=1)
        f_hat = f_hat + phi
        start += pn * pn
        if si < len(sides) - 1:
            nxt = sides[si + 1]
            small = F.interpolate(f_hat, size=(nxt, nxt), mode="area").flatten(2).transpose(1, 2)
            emb = model.word_embed
            x = F.linear(small, emb.weight, emb.bias) + lvl_pos[start : start + nxt * nxt]
            x = torch.cat([x, x]) if cfg > 0 else x
    return all_idx, all_logits, f_hat, gen


@pytest.fixture(scope="module")
def pipe64() -> VARPipeline:
    return build_tiny().to("cpu", torch.float64)


@pytest.mark.parametrize("labels", [[3], [0, 9, 3]], ids=["batch1", "batch3"])
@pytest.mark.parametrize("cfg", [2.0, 0.0], ids=["cfg", "nocfg"])
def test_full_history_equals_a_naive_cat_loop(pipe64, labels, cfg, keep_of) -> None:
    """FullHistory through the seam is the plain model: indices equal, logits exact (float64),
    the same f_hat and the generator left in the same state (no hidden draws)."""
    logits: list[torch.Tensor] = []
    hook = pipe64.transformer.register_forward_hook(lambda m, a, out: logits.append(out))
    gen = torch.Generator().manual_seed(7)
    try:
        out = pipe64(labels, cfg=cfg, top_k=12, top_p=0.9, generator=gen)
    finally:
        hook.remove()
    want_idx, want_logits, want_f_hat, want_gen = reference(
        pipe64, labels, cfg, 12, 0.9, 7, keep_of
    )
    assert len(out.indices) == 4
    for si in range(4):
        assert torch.equal(out.indices[si], want_idx[si]), si
        torch.testing.assert_close(logits[si], want_logits[si], rtol=0, atol=0)
    torch.testing.assert_close(out.f_hat, want_f_hat, rtol=0, atol=0)
    assert torch.equal(gen.get_state(), want_gen.get_state())
    assert isinstance(pipe64.last_history, FullHistory)
    assert pipe64.last_history.k[0].shape == (len(labels) * (2 if cfg else 1), 2, 30, 32)


def test_cfg_rows_are_conditional_first(pipe64) -> None:
    """With CFG the transformer sees the labels then as many null-class rows; without, only the
    labels."""
    seen: list[torch.Tensor] = []
    hook = pipe64.transformer.class_emb.register_forward_hook(lambda m, a, out: seen.append(a[0]))
    try:
        pipe64([4, 2], cfg=1.0, seed=0)
        pipe64([4, 2], cfg=0.0, seed=0)
    finally:
        hook.remove()
    assert [s.tolist() for s in seen] == [[4, 2, 10, 10], [4, 2]]


class Recording(FullHistory):
    """FullHistory that keeps each call and checks the raw query: with cosine attention,
    ``q = normalize(raw + q_bias) * temperature``."""

    def __init__(self, pipe: VARPipeline) -> None:
        super().__init__()
        self.pipe, self.calls = pipe, []

    def attend(self, call: ScaleCall, q, k, v):
        attn = self.pipe.transformer.blocks[call.layer].attn
        bias = attn.q_bias.view(1, -1, 1, q.shape[-1])
        temp = attn.scale_mul_1H11.clamp_max(math.log(100)).exp()
        want = F.normalize(call.raw_query() + bias, dim=-1) * temp
        torch.testing.assert_close(q, want, rtol=0, atol=1e-12)
        self.calls.append((call.layer, call.si, call.cond_rows, call.scale, q.shape[2]))
        return super().attend(call, q, k, v)


def test_the_seam_and_the_driver_events(pipe64) -> None:
    """Each scale is a step: begin_run(4), then per scale begin_step before that scale's
    transformer call, then end_run; every layer of every scale calls the store once."""
    events: list[Any] = []
    recording: list[Recording] = []

    class Watched(VARPipeline):
        def begin_run(self, num_steps, **facts):
            events.append(("run", num_steps))

        def begin_step(self):
            events.append("step")

        def end_run(self):
            events.append("end")

        def history_store(self) -> History:
            recording.append(Recording(self))
            return recording[-1]

    pipe = Watched(pipe64.transformer, pipe64.vae)
    with torch.no_grad():
        blocks = pipe.transformer.blocks
        saved = blocks[1].attn.q_bias.clone()
        blocks[1].attn.q_bias.normal_()  # a nonzero bias, so raw_query really omits it
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a: events.append("forward"))
    try:
        pipe([1, 5, 6], cfg=1.5, seed=0)
    finally:
        hook.remove()
        with torch.no_grad():
            blocks[1].attn.q_bias.copy_(saved)
    assert events == [("run", 4)] + ["step", "forward"] * 4 + ["end"]
    tokens = (1, 4, 9, 16)
    assert recording[0].calls == [(i, si, 3, 1.0, tokens[si]) for si in range(4) for i in (0, 1)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"class_labels": [3, 10]}, r"class label\(s\) \[10\] out of range: .*classes 0\.\.9"),
        ({"class_labels": [-1]}, r"class label\(s\) \[-1\] out of range"),
        ({"class_labels": [2], "top_p": 1.5}, r"top_p must be a number in \[0, 1\]"),
        ({"class_labels": [2], "top_k": -1}, r"top_k must be a whole number >= 0"),
        ({"class_labels": [2], "cfg": math.nan}, r"cfg must be a finite number >= 0"),
        ({"class_labels": [2], "seed": -1}, r"seed must be a whole number >= 0, got -1"),
        (
            {"class_labels": [2], "seed": 1, "generator": torch.Generator()},
            r"give seed or generator, not both",
        ),
    ],
)
def test_bad_requests_fail_before_the_model_runs(pipe64, kwargs, message) -> None:
    def refuse(*args):
        raise AssertionError("the transformer ran")

    hook = pipe64.transformer.register_forward_pre_hook(refuse)
    try:
        with pytest.raises(RequestError, match=message):
            pipe64(**kwargs)
    finally:
        hook.remove()


def test_cli_generate_var_tiny(tmp_path: Path, capsys) -> None:
    """``diffcache generate --model var-tiny --class-label 3`` writes the image the pipeline
    makes with the model's defaults (cfg 1.5) and seed 0; an out-of-range label is one error
    line, exit 2."""
    out = tmp_path / "x.png"
    assert main(["generate", "--model", "var-tiny", "--class-label", "3", "--out", str(out)]) == 0
    image = build_tiny()([3], cfg=1.5, seed=0).images[0]
    assert np.array_equal(iio.imread(out), (np.clip(image, 0, 1) * 255).round().astype(np.uint8))
    capsys.readouterr()
    argv = ["generate", "--model", "var-tiny", "--class-label", "12", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == "diffcache: error: --class-label must be <= 9 for this model, got 12"


def test_more_smooth_mixes_only_the_kept_codes(pipe64) -> None:
    """``more_smooth`` feeds forward a Gumbel-softmax mixture of the codes sampling keeps
    (upstream mixes over the filtered logits): with top_k=1 only the best code is kept, so
    the mixture is that code and the image is the greedy one."""
    greedy = pipe64([2, 6], cfg=2.0, top_k=1, seed=0)
    smooth = pipe64([2, 6], cfg=2.0, top_k=1, seed=0, more_smooth=True)
    assert all(torch.equal(a, b) for a, b in zip(greedy.indices, smooth.indices, strict=True))
    torch.testing.assert_close(smooth.f_hat, greedy.f_hat, rtol=0, atol=0)
