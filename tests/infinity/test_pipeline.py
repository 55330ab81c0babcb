"""InfinityPipeline: the history seam against upstream's plain concatenation (research/var.md
§3.2 item 1), CFG, batches, the driver hooks and request errors."""

from __future__ import annotations

import pytest
import torch

from diffcache import cli
from diffcache.kv.history import FullHistory, ScaleCall
from diffcache.pipelines.infinity.pipeline import RequestError

PROMPTS = ["a red fox", "two cats on a boat in the rain", "a castle"]


class CatHistory:
    """Upstream's cache written out: per layer ``cached_k = cat(cached_k, k)`` and explicit
    softmax attention; it records the calls."""

    def __init__(self) -> None:
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.calls: list[tuple[int, int, int, int]] = []

    def attend(self, call: ScaleCall, q, k, v):
        self.calls.append((call.layer, call.si, call.cond_rows, k.shape[2]))
        if call.layer in self.k:
            k = torch.cat((self.k[call.layer], k), 2)
            v = torch.cat((self.v[call.layer], v), 2)
        self.k[call.layer], self.v[call.layer] = k, v
        return torch.softmax(q @ k.transpose(-1, -2) * call.scale, -1) @ v


def run(pipe, store_cls, prompts, cfg, seed=5, **kw):
    pipe.history_store = store_cls
    g = torch.Generator().manual_seed(seed)
    out = pipe(prompts, cfg=cfg, generator=g, output_type="codes", **kw)
    return out, g


