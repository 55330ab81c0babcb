"""Text-diffusion sampler components on small hand-checked examples: LLaDA's schedule, Gumbel-max
and EOS/EoT options, Dream's sampling and counts, the commit rules, d²Cache's prior, and
per-row generators (a batch decodes exactly as its rows alone)."""

from __future__ import annotations

import math

import pytest
import torch

from diffcache.kernels import _dispatch
from diffcache.methods import d2cache_prior as prior
from diffcache.pipelines.sampling import dream, llada, rules
from diffcache.pipelines.sampling.random import uniform

NEG = float("-inf")


def gens(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


# ---------------------------------------------------------------- LLaDA


def test_num_transfer_tokens_floor_plus_remainder_first() -> None:
    got = llada.num_transfer_tokens(torch.tensor([10, 3, 0, 8, 9]), 4)
    assert got.tolist() == [[3, 3, 2, 2], [1, 1, 1, 0], [0, 0, 0, 0], [2, 2, 2, 2], [3, 2, 2, 2]]
    assert got.dtype == torch.int64
    assert llada.num_transfer_tokens(torch.tensor([5]), 5).tolist() == [[1] * 5]


def test_gumbel_temperature_zero_is_argmax() -> None:
    logits = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(llada.gumbel_argmax(logits, 0.0), logits.argmax(-1))


def test_gumbel_is_the_fp64_formula_and_reproducible() -> None:
    logits = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(1))
    t = 0.7
    u = torch.rand(2, 3, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    want = (logits.double().exp() / (-u.log()) ** t).argmax(-1)
    got = llada.gumbel_argmax(logits, t, torch.Generator().manual_seed(5))
    assert torch.equal(got, want)
    assert torch.equal(got, llada.gumbel_argmax(logits, t, torch.Generator().manual_seed(5)))


def test_gumbel_samples_softmax_over_temperature() -> None:
    n, t = 20000, 0.5
    logits = torch.tensor([0.0, 0.5, 1.0]).expand(1, n, 3)
    tokens = llada.gumbel_argmax(logits, t, torch.Generator().manual_seed(2))
    freq = torch.bincount(tokens.flatten(), minlength=3).double() / n
    want = torch.softmax(torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64) / t, -1)
    assert torch.allclose(freq, want, atol=0.015)


EOS, EOT = 3, 4


def _eos_logits() -> torch.Tensor:
    """One row, three candidates choosing EOS, EoT and token 0 (strongly)."""
    logits = torch.zeros(1, 3, 5)
    logits[0, 0, EOS] = 30.0
    logits[0, 1, EOT] = 30.0
    logits[0, 2, 0] = 2.0
    return logits


def _cands(logits, t, **kw):
    return llada.llada_candidates(
        logits, t, "low_confidence", torch.Generator().manual_seed(0), eos_id=EOS, eot_id=EOT, **kw
    )


def test_low_confidence_is_the_unnoised_fp64_probability() -> None:
    logits = _eos_logits()
    tokens, conf = _cands(logits, 0.0)
    assert tokens.tolist() == [[EOS, EOT, 0]]
    assert conf.dtype == torch.float64
    assert torch.allclose(conf, logits.double().softmax(-1).max(-1).values)
    # at T > 0 the confidence stays the un-noised probability of the (noisy) choice
    tokens, conf = _cands(logits, 0.5)
    p = logits.double().softmax(-1).gather(-1, tokens[..., None])[..., 0]
    assert torch.equal(conf, p)


@pytest.mark.parametrize("t", [0.0, 0.1])
def test_confidence_eos_eot_inf_demotes_both_by_default(t: float) -> None:
    tokens, conf = _cands(_eos_logits(), t, confidence_eos_eot_inf=True)
    assert tokens.tolist() == [[EOS, EOT, 0]]
    assert conf[0, :2].tolist() == [0.0, 0.0]
    # the other candidates are renormalised without EOS and EoT: 3 tokens left
    assert conf[0, 2].item() == pytest.approx(math.exp(2) / (math.exp(2) + 2))


def test_confidence_eos_eot_inf_reference_aliasing() -> None:
    # T = 0: the reference demotes both (its noisy logits alias the logits)
    _, conf = _cands(_eos_logits(), 0.0, confidence_eos_eot_inf=True, reference_compat=True)
    assert conf[0, :2].tolist() == [0.0, 0.0]
    # T > 0: only EoT; an EOS choice keeps its probability (EoT removed from the softmax)
    tokens, conf = _cands(_eos_logits(), 0.1, confidence_eos_eot_inf=True, reference_compat=True)
    assert tokens.tolist() == [[EOS, EOT, 0]]
    assert conf[0, 1].item() == 0.0
    assert conf[0, 0].item() == pytest.approx(math.exp(30) / (math.exp(30) + 3))
    assert conf[0, 2].item() == pytest.approx(math.exp(2) / (math.exp(2) + 3))


