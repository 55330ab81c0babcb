"""Per-bit sampling, bits -> codes and the next scale's input (research/var.md §1.2.3 item 4)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from diffcache.kv.history import Schedule
from diffcache.pipelines.infinity.bitwise import Codes, bits_to_codes, greedy_bits, sample_bits


def test_sampling_matches_top_p_on_each_pair_then_multinomial():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 8, dtype=torch.float64) * 3  # 4 bits per token
    top_p = 0.97
    # pairs whose smaller probability is 0.029 (dropped) and 0.031 (kept)
    for i, p in enumerate((0.029, 0.031)):
        logits[0, 0, 2 * i : 2 * i + 2] = torch.tensor([0.0, math.log((1 - p) / p)])
    probs = logits.reshape(-1, 2).softmax(-1)
    # a class whose probability is <= 1 - top_p is dropped: the other one is certain
    expect_probs = probs.clone()
    low = probs.min(-1).values <= 1 - top_p
    expect_probs[low] = F.one_hot(probs[low].argmax(-1), 2).double()
    assert low.any() and (~low).any()
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    bits = sample_bits(logits, top_k=900, top_p=top_p, generator=g1)
    assert low[:2].tolist() == [True, False]
    expect = torch.multinomial(expect_probs, 1, True, generator=g2).view(2, 5, 4)
    assert torch.equal(bits, expect)
    assert torch.equal(g1.get_state(), g2.get_state())


def test_top_k_one_and_greedy_take_the_likelier_class():
    logits = torch.randn(3, 7, 6)
    expect = (logits[..., 1::2] > logits[..., 0::2]).long()
    assert torch.equal(greedy_bits(logits), expect)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_bits(logits, top_k=1, top_p=0.0, generator=g), expect)


def test_codes_are_plus_minus_one_over_sqrt_d():
    bits = torch.tensor([[1, 0, 0, 1]])
    torch.testing.assert_close(
        bits_to_codes(bits.double(), 4), torch.tensor([[1, -1, -1, 1.0]]).double() / 2
    )


def test_constant_bits_sum_to_the_scale_count():
    """All-one bits: every scale's codes are 1/sqrt(d) everywhere, and resizing a constant keeps
    it, so the input of scale s + 1 is (s + 1)/sqrt(d) and the final sum is scales/sqrt(d)."""
    sched, d = Schedule.square((1, 2, 3, 5)), 4
    codes = Codes(sched, d, dtype=torch.float64)
    for si in range(len(sched)):
        nxt = codes.add(torch.ones(2, sched.tokens(si), d, dtype=torch.long), si)
        if si + 1 < len(sched):
            assert nxt.shape == (2, sched.tokens(si + 1), d)
            torch.testing.assert_close(nxt, torch.full_like(nxt, (si + 1) / 2))
        else:
            assert nxt is None
    assert codes.summed.shape == (2, d, 1, 5, 5)
    torch.testing.assert_close(codes.summed, torch.full_like(codes.summed, len(sched) / 2))


def test_first_scale_code_spreads_over_the_final_map():
    sched, d = Schedule.square((1, 4)), 2
    codes = Codes(sched, d, dtype=torch.float64)
    nxt = codes.add(torch.tensor([[[1, 0]]]), 0)
    expect = torch.tensor([1.0, -1.0], dtype=torch.float64) / 2**0.5
    torch.testing.assert_close(nxt, expect.expand(1, 16, 2))


def test_patchified_tokens_unshuffle_to_2x2_vae_cells():
    """Token (i, j) bit ``c * 4 + dy * 2 + dx`` is VAE cell (2i + dy, 2j + dx) bit ``c``."""
    sched, d = Schedule.square((2,)), 2
    bits = torch.randint(0, 2, (1, 4, 4 * d))
    got = Codes(sched, d, patchify=True, dtype=torch.float64).codes(bits, 0)
    assert got.shape == (1, d, 1, 4, 4)
    cells = torch.empty(4, 4, d)
    for t in range(4):
        i, j = divmod(t, 2)
        for c in range(d):
            for dy in range(2):
                for dx in range(2):
                    cells[2 * i + dy, 2 * j + dx, c] = bits[0, t, c * 4 + dy * 2 + dx]
    expect = bits_to_codes(cells.double(), d).permute(2, 0, 1)
    torch.testing.assert_close(got[0, :, 0], expect)


def test_top_p_drops_a_class_at_or_below_one_minus_top_p():
    """A class of probability 0.029 is never drawn at top_p 0.97; one of 0.031 is (about 62
    times in 2000)."""
    g = torch.Generator().manual_seed(0)
    for p, never in ((0.029, True), (0.031, False)):
        logits = torch.tensor([0.0, math.log((1 - p) / p)]).repeat(1, 2000, 1)
        drawn = int((sample_bits(logits, top_k=900, top_p=0.97, generator=g) == 0).sum())
        assert (drawn == 0) == never, (p, drawn)