@pytest.mark.parametrize("cfg", [1.0, 3.0])
@pytest.mark.parametrize("batch", [1, 3])
def test_full_history_equals_plain_concatenation(pipe, cfg, batch):
    pipe.transformer.double()
    prompts = PROMPTS[:batch]
    full, g_full = run(pipe, FullHistory, prompts, cfg)
    stores: list[CatHistory] = []

    def cat_store() -> CatHistory:
        stores.append(CatHistory())
        return stores[-1]

    plain, g_plain = run(pipe, cat_store, prompts, cfg)
    assert len(full.bits) == 5 and full.logits[0].dtype == torch.float64
    for a, b, la, lb in zip(full.bits, plain.bits, full.logits, plain.logits, strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(la, lb, rtol=0, atol=1e-12)
    torch.testing.assert_close(full.codes, plain.codes, rtol=0, atol=0)
    assert torch.equal(g_full.get_state(), g_plain.get_state())  # no hidden draws
    # every layer, every scale once, layers in order; the batch doubled under CFG
    rows = batch * (2 if cfg != 1 else 1)
    calls = stores[0].calls
    sizes = [1, 4, 16, 36, 64]
    assert calls == [(layer, si, batch, sizes[si]) for si in range(5) for layer in range(4)]
    assert stores[0].k[3].shape == (rows, 2, sum(sizes), 32)


def test_full_history_is_bit_exact_with_sdpa_concatenation(pipe):
    class SdpaCat(CatHistory):
        def attend(self, call, q, k, v):
            super().attend(call, q, k, v)
            return torch.nn.functional.scaled_dot_product_attention(
                q, self.k[call.layer], self.v[call.layer], scale=call.scale
            )

    pipe.transformer.double()
    full, _ = run(pipe, FullHistory, PROMPTS[:2], 3.0)
    plain, _ = run(pipe, SdpaCat, PROMPTS[:2], 3.0)
    for la, lb in zip(full.logits, plain.logits, strict=True):
        torch.testing.assert_close(la, lb, rtol=0, atol=0)


def test_cfg_mixes_conditional_and_unconditional_logits(pipe):
    """The first scale's logits do not depend on draws: L(cfg) = cfg Lc + (1 - cfg) Lu, with
    Lc the run without CFG; Lu comes from the learned ``cfg_uncond`` only."""
    pipe.transformer.double()
    first = {c: run(pipe, FullHistory, PROMPTS[:1], c)[0].logits[0] for c in (1.0, 2.0, 3.0)}
    uncond = 2 * first[1.0] - first[2.0]
    torch.testing.assert_close(first[3.0], 3 * first[1.0] - 2 * uncond, rtol=0, atol=1e-12)
    with torch.no_grad():
        pipe.transformer.cfg_uncond.mul_(-1)
    moved = {c: run(pipe, FullHistory, PROMPTS[:1], c)[0].logits[0] for c in (1.0, 2.0)}
    assert torch.equal(moved[1.0], first[1.0])
    assert not torch.allclose(moved[2.0], first[2.0])


def test_negative_prompt_is_the_unconditional_half(pipe):
    pipe.transformer.double()
    neg = run(pipe, FullHistory, PROMPTS[:1], 2.0, negative_prompt="a castle")[0].logits[0]
    cond = run(pipe, FullHistory, PROMPTS[:1], 1.0)[0].logits[0]
    other = run(pipe, FullHistory, ["a castle"], 1.0)[0].logits[0]
    torch.testing.assert_close(neg, 2 * cond - other, rtol=0, atol=1e-12)


def test_a_batch_row_starts_as_alone(pipe):
    pipe.transformer.double()
    batch = run(pipe, FullHistory, PROMPTS, 3.0)[0].logits[0]
    for i, p in enumerate(PROMPTS):
        alone = run(pipe, FullHistory, [p], 3.0)[0].logits[0]
        torch.testing.assert_close(batch[i : i + 1], alone, rtol=0, atol=1e-12)


def test_driver_hooks_see_one_step_per_scale(pipe):
    events = []
    pipe.begin_run = lambda num_steps, **facts: events.append(("run", num_steps))
    pipe.begin_step = lambda: events.append("step")
    pipe.end_run = lambda: events.append("end")
    out = pipe("a red fox", seed=0)
    assert events == [("run", 5), *["step"] * 5, "end"]
    assert out.images[0].shape == (128, 128, 3)


def test_greedy_draws_nothing(pipe):
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    out = pipe("a red fox", tau=0.0, generator=g, output_type="codes")
    assert torch.equal(g.get_state(), state)
    assert torch.equal(out.bits[0], (out.logits[0][..., 1::2] > out.logits[0][..., 0::2]).long())


@pytest.mark.parametrize(
    "kw, message",
    [
        (
            {"height": 64, "width": 64},
            "height 64 x width 64: this model makes images of 128x128 pixels (height x width) "
            "at the nearest aspect ratio",
        ),
        ({"tau": -1.0}, "tau must be a finite number >= 0, got -1.0"),
        ({"top_p": 2.0}, "top_p must be in [0, 1], got 2.0"),
        ({"negative_prompt": ["x", "y"]}, "got 1 prompts and 2 negative prompts"),
    ],
)
def test_bad_requests_fail_before_any_work(pipe, kw, message):
    pipe.history_store = lambda: pytest.fail("the generation started")
    with pytest.raises(RequestError) as err:
        pipe("a red fox", **kw)
    assert message in str(err.value)


def test_cli_generates_a_png(tmp_path, capsys):
    out = tmp_path / "fox.png"
    assert (
        cli.main(
            ["generate", "--model", "infinity-tiny", "--prompt", "a red fox", "--out", str(out)]
        )
        == 0
    )
    import imageio.v3 as iio

    assert iio.imread(out).shape == (128, 128, 3)


def test_cli_refuses_a_size_no_template_makes_in_one_line(tmp_path, capsys):
    args = [
        "generate",
        "--model",
        "infinity-tiny",
        "--prompt",
        "a fox",
        "--out",
        str(tmp_path / "f.png"),
    ]
    assert cli.main([*args, "--height", "128", "--width", "112"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "diffcache: error: --height 128 --width 112: Infinity's aspect ratios (h/w) are 0.333, "
        "0.4, 0.5, 0.571, 0.667, 0.75, 0.8, 1, 1.25, 1.333, 1.5, 1.75, 2, 2.5, 3\n"
    )
    assert cli.main([*args, "--height", "80", "--width", "64"]) == 2  # 1.25: not infinity-tiny's
    assert capsys.readouterr().err == (
        "diffcache: error: height 80 x width 64: this model makes images of 128x128 pixels "
        "(height x width) at the nearest aspect ratio\n"
    )


def test_unconditional_rows_are_cfg_uncond_over_each_prompts_length(pipe):
    pipe.transformer.double()
    prompts = ["a red fox", "two cats on a boat in the rain"]
    with torch.no_grad():
        features, mask = pipe.conditions(prompts, None, True)
        lens = pipe.conditions(prompts, None, False)[1].sum(-1).tolist()
    uncond = pipe.transformer.cfg_uncond
    assert features.dtype == torch.float64 and mask[2:].sum(-1).tolist() == lens
    for row, n in zip(features[2:], lens, strict=True):
        assert torch.equal(row[:n], uncond[:n])


def test_to_casts_the_model_and_still_decodes(pipe):
    out = pipe.to("cpu", torch.float64)("a red fox", seed=0)
    assert pipe.transformer.head.weight.dtype == torch.float64
    assert out.codes.dtype == torch.float64 and out.images[0].shape == (128, 128, 3)


def test_raw_query_is_the_q_projection_of_the_attention_input(pipe):
    """ScaleKV's scores use mat_qkv's q rows on the attention's input: no bias, norm or RoPE."""
    inputs: dict[int, torch.Tensor] = {}
    for block in pipe.transformer.layers:
        block.sa.register_forward_pre_hook(lambda m, args: inputs.__setitem__(m.layer, args[0]))
    checked = []

    class Checking(FullHistory):
        def attend(self, call, q, k, v):
            sa = pipe.transformer.layers[call.layer].sa
            x = inputs[call.layer]
            c = x.shape[-1]
            expect = (x @ sa.mat_qkv.weight[:c].T).reshape(*x.shape[:2], 2, -1).transpose(1, 2)
            got = call.raw_query()
            torch.testing.assert_close(got, expect)
            assert not torch.allclose(got, q)
            checked.append((call.layer, call.si))
            return super().attend(call, q, k, v)

    pipe.history_store = Checking
    pipe(["a red fox", "a castle"], seed=0, output_type="codes")
    assert len(checked) == 4 * 5


def test_tiny_builds_are_identical_and_leave_the_global_rng():
    from diffcache.pipelines.infinity.tiny import build_tiny

    state = torch.random.get_rng_state()
    a, b = build_tiny(), build_tiny()
    assert torch.equal(state, torch.random.get_rng_state())
    for part in ("transformer", "text_encoder", "vae"):
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert all(torch.equal(v, sb[k]) for k, v in sa.items()), part


@pytest.mark.parametrize("height, width", [(64, 128), (128, 64)])
def test_other_aspect_ratios_run_their_templates_maps(pipe, height, width):
    """infinity-tiny's 1:2 / 2:1 templates: each scale's new tokens are its (h, w) map's,
    and the image is height x width."""
    stores: list[CatHistory] = []
    pipe.history_store = lambda: stores.append(CatHistory()) or stores[-1]
    image = pipe("a red fox", height=height, width=width, seed=0).images[0]
    assert image.shape == (height, width, 3)
    maps = [(1, 1), (1, 2), (2, 4), (3, 6), (4, 8)]
    maps = maps if width > height else [(w, h) for h, w in maps]
    assert [n for layer, _, _, n in stores[0].calls if layer == 0] == [h * w for h, w in maps]