@pytest.mark.parametrize("t", [0.0, 0.3])
def test_logits_eos_inf_never_produces_eos(t: float) -> None:
    tokens, conf = _cands(_eos_logits(), t, logits_eos_inf=True)
    assert (tokens != EOS).all()
    assert tokens[0, 1].item() == EOT  # EoT is still allowed
    assert (conf > 0).all()


def test_random_remasking_is_a_uniform_draw() -> None:
    logits = torch.randn(2, 4, 6)
    tok, conf = llada.llada_candidates(
        logits, 0.0, "random", torch.Generator().manual_seed(3), eos_id=EOS, eot_id=EOT
    )
    want = torch.rand(2, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.equal(tok, logits.argmax(-1))
    assert torch.equal(conf, want)
    with pytest.raises(ValueError, match="remasking"):
        llada.llada_candidates(logits, 0.0, "entropy", eos_id=EOS, eot_id=EOT)


def test_cfg_mix() -> None:
    cond, uncond = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 1.0])
    assert llada.cfg_mix(cond, uncond, 1.0).tolist() == [3.0, -3.0]
    assert torch.equal(llada.cfg_mix(cond, uncond, 0.0), cond)


# ---------------------------------------------------------------- Dream

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])


def test_filter_logits_top_p_and_top_k_by_hand() -> None:
    logits = PROBS.log()[None, None]
    keep = lambda f: torch.isfinite(f)[0, 0].tolist()  # noqa: E731
    # cumulative 0.5, 0.8, 0.95, 1: top_p 0.7 keeps up to the token that crosses it
    assert keep(dream.filter_logits(logits, 0.0, 0.7, None)) == [True, True, False, False]
    assert keep(dream.filter_logits(logits, 0.0, 0.45, None)) == [True, False, False, False]
    assert keep(dream.filter_logits(logits, 0.0, 1.0, None)) == [True] * 4
    assert keep(dream.filter_logits(logits, 0.0, None, 3)) == [True, True, True, False]
    assert keep(dream.filter_logits(logits, 0.0, 0.9, 1)) == [True, False, False, False]
    # temperature divides before top-p: at T = 2 probs ~ sqrt(p), top-p 0.7 keeps three
    assert keep(dream.filter_logits(logits, 2.0, 0.7, None)) == [True, True, True, False]


def test_sample_tokens_greedy_and_confidences() -> None:
    logits = PROBS.log()[None, None]
    conf, tok = dream.sample_tokens(logits, 0.0)
    assert tok.item() == 0 and conf.item() == pytest.approx(0.5)
    assert conf.dtype == torch.float64
    conf, _ = dream.sample_tokens(logits, 0.0, top_p=0.7)
    assert conf.item() == pytest.approx(0.5 / 0.8)
    conf, _ = dream.sample_tokens(logits, 0.0, top_k=3)
    assert conf.item() == pytest.approx(0.5 / 0.95)
    conf, _ = dream.sample_tokens(logits, 0.0, margin=True)
    assert conf.item() == pytest.approx(0.2)
    conf, _ = dream.sample_tokens(logits, 0.0, neg_entropy=True)
    assert conf.item() == pytest.approx(float((PROBS * (PROBS + 1e-10).log()).sum()), abs=1e-6)


def test_sample_tokens_draws_from_the_filtered_distribution() -> None:
    n = 20000
    logits = PROBS.log().expand(1, n, 4)
    conf, tok = dream.sample_tokens(logits, 1.0, 0.7, None, torch.Generator().manual_seed(4))
    freq = torch.bincount(tok.flatten(), minlength=4).double() / n
    assert freq[2:].sum() == 0  # filtered tokens are never drawn
    assert freq[0].item() == pytest.approx(0.625, abs=0.015)
    want = torch.where(tok == 0, 0.625, 0.375).double()
    assert torch.allclose(conf, want, atol=1e-6)  # the probability of the drawn token


def test_dream_confidence_algorithms() -> None:
    logits = PROBS.log()[None, None]
    for alg, want in [("maskgit_plus", 0.5), ("origin", 0.5), ("topk_margin", 0.2)]:
        tok, conf = dream.dream_confidence(alg, logits, 0.0)
        assert tok.item() == 0 and conf.item() == pytest.approx(want)
    _, conf = dream.dream_confidence("entropy", logits, 0.0)
    assert conf.item() < 0
    with pytest.raises(ValueError, match="alg"):
        dream.dream_confidence("low_confidence", logits, 0.0)


