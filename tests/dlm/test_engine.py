"""The KV engine's packing of padded row sets: same logits, position-wise work on real rows."""

from __future__ import annotations

import pytest
import torch

from diffcache.kv.method import token_layers
from diffcache.kv.policy import DecodeState, LayerView, Policy, StepPlan, pad_rows, union_rows
from diffcache.kv.store import KVStore
from diffcache.pipelines.dlm_engine import forward_rows
from diffcache.pipelines.dream.model import build_tiny_dream
from diffcache.pipelines.llada.model import build_tiny_llada
from diffcache.testing.plain_dlm import dense_forward

BUILD = {"llada": build_tiny_llada, "dream": build_tiny_dream}


class GrowFirstRow(Policy):
    """Batch row 0 recomputes every position from layer 1 on (an Elastic-style refresh)."""

    wants_layers = True
    keeps_inputs = True

    def layer_end(self, layer: int, view: LayerView) -> torch.Tensor | bool:
        return torch.tensor([layer == 0, False])


def _run(model, ids, plan: StepPlan, policy: Policy | None, store: KVStore) -> tuple:
    """Logits, and per layer the rows its first projection multiplied."""
    rows_seen: list[int] = []
    hooks = []
    for block in model.blocks():
        linear = next(m for m in block.modules() if isinstance(m, torch.nn.Linear))
        hooks.append(
            linear.register_forward_pre_hook(lambda m, a: rows_seen.append(a[0].shape[:-1].numel()))
        )
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    try:
        with torch.no_grad():
            logits = forward_rows(model, ids, positions, None, plan, store, policy, step=1)
    finally:
        for hook in hooks:
            hook.remove()
    return logits, rows_seen


@pytest.mark.parametrize("grow", [False, True])
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_padded_rows_are_packed_with_the_same_logits(family: str, grow: bool) -> None:
    model = BUILD[family](micro=True)[0].to(torch.float64)
    ids = torch.randint(0, 240, (2, 12))
    rows, counts = pad_rows([torch.tensor([1, 4, 5, 9, 11]), torch.tensor([3, 7])])
    targets = torch.tensor([[4, 5], [7, 7]]) + model.logit_shift  # rows 4, 5 and 7 give them
    full = StepPlan(rows=None, targets=torch.arange(12).expand(2, -1))
    results = {}
    for packed in (True, False):
        store = KVStore.for_model(model, ids)
        policy = GrowFirstRow() if grow else None
        _run(model, ids, full, policy, store)  # fills the store (and the stored layer inputs)
        plan = StepPlan(rows=rows, targets=targets, counts=counts if packed else None)
        results[packed] = _run(model, ids, plan, policy, store)
    (logits, seen), (reference, seen_padded) = results[True], results[False]
    torch.testing.assert_close(logits, reference)
    layers = len(model.blocks())
    # padded: 2 x 5 rows, 2 x 12 once row 0 refreshes every position; packed: the real ones
    assert seen_padded == [10] + [24 if grow else 10] * (layers - 1)
    assert seen == [7] + [14 if grow else 7] * (layers - 1)


def test_an_empty_row_computes_its_one_padding_position() -> None:
    model = build_tiny_llada(micro=True)[0]
    ids = torch.randint(0, 240, (2, 12))
    store = KVStore.for_model(model, ids)
    _run(model, ids, StepPlan(rows=None, targets=torch.arange(12).expand(2, -1)), None, store)
    rows, counts = pad_rows([torch.tensor([2, 3, 4]), torch.tensor([], dtype=torch.long)])
    plan = StepPlan(rows=rows, targets=torch.tensor([[2], [0]]), counts=counts)
    logits, seen = _run(model, ids, plan, None, store)
    assert seen == [3 + 1] * len(model.blocks()) and torch.isfinite(logits).all()


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_previous_attention_uses_the_old_keys_of_the_written_rows(kv_heads: int) -> None:
    """``LayerView.probs(q, previous=True)`` is the attention over the keys as they were before
    the step's write: this step's keys with the written rows (padded by repetition) put back to
    ``old_k``; GQA heads shared and padding keys masked as for the current keys."""
    gen = torch.Generator().manual_seed(0)
    b, heads, length, hd = 2, 4, 9, 8
    k = torch.randn(b, kv_heads, length, hd, generator=gen)
    rows = torch.tensor([[1, 4, 6], [2, 2, 2]])  # row 1: one real position, padded
    old_k = torch.randn(b, kv_heads, 3, hd, generator=gen)
    old_k[1] = old_k[1, :, :1]  # the padding repeats the first position's old key
    key_mask = torch.ones(b, length, dtype=torch.bool)
    key_mask[1, :2] = False
    q = torch.randn(b, heads, 2, hd, generator=gen)
    view = LayerView(0, rows, q, k, old_k, hd**-0.5, torch.zeros(b, dtype=torch.bool), key_mask)
    restored = k.clone()
    restored.scatter_(2, rows[:, None, :, None].expand(-1, kv_heads, -1, hd), old_k)
    expected = LayerView(0, rows, q, restored, None, hd**-0.5, view.full, key_mask).probs(q)
    torch.testing.assert_close(view.probs(q, previous=True), expected)
    assert not torch.allclose(view.probs(q), expected), "the old keys must matter"


