"""The next-scale history store's contract: schedule arithmetic and the plain (full) store."""

import pytest
import torch
import torch.nn.functional as F

from diffcache.kv import FullHistory, History, ScaleCall, Schedule
from diffcache.kv.history import at_least_fp32, attention

VAR_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
INFINITY_1M = (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64)


def test_schedule_positions_match_research_appendix_a():
    var = Schedule.square(VAR_256)
    assert [var.start(si + 1) for si in range(len(var))] == [
        1, 5, 14, 30, 55, 91, 155, 255, 424, 680
    ]  # fmt: skip
    assert var.total == 680 and var.start(9) == 424  # history the last scale sees
    inf = Schedule.square(INFINITY_1M)
    assert inf.total == 10521 and inf.start(12) == 6425
    assert Schedule(((1, 1), (2, 3))).tokens(1) == 6


def test_scale_of_every_position():
    s = Schedule.square((1, 2, 3))
    expect = [0] + [1] * 4 + [2] * 9
    assert s.scale_of(torch.arange(s.total)).tolist() == expect


def test_full_history_is_concatenation_then_sdpa():
    torch.manual_seed(0)
    store, sched = FullHistory(), Schedule.square((1, 2, 3))
    assert isinstance(store, History)
    ks, vs = [], []
    for si in range(3):
        n = sched.tokens(si)
        q, k, v = (torch.randn(2, 3, n, 4, dtype=torch.float64) for _ in range(3))
        out = store.attend(ScaleCall(layer=0, si=si, schedule=sched, cond_rows=1), q, k, v)
        ks.append(k), vs.append(v)
        expect = F.scaled_dot_product_attention(q, torch.cat(ks, 2), torch.cat(vs, 2), scale=1.0)
        assert torch.equal(out, expect)
    assert store.history_nbytes() == store.nbytes() == 2 * 2 * 3 * sched.total * 4 * 8


def test_a_schedule_needs_maps_of_at_least_one_token():
    for sizes in ((), ((1, 1), (0, 2)), ((1, 1), (2, 0))):
        with pytest.raises(AssertionError):
            Schedule(sizes)


def test_cosine_attention_keeps_k_in_fp32_and_attends_in_the_query_dtype():
    """16-bit floats become float32, float32 and float64 stay; the attention casts the fp32 K
    (and V) to the queries' dtype, as the model's own attention would."""
    assert at_least_fp32(torch.ones(1, dtype=torch.bfloat16)).dtype == torch.float32
    assert at_least_fp32(torch.ones(1, dtype=torch.float16)).dtype == torch.float32
    assert at_least_fp32(torch.ones(1, dtype=torch.float64)).dtype == torch.float64
    x = torch.randn(2, 3)
    assert at_least_fp32(x) is x
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 3, 8, generator=g) for _ in "qkv")
    q16, v16 = q.bfloat16(), v.bfloat16()
    out = attention(q16, k, v16, 0.5)
    expect = F.scaled_dot_product_attention(q16, k.bfloat16(), v16, scale=0.5)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expect)