def test_dream_transfer_count_per_row_and_batch_mean() -> None:
    masks = torch.tensor([10, 20])
    # timesteps linspace(1, 1e-3, 5) = 1, 0.75025, 0.5005, 0.25075, 0.001
    r0 = 1 - 0.75025  # step 0: 0.24975
    r1 = 1 - 0.5005 / 0.75025  # step 1: 0.33289
    assert (
        dream.dream_transfer_count(masks, 0, 4, 1e-3).tolist()
        == [int(10 * r0), int(20 * r0)]
        == [2, 4]
    )
    assert dream.dream_transfer_count(masks, 1, 4, 1e-3).tolist() == [3, 6]
    # the reference's batch mean M = 15: int(15 * 0.24975) = 3, int(15 * 0.33289) = 4
    assert dream.dream_transfer_count(masks, 0, 4, 1e-3, reference_compat=True).tolist() == [3, 3]
    assert dream.dream_transfer_count(masks, 1, 4, 1e-3, reference_compat=True).tolist() == [4, 4]
    assert int(15 * r1) == 4
    for compat in (False, True):  # the last step commits everything left
        assert dream.dream_transfer_count(masks, 3, 4, 1e-3, compat).tolist() == [10, 20]


def test_origin_reveals_with_probability_one_minus_s_over_t() -> None:
    valid = torch.ones(1, 20000, dtype=torch.bool)
    valid[0, -100:] = False
    got = dream.origin_commit(valid, 1, 4, 1e-3, torch.Generator().manual_seed(6))
    assert not got[0, -100:].any()
    assert got.double().sum().item() / 19900 == pytest.approx(1 - 0.5005 / 0.75025, abs=0.015)
    assert torch.equal(dream.origin_commit(valid, 3, 4, 1e-3), valid)
    logits = PROBS.log().expand(1, 20000, 4)
    reveal, tokens = dream.origin_reveal(logits, valid, 3, 4, 1e-3)
    assert torch.equal(reveal, valid) and (tokens == 0).all()


# ---------------------------------------------------------------- commit rules


def test_commit_topk_per_row_counts_ties_to_lower_index_never_padding() -> None:
    conf = torch.tensor([[0.2, 0.9, 0.5, NEG], [0.7, 0.7, 0.7, 0.1]], dtype=torch.float64)
    got = rules.commit_topk(conf, torch.tensor([2, 2]))
    assert got.tolist() == [[False, True, True, False], [True, True, False, False]]
    got = rules.commit_topk(conf, torch.tensor([4, 0]))
    assert got.tolist() == [[True, True, True, False], [False] * 4]


def test_commit_threshold() -> None:
    conf = torch.tensor(
        [[0.95, 0.5, 0.92, NEG], [0.3, 0.5, 0.1, 0.2], [0.9, 0.97, 0.99, 0.0]],
        dtype=torch.float64,
    )
    valid = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 1]], dtype=torch.bool)
    got = rules.commit_threshold(conf, valid, 0.9)
    assert got.tolist() == [
        [True, False, True, False],
        [False, True, False, False],  # nothing >= tau: exactly the best
        [True, True, False, False],  # 0.9 >= 0.9 counts; an invalid 0.99 never
    ]
    assert not rules.commit_threshold(conf, torch.zeros_like(valid), 0.9).any()


def _factor_by_definition(conf: list[float], factor: float, compat: bool) -> int:
    """n* from the definition (sorted descending, rank 1 always)."""
    c = sorted(conf, reverse=True)
    n = len(c)
    for k in range(2, n + 1):
        if c[k - 1] < 1 - factor / (k + 1):
            return n if (compat and k == n) else k - 1
    return n


def test_commit_factor_by_hand_and_the_last_candidate_quirk() -> None:
    # factor 1: rank thresholds 1 - 1/(k+1) = 2/3, 3/4, 4/5 for k = 2, 3, 4
    valid = torch.ones(1, 4, dtype=torch.bool)
    conf = torch.tensor([[0.9, 0.7, 0.8, 0.5]], dtype=torch.float64)  # fails at k = 3
    assert rules.commit_factor(conf, valid, 1.0).tolist() == [[True, False, True, False]]
    last = torch.tensor([[0.9, 0.8, 0.78, 0.5]], dtype=torch.float64)  # fails only at k = 4
    assert rules.commit_factor(last, valid, 1.0).tolist() == [[True, True, True, False]]
    assert rules.commit_factor(last, valid, 1.0, reference_compat=True).tolist() == [[True] * 4]
    fine = torch.tensor([[0.99, 0.98, 0.97, 0.96]], dtype=torch.float64)
    assert rules.commit_factor(fine, valid, 1.0).tolist() == [[True] * 4]
    low = torch.tensor([[0.2, 0.6, 0.1, 0.3]], dtype=torch.float64)  # fails at k = 2: one
    for compat in (False, True):
        assert rules.commit_factor(low, valid, 1.0, compat).tolist() == [
            [False, True, False, False]
        ]
    # padding is ignored: the quirk looks at the last *valid* rank
    padded = torch.tensor([[0.9, 0.5, NEG, NEG]], dtype=torch.float64)
    pvalid = torch.tensor([[True, True, False, False]])
    assert rules.commit_factor(padded, pvalid, 1.0).tolist() == [[True, False, False, False]]
    assert rules.commit_factor(padded, pvalid, 1.0, True).tolist() == [[True, True, False, False]]