def test_the_store_writes_rows_in_place_and_traces_every_write() -> None:
    """A full write copies every row; a row write replaces just those rows of that layer; the
    trace names each write's step, layer and rows ([B, L] for a full write)."""
    store = KVStore(2, 2, 3, 4, 1, torch.float32, "cpu")  # default backend
    store.trace = []
    k = torch.arange(24.0).view(2, 3, 4, 1)
    store.write(1, None, k, -k, step=0)
    rows = torch.tensor([[3, 0], [1, 1]])
    new = torch.full((2, 3, 2, 1), 100.0)
    store.write(1, rows, new, -new, step=1)
    want = k.clone()
    for b, positions in enumerate(rows.tolist()):
        for p in positions:
            want[b, :, p] = 100.0
    assert torch.equal(store.k[1], want) and torch.equal(store.v[1], -want)
    assert not store.k[0].any() and not store.v[0].any()
    assert [(s, layer, r.tolist()) for s, layer, r in store.trace] == [
        (0, 1, [[0, 1, 2, 3], [0, 1, 2, 3]]),
        (1, 1, rows.tolist()),
    ]
    assert store.nbytes() == 2 * 2 * (2 * 3 * 4 * 1) * 4  # layers x (K, V) x elements x fp32


def test_the_store_scatters_with_the_backend_it_was_made_for(monkeypatch) -> None:
    """``for_model``'s backend (a plan's ``kernels:``) and record reach every K/V scatter."""
    model = build_tiny_llada(micro=True)[0]
    ids = torch.zeros(2, 5, dtype=torch.long)
    seen = []
    record: dict[str, str] = {}

    def scatter(*args, backend, record):
        seen.append((backend, record))

    monkeypatch.setattr("diffcache.kv.store.kv_scatter", scatter)
    store = KVStore.for_model(model, ids, backend="triton", record=record)
    assert store.k[0].shape == (2, model.num_kv_heads, 5, model.head_dim)
    k = torch.zeros(2, model.num_kv_heads, 1, model.head_dim)
    store.write(0, torch.zeros(2, 1, dtype=torch.long), k, k, step=0)
    assert seen == [("triton", record), ("triton", record)]
    assert all(r is record for _, r in seen)


def test_token_layers_count_real_rows_and_every_position_after_a_depth_refresh() -> None:
    """2 batch rows of 10 positions, 4 layers: padding is not counted, and a row refreshed from
    layer 1 counts its rows at layer 0 and all 10 positions at layers 1-3."""
    rows, counts = pad_rows([torch.tensor([1, 4, 6]), torch.tensor([2])])
    targets = torch.zeros(2, 1, dtype=torch.long)
    assert token_layers(StepPlan(None, targets), 2, 10, 4) == (80.0, 80.0)
    plan = StepPlan(rows, targets, counts)
    assert token_layers(plan, 2, 10, 4) == ((3 + 1) * 4, 80.0)
    plan.full_from = torch.tensor([1, 4])  # 4: row 1 never refreshed
    assert token_layers(plan, 2, 10, 4) == (3 * 1 + 10 * 3 + 1 * 4, 80.0)


def test_real_rows_count_every_position_the_width_or_the_real_counts() -> None:
    targets = torch.zeros(2, 1, dtype=torch.long)
    rows = torch.tensor([[1, 2, 1], [0, 4, 5]])
    assert StepPlan(None, targets).real_rows(7).tolist() == [7, 7]
    assert StepPlan(rows, targets).real_rows(7).tolist() == [3, 3]
    assert StepPlan(rows, targets, torch.tensor([2, 3])).real_rows(7).tolist() == [2, 3]


def test_the_base_policy_recomputes_every_row_and_never_refreshes() -> None:
    ids = torch.tensor([[5, 9, 9]])
    state = DecodeState(ids, 9, 1, 0, 2, torch.tensor([[-1, -2, -2]]))
    targets = torch.tensor([[1, 2]])
    plan = Policy().plan(state, targets)
    assert plan.rows is None and plan.targets is targets
    view = LayerView(0, None, torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2), None, 1.0, None)
    assert Policy().layer_end(0, view) is False


def test_union_rows_add_each_targets_logit_source() -> None:
    """Dream (shift 1): target p needs the hidden state at p - 1 (position 0 for p = 1)."""
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 4] = True
    rows, counts = union_rows(mask, torch.tensor([[1, 3], [5, 5]]), shift=1)
    assert rows.tolist() == [[0, 2, 4], [4, 4, 4]] and counts.tolist() == [3, 1]