@pytest.mark.parametrize("compat", [False, True])
def test_commit_factor_matches_the_definition_on_random_rows(compat: bool) -> None:
    g = torch.Generator().manual_seed(7)
    conf = 1 - torch.rand(64, 6, generator=g, dtype=torch.float64) ** 3 * 0.6
    n = torch.randint(1, 7, (64,), generator=g)
    valid = torch.arange(6)[None] < n[:, None]
    got = rules.commit_factor(conf.masked_fill(~valid, NEG), valid, 1.0, compat)
    for b in range(64):
        row = conf[b, : n[b]].tolist()
        k = _factor_by_definition(row, 1.0, compat)
        top = set(sorted(range(len(row)), key=lambda j: -row[j])[:k])
        assert set(got[b].nonzero()[:, 0].tolist()) == top


def test_commit_confident() -> None:
    p = torch.tensor([[0.5, 0.7, 0.6], [0.95, 0.92, 0.5], [0.99, 0.3, 0.2]], dtype=torch.float64)
    valid = torch.tensor([[1, 1, 1], [1, 1, 1], [0, 1, 1]], dtype=torch.bool)
    assert rules.commit_confident(p, valid, 0.9).tolist() == [
        [False, True, False],  # nothing >= 0.9: the best
        [True, True, False],
        [False, True, False],  # an invalid 0.99 neither commits nor raises the bar
    ]


def test_after_first_eos_cuts_each_row_from_its_first_eos() -> None:
    """Elastic-Cache's EOS stop by hand (prompt 2, EOS 9, mask 5): from each row's first EOS
    after the prompt on; ``once`` counts only EOS committed this step, in rows not yet cut."""
    e, m = 9, 5
    ids = torch.tensor(
        [
            [e, 3, 4, e, m, e, m, m],  # the prompt's EOS is no stop; two EOS: from the first
            [3, 3, 4, e, 6, e, m, m],  # two EOS, the one at 3 decoded at an earlier step
            [3, 3, 7, 4, m, m, m, m],  # no EOS
        ]
    )
    committed = torch.zeros(3, 8, dtype=torch.bool)
    committed[0, 3] = committed[1, 4] = committed[1, 5] = committed[2, 2] = True
    cut = torch.zeros(3, 8, dtype=torch.bool)
    cut[0, 7] = True  # row 0 was cut at an earlier step
    every = rules.after_first_eos(ids, e, 2, committed, cut, once=False)
    assert every.long().tolist() == [[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1], [0] * 8]
    once = rules.after_first_eos(ids, e, 2, committed, cut, once=True)
    assert once.long().tolist() == [[0] * 8, [0, 0, 0, 0, 0, 1, 1, 1], [0] * 8]


def test_commit_sampled_draws_k_valid_by_softmax_weights() -> None:
    n = 8000
    conf = torch.tensor([0.0, math.log(3.0), 5.0, 0.0], dtype=torch.float64).expand(n, 4)
    valid = torch.tensor([True, True, False, True]).expand(n, 4)
    got = rules.commit_sampled(conf, valid, torch.ones(n, dtype=torch.long), 1.0, gens(0)[0])
    assert (got.sum(-1) == 1).all() and not got[:, 2].any()
    freq = got.double().mean(0)
    assert freq[1].item() == pytest.approx(0.6, abs=0.02)  # weights 1 : 3 : 1
    got = rules.commit_sampled(conf, valid, torch.full((n,), 2), 0.5, gens(1)[0])
    assert (got.sum(-1) == 2).all() and not got[:, 2].any()


# ---------------------------------------------------------------- d²Cache prior


def _density_brute(decoded: torch.Tensor, sigma: float, prompt_decoded: bool) -> torch.Tensor:
    b, g = decoded.shape
    out = torch.zeros(b, g, dtype=torch.float64)
    for r in range(b):
        right = float(decoded[r, -1])
        canvas = [float(prompt_decoded)] * g + decoded[r].double().tolist() + [right] * g
        for i in range(g):
            num = den = 0.0
            for j, m in enumerate(canvas):
                k = math.exp(-((g + i - j) ** 2) / (2 * sigma**2))
                num += k * m
                den += k
            out[r, i] = num / den
    return out


@pytest.mark.parametrize("prompt_decoded", [True, False])
def test_certainty_density_matches_a_brute_force_loop(prompt_decoded: bool) -> None:
    g = torch.Generator().manual_seed(8)
    decoded = torch.rand(4, 13, generator=g) < 0.5
    decoded[0, -1], decoded[1, -1] = True, False  # both right-padding cases
    for sigma in (1.0, 1.5, 4.0, 20.0):
        got = prior.certainty_density(decoded, sigma, prompt_decoded)
        want = _density_brute(decoded, sigma, prompt_decoded)
        assert got.dtype == torch.float64
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_certainty_density_boundary_rules() -> None:
    all_done = torch.ones(1, 6, dtype=torch.bool)
    assert torch.allclose(prior.certainty_density(all_done, 3.0), torch.ones(1, 6).double())
    none = torch.zeros(1, 6, dtype=torch.bool)
    d = prior.certainty_density(none, 2.0)
    assert (d[0, :-1] > d[0, 1:]).all()  # only the decoded left context: falls to the right
    assert (prior.certainty_density(none, 2.0, prompt_decoded=False) == 0).all()
    # the reference's constant denominator: kernel summed over offsets -3G .. 3G-1
    dens = prior.certainty_density(all_done, 30.0, reference_compat=True)
    total = sum(math.exp(-(d * d) / (2 * 30.0**2)) for d in range(-18, 18))
    canvas = [sum(math.exp(-((6 + i - j) ** 2) / 1800) for j in range(18)) for i in range(6)]
    assert torch.allclose(dens[0], torch.tensor(canvas, dtype=torch.float64) / total)
    big = torch.rand(2, 200, generator=torch.Generator().manual_seed(9)) < 0.3
    a, b = prior.certainty_density(big, 5.0), prior.certainty_density(big, 5.0, True, True)
    assert torch.allclose(a, b, rtol=1e-12)  # G >> sigma: the two denominators agree


def test_stage1_scores_are_the_confidence_times_the_certainty_density() -> None:
    """Stage 1's scores: each generated position's confidence (None: 1) times the certainty
    density of the decoded region (the brute-force loop above), 0 on the prompt. σ 3 over 6
    generated positions, where the reference's FFT denominator (``reference_compat``) differs."""
    p, sigma = 2, 3.0
    masked = torch.tensor([[False, False, False, True, True, False, True, True]])
    conf = torch.tensor([[0.9, 0.9, 0.0, 0.5, 0.25, 0.0, 0.75, 0.125]], dtype=torch.float64)
    density = _density_brute(~masked[:, p:], sigma, True)
    for given, want in ((conf, conf[:, p:] * density), (None, density)):
        _, scores = prior.stage1(masked, given, p, (p, p + 3), 2, sigma)
        assert scores[0, :p].tolist() == [0.0, 0.0]
        assert torch.allclose(scores[:, p:], want, rtol=1e-12, atol=0)


def test_nucleus_select_mass_rule_and_at_least_one() -> None:
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    everything = torch.ones(1, 4, dtype=torch.bool)
    sel = lambda p, allowed=everything: prior.nucleus_select(scores, p, allowed)[0].tolist()  # noqa: E731
    # normalised 0.4, 0.3, 0.2, 0.1; cumulative 0.4, 0.7, 0.9, 1.0
    assert sel(0.5) == [True, False, False, False]
    assert sel(0.75) == [True, True, False, False]
    assert sel(0.1) == [True, False, False, False]  # at least one
    assert sel(1.0) == [True] * 4
    # normalised over the allowed 3, 2, 1 only: 0.5, 0.333, 0.167
    allowed = torch.tensor([[False, True, True, True]])
    assert sel(0.5, allowed) == [False, True, False, False]
    assert sel(0.85, allowed) == [False, True, True, False]
    assert sel(0.0, allowed) == [False, True, False, False]
    assert sel(0.9, torch.zeros(1, 4, dtype=torch.bool)) == [False] * 4


def test_nucleus_select_normalises_each_row_and_ranks_ties_by_index() -> None:
    """Each row is normalised by its own sum; 100 tied scores (wide enough that an unstable
    sort reorders them) are taken from the lowest index: mass 0.01 each, so p = 0.105 keeps
    the first 10."""
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0], [40.0, 30.0, 20.0, 10.0]])
    allowed = torch.ones(2, 4, dtype=torch.bool)
    assert prior.nucleus_select(scores, 0.75, allowed).tolist() == [[True, True, False, False]] * 2
    ties = prior.nucleus_select(torch.ones(1, 100), 0.105, torch.ones(1, 100, dtype=torch.bool))
    assert ties[0].nonzero()[:, 0].tolist() == list(range(10))


@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_nucleus_select_refuses_p_outside_0_1(p: float) -> None:
    with pytest.raises(ValueError, match=rf"^p must be in \[0, 1\], got {p}$"):
        prior.nucleus_select(torch.ones(1, 2), p, torch.ones(1, 2, dtype=torch.bool))


def test_certainty_density_of_regions_of_zero_and_one_position() -> None:
    """G = 0: an empty [B, 0]. G = 1 (sigma 1): the decoded prompt at distance 1, the position,
    and the position after it (decoded only if the position is) weigh e^-1/2, 1, e^-1/2."""
    empty = prior.certainty_density(torch.zeros(2, 0, dtype=torch.bool), 1.0)
    assert empty.shape == (2, 0) and empty.dtype == torch.float64
    one = prior.certainty_density(torch.tensor([[True], [False]]), 1.0)
    e = math.exp(-0.5)
    assert torch.allclose(one, torch.tensor([[1.0], [e / (1 + 2 * e)]], dtype=torch.float64))


@pytest.mark.parametrize("sigma", [0.0, -1.0])
def test_certainty_density_refuses_a_non_positive_sigma(sigma: float) -> None:
    with pytest.raises(ValueError, match=rf"^sigma must be > 0, got {sigma}$"):
        prior.certainty_density(torch.ones(1, 3, dtype=torch.bool), sigma)