def test_without_a_store_every_row_is_the_plain_dense_forward() -> None:
    """No store: every row recomputed gives the plain dense forward's logits; a subset of rows
    is refused (it has nowhere to read the other rows' K/V from)."""
    model = build_tiny_llada(micro=True)[0].to(torch.float64)
    ids = torch.randint(0, 240, (1, 7), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(7)[None]
    plan = StepPlan(rows=None, targets=torch.arange(7)[None])
    with torch.no_grad():
        got = forward_rows(model, ids, positions, None, plan)
        want = dense_forward(model, ids, torch.arange(7), {}, model.rope(positions))
    torch.testing.assert_close(got[0], want)
    subset = StepPlan(rows=torch.tensor([[1]]), targets=torch.tensor([[1]]))
    with pytest.raises(ValueError, match="^recomputing a subset of rows needs a KV store$"):
        forward_rows(model, ids, positions, None, subset)


class RefreshByLayer(Policy):
    """Asks batch row b to recompute every position after each layer from ``starts[b]`` on, and
    records each view's layer and ``full`` flags."""

    wants_layers = True
    keeps_inputs = True

    def __init__(self, starts: list[int]) -> None:
        super().__init__()
        self.starts = starts
        self.seen: list[tuple[int, list[bool]]] = []

    def layer_end(self, layer: int, view: LayerView) -> torch.Tensor | bool:
        self.seen.append((view.layer, view.full.tolist()))
        return torch.tensor([layer >= s for s in self.starts])


def test_rows_refreshed_from_different_layers_stay_refreshed() -> None:
    """4 layers; row 0 asks for a depth refresh after layer 0, row 1 after layer 1 (and both keep
    asking): each refreshes from the layer after its first ask (full_from [1, 2]), a refreshed
    row stays refreshed when another row starts later, and the logits are the full forward's."""
    model = build_tiny_llada(micro=True, n_layers=4)[0].to(torch.float64)
    ids = torch.randint(0, 240, (2, 12), generator=torch.Generator().manual_seed(0))
    store = KVStore.for_model(model, ids)
    policy = RefreshByLayer([0, 1])
    full = StepPlan(rows=None, targets=torch.arange(12).expand(2, -1))
    reference, _ = _run(model, ids, full, policy, store)  # fills the store and layer inputs
    policy.seen = []
    rows, counts = pad_rows([torch.tensor([2, 5, 8]), torch.tensor([3])])
    plan = StepPlan(rows=rows, targets=torch.tensor([[5], [3]]), counts=counts)
    logits, seen = _run(model, ids, plan, policy, store)
    assert plan.full_from.tolist() == [1, 2]
    # the views of layers 0-3 flag no row, row 0, then both
    flags = [[False, False], [True, False], [True, True], [True, True]]
    assert policy.seen == list(enumerate(flags))
    # real rows multiplied per layer: 3 + 1, then 12 + 1, then 12 + 12
    assert seen == [4, 13, 24, 24]
    torch.testing.assert_close(logits[:, 0], reference[[0, 1], [5, 3]])


def test_each_of_three_packed_rows_keeps_its_own_positions() -> None:
    """3 batch rows of 4, 1 and 3 real positions (padded to 4, packed): each target's logits are
    the full forward's at that row and position (the store holds this very sequence)."""
    model = build_tiny_llada(micro=True)[0].to(torch.float64)
    ids = torch.randint(0, 240, (3, 10), generator=torch.Generator().manual_seed(1))
    store = KVStore.for_model(model, ids)
    full = StepPlan(rows=None, targets=torch.arange(10).expand(3, -1))
    reference, _ = _run(model, ids, full, None, store)
    sets = [torch.tensor([1, 4, 6, 8]), torch.tensor([2]), torch.tensor([0, 3, 9])]
    rows, counts = pad_rows(sets)
    targets = torch.tensor([[4, 8], [2, 2], [3, 9]])
    logits, seen = _run(
        model, ids, StepPlan(rows=rows, targets=targets, counts=counts), None, store
    )
    assert seen == [4 + 1 + 3] * len(model.blocks())
    torch.testing.assert_close(logits, reference[torch.arange(3)[:, None], targets])


@pytest.mark.parametrize("target", [1, 3])  # between the rows; just past the last one
def test_a_target_whose_source_row_was_not_recomputed_is_refused(target: int) -> None:
    """LLaDA (shift 0) reads target p's logits at row p: with rows {0, 2} recomputed, a target at
    1 or 3 has no fresh hidden state and the step stops instead of reading another row's."""
    model = build_tiny_llada(micro=True)[0]
    ids = torch.randint(0, 240, (1, 6), generator=torch.Generator().manual_seed(2))
    store = KVStore.for_model(model, ids)
    plan = StepPlan(rows=torch.tensor([[0, 2]]), targets=torch.tensor([[2, target]]))
    message = "^a logit target's source row was not recomputed this step$"
    with pytest.raises(AssertionError, match=message):
        _run(model, ids, plan, None, store)