def test_inflate_fills_short_gaps_between_selected() -> None:
    sel = torch.zeros(1, 12, dtype=torch.bool)
    sel[0, [2, 5, 11]] = True
    filled = lambda w: prior.inflate(sel, w)[0].nonzero()[:, 0].tolist()  # noqa: E731
    assert filled(1) == filled(2) == [2, 5, 11]
    assert filled(3) == [2, 3, 4, 5, 11]  # 5 - 2 = 3 <= 3; never before the first / after last
    assert filled(6) == list(range(2, 12))
    from_start = torch.zeros(1, 6, dtype=torch.bool)
    from_start[0, [0, 3]] = True  # a gap after position 0 is a gap too
    assert prior.inflate(from_start, 3)[0].tolist() == [True] * 4 + [False] * 2


# ---------------------------------------------------------------- per-row generators


def _rows_alone(fn, logits: torch.Tensor, valid: torch.Tensor, seeds: list[int]):
    """fn run on each row's valid candidates alone (batch 1), scattered back to [B, m]."""
    outs = []
    for b, s in enumerate(seeds):
        idx = valid[b].nonzero()[:, 0]
        one = fn(logits[b : b + 1, idx], torch.ones(1, len(idx), dtype=torch.bool), gens(s))
        outs.append((idx, one))
    return outs


def test_per_row_generators_make_a_batch_equal_to_its_rows_alone() -> None:
    g = torch.Generator().manual_seed(10)
    logits = torch.randn(3, 5, 9, generator=g)
    valid = torch.tensor(
        [[1, 1, 1, 0, 0], [1, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool
    )  # row 1: not leading
    seeds = [11, 12, 13]
    kw = {"eos_id": EOS, "eot_id": EOT}
    fns = {
        "llada_lowconf": lambda lg, v, gs: llada.llada_candidates(
            lg, 0.8, "low_confidence", gs, valid=v, **kw
        ),
        "llada_random": lambda lg, v, gs: llada.llada_candidates(
            lg, 0.8, "random", gs, valid=v, **kw
        ),
        "dream_sample": lambda lg, v, gs: dream.sample_tokens(lg, 0.9, 0.95, 5, gs, valid=v),
        "dream_origin": lambda lg, v, gs: dream.origin_reveal(
            lg, v, 0, 4, 1e-3, 1.0, None, None, gs
        ),
        "sampled_commit": lambda lg, v, gs: (
            rules.commit_sampled(lg[..., 0].double(), v, torch.full((lg.shape[0],), 2), 0.5, gs),
        ),
    }
    for name, fn in fns.items():
        batch = fn(logits, valid, gens(*seeds))
        for b, (idx, alone) in enumerate(_rows_alone(fn, logits, valid, seeds)):
            for got, want in zip(batch, alone, strict=True):
                assert torch.equal(got[b, idx], want[0]), name
        # one shared generator is reproducible too
        again = fn(logits, valid, gens(3)[0])
        assert all(
            torch.equal(x, y) for x, y in zip(fn(logits, valid, gens(3)[0]), again, strict=True)
        )


def test_generator_list_length_must_match_the_batch() -> None:
    with pytest.raises(ValueError, match="generators"):
        llada.gumbel_argmax(torch.randn(2, 3, 4), 1.0, gens(1))
    with pytest.raises(ValueError, match="^3 generators for 2 batch rows$"):
        uniform((2, 5), gens(1, 2, 3), torch.device("cpu"))


def test_uniform_draws_fp64_from_the_global_generator_or_one_per_row() -> None:
    """No generator: the global one draws the whole fp64 tensor. A list: row b draws all its
    numbers from generator b in order; with ``valid``, one per valid candidate (padding 0.5)."""
    cpu, shape = torch.device("cpu"), (2, 3, 2)
    torch.manual_seed(5)
    want = torch.rand(shape, dtype=torch.float64)
    torch.manual_seed(5)
    assert torch.equal(uniform(shape, None, cpu), want)
    rows = [torch.rand(6, generator=g, dtype=torch.float64) for g in gens(7, 8)]
    assert torch.equal(uniform(shape, gens(7, 8), cpu), torch.stack(rows).view(shape))
    valid = torch.tensor([[True, False, True], [False, False, False]])
    got = uniform(shape, gens(7, 8), cpu, valid)
    assert torch.equal(got[0, [0, 2]], rows[0][:4].view(2, 2))
    assert got[0, 1].tolist() == [0.5, 0.5] and got[1].tolist() == [[0.5, 0.5]] * 3


def test_commit_topk_ties_go_to_the_lower_index_in_wide_rows() -> None:
    """100 tied candidates (wide enough that an unstable sort reorders them): the first k."""
    got = rules.commit_topk(torch.zeros(1, 100), torch.tensor([3]))
    assert got.nonzero()[:, 1].tolist() == [0, 1, 2]


def test_commit_factor_threshold_boundary_in_float64() -> None:
    """c_k equal to 1 - factor/(k + 1) does not fail (the rule is c_k < threshold), and the
    threshold is computed in float64: 0.966666655 lies between 1 - 0.1/3 in float64
    (0.96666666...67) and in float32 (0.96666664), so it fails at k = 2."""
    valid = torch.ones(1, 2, dtype=torch.bool)
    at = torch.tensor([[0.9, 0.75]], dtype=torch.float64)  # 1 - 0.75/3 = 0.75 exactly
    assert rules.commit_factor(at, valid, 0.75).tolist() == [[True, True]]
    between = torch.tensor([[0.99, 0.966666655]], dtype=torch.float64)
    assert 1 - 0.1 / 3 > 0.966666655 > float(torch.tensor(1 - 0.1 / 3, dtype=torch.float32))
    assert rules.commit_factor(between, valid, 0.1).tolist() == [[True, False]]


@pytest.mark.parametrize("alg_temp", [0.0, -0.5])
def test_commit_sampled_refuses_non_positive_temperature(alg_temp: float) -> None:
    with pytest.raises(
        ValueError, match=rf"^alg_temp must be > 0 for sampled commits, got {alg_temp}$"
    ):
        rules.commit_sampled(
            torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), torch.tensor([1]), alg_temp
        )


def test_commit_sampled_divides_by_the_temperature() -> None:
    """softmax([1, 0] / 0.01) puts e^-100 on the second candidate: it is never drawn (with
    confidence * 0.01 the two would be near 50/50)."""
    conf, valid, k = (
        torch.tensor([[1.0, 0.0]]),
        torch.ones(1, 2, dtype=torch.bool),
        torch.tensor([1]),
    )
    g = torch.Generator().manual_seed(0)
    draws = [rules.commit_sampled(conf, valid, k, 0.01, g)[0].tolist() for _ in range(200)]
    assert draws == [[True, False]] * 200


def test_commit_sampled_per_row_draws_skip_padding() -> None:
    """With one generator per row, a row with padding between its candidates draws as the
    same row without the padding (one uniform per valid candidate, in order)."""
    conf = torch.tensor([[0.3, 0.0, 0.2, 0.1, 0.0, 0.25, 0.15]])
    valid = torch.tensor([[True, False, True, True, False, True, True]])
    packed = conf[valid][None]
    k = torch.tensor([2])
    for seed in range(20):
        gap = rules.commit_sampled(conf, valid, k, 0.5, [torch.Generator().manual_seed(seed)])
        alone = rules.commit_sampled(
            packed,
            torch.ones_like(packed, dtype=torch.bool),
            k,
            0.5,
            [torch.Generator().manual_seed(seed)],
        )
        assert gap[valid].tolist() == alone[0].tolist()
        assert not gap[~valid].any()


def test_num_transfer_tokens_refuses_zero_steps() -> None:
    with pytest.raises(ValueError, match="^steps must be >= 1, got 0$"):
        llada.num_transfer_tokens(torch.tensor([4]), 0)


@pytest.mark.skipif(
    _dispatch.triton_status() != [] or not _dispatch._interpret_enabled(),
    reason="needs triton importable and TRITON_INTERPRET=1 at import (tests/conftest.py sets it)",
)
def test_llada_sampled_confidence_ignores_the_fused_backend() -> None:
    """At T > 0 the chosen token is not the argmax, so the fused argmax statistics cannot give
    its probability: the confidence is the plain softmax probability of the drawn token on
    every backend."""
    logits = torch.tensor([[[0.0, 0.1, 0.2, 0.3], [1.0, 0.9, 0.8, 0.7]]])
    probs = logits.double().softmax(-1)
    for backend in ("torch", "triton"):
        g = torch.Generator().manual_seed(3)
        tokens, conf = llada.llada_candidates(
            logits, 5.0, "low_confidence", g, eos_id=0, eot_id=1, backend=backend
        )
        assert conf.tolist() == probs.gather(-1, tokens[..., None])[..., 0].tolist()
    assert (tokens != logits.argmax(-1)).any()  # seed 3 draws a non-argmax token


def _fixed_uniform(monkeypatch: pytest.MonkeyPatch, value: float) -> None:
    """Every U(0, 1) draw of the Dream sampler returns ``value``."""
    monkeypatch.setattr(
        dream, "uniform", lambda shape, *_: torch.full(shape, value, dtype=torch.float64)
    )


def test_filter_logits_temperature_below_one_and_exact_boundaries() -> None:
    logits = torch.tensor([[2.0, 1.0, -1.0]])
    assert torch.equal(dream.filter_logits(logits, 0.5, None, None), logits / 0.5)
    # probabilities 0.5, 0.25, 0.25 (exact in binary): with top_p = 0.75 the second token
    # reaches 0.75 without exceeding it, so the third, which crosses, is kept too
    quarter = torch.tensor([[math.log(2.0), 0.0, 0.0]], dtype=torch.float64)
    assert quarter.softmax(-1).tolist() == [[0.5, 0.25, 0.25]]
    assert torch.equal(dream.filter_logits(quarter, 0, 0.75, None), quarter)
    with pytest.raises(ValueError, match="^top_k must be >= 1, got 0$"):
        dream.filter_logits(logits, 0, None, 0)


def test_sample_tokens_promotes_half_logits_to_float32() -> None:
    logits = torch.tensor([[[2.0, 1.0, 0.3]]], dtype=torch.float16)
    conf, tokens = dream.sample_tokens(logits, 0)
    assert tokens.tolist() == [[0]]
    assert conf.item() == logits.float().softmax(-1)[0, 0, 0].item()


@pytest.mark.parametrize("u,token", [(0.99, 3), (0.5, 2), (0.25, 2), (0.2, 0)])
def test_sample_tokens_inverse_cdf(monkeypatch: pytest.MonkeyPatch, u: float, token: int) -> None:
    """Token = the first whose cumulative probability exceeds u; a removed (zero-mass) token
    is never drawn, even where u lands exactly on the cumulative mass before it."""
    _fixed_uniform(monkeypatch, u)
    # probabilities 0.25, 0, 0.5, 0.25 (token 1 removed)
    logits = torch.tensor([[[0.0, float("-inf"), math.log(2.0), 0.0]]], dtype=torch.float64)
    conf, tokens = dream.sample_tokens(logits, 1.0)
    assert tokens.tolist() == [[token]]
    assert conf.tolist() == [[[0.25, 0.0, 0.5, 0.25][token]]]


def test_sample_tokens_margin_with_two_tokens() -> None:
    conf, _ = dream.sample_tokens(torch.tensor([[[math.log(3.0), 0.0]]]), 0, margin=True)
    assert conf.item() == pytest.approx(0.5)


@pytest.mark.parametrize("top_p", [None, 1.0])
def test_dream_confidence_unfiltered_uses_the_fused_backend(top_p: float | None) -> None:
    """top_p = 1 filters nothing, so T = 0 with it is the plain case the fused kernel serves."""
    if _dispatch.triton_status() != [] or not _dispatch._interpret_enabled():
        pytest.skip("needs triton under TRITON_INTERPRET=1")
    record: dict[str, str] = {}
    logits = torch.randn(1, 2, 5)
    dream.dream_confidence("maskgit_plus", logits, 0, top_p, backend="triton", record=record)
    assert record == {"token_confidence": "triton"}


def test_dream_confidence_passes_filters_generators_and_valid() -> None:
    """dream_confidence samples exactly as sample_tokens with the same arguments."""
    logits = torch.randn(1, 7, 30, generator=torch.Generator().manual_seed(1))
    valid = torch.tensor([[True, False, True, True, False, True, True]])
    for top_p, top_k in [(None, None), (0.3, None), (None, 2)]:
        for seed in range(3):
            tokens, conf = dream.dream_confidence(
                "maskgit_plus",
                logits,
                1.0,
                top_p,
                top_k,
                [torch.Generator().manual_seed(seed)],
                valid,
            )
            want_conf, want_tokens = dream.sample_tokens(
                logits, 1.0, top_p, top_k, [torch.Generator().manual_seed(seed)], valid=valid
            )
            assert torch.equal(tokens, want_tokens) and torch.equal(conf, want_conf)
    tokens, _ = dream.dream_confidence("maskgit_plus", logits, 1.0, None, 1)
    assert torch.equal(tokens, logits.argmax(-1))  # top_k = 1 leaves only the argmax


def test_timesteps_grid() -> None:
    assert dream.timesteps(4, 0.2).tolist() == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])


def test_origin_reveal_before_the_last_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the last step a candidate is revealed only when its draw is below 1 - s/t
    (here every draw is 0.99); on the last step all are. Tokens honour top-k."""
    _fixed_uniform(monkeypatch, 0.99)
    valid = torch.tensor([[True, True, False]])
    logits = torch.tensor([[[0.0, 3.0], [2.0, 0.0], [0.0, 0.0]]])
    for i in range(3):
        reveal, tokens = dream.origin_reveal(logits, valid, i, 4, 0.2, 1.0, None, 1)
        assert not reveal.any()
        assert tokens[valid].tolist() == [1, 0]
    reveal, tokens = dream.origin_reveal(logits, valid, 3, 4, 0.2, 1.0, 0.1, None)
    assert torch.equal(reveal, valid)
    assert tokens[valid].tolist() == [1, 0]  # top_p = 0.1 keeps only the most probable


def test_origin_commit_draw_equal_to_the_ratio_is_not_revealed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Revealed when u < 1 - s/t, strictly."""
    grid = dream.timesteps(4, 0.2)
    _fixed_uniform(monkeypatch, float(1 - grid[2] / grid[1]))
    assert not dream.origin_commit(torch.ones(1, 2, dtype=torch.bool), 1, 4, 0.2).any()
