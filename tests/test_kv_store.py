"""The KV store protocol and the text LMs' position-indexed store: writes, reads, evictions, and
the bytes the store measures (``nbytes``, ``history_nbytes``) against hand arithmetic; and the
model-side seam a KV method finds through the adapter (``Adapter.kv``)."""

from __future__ import annotations

import pytest
import torch

from diffcache.adapter import Adapter, Capabilities, KVSeam, Target
from diffcache.errors import UnsupportedModelError
from diffcache.kv import KVStore, Policy, Store
from diffcache.kv.method import attach_policy
from diffcache.runstate import RunState
from diffcache.session import Session

LAYERS, BATCH, HEADS, LENGTH, HEAD_DIM = 2, 2, 3, 4, 5


def _store(dtype: torch.dtype = torch.float16) -> KVStore:
    return KVStore(LAYERS, BATCH, HEADS, LENGTH, HEAD_DIM, dtype, "cpu", backend="torch")


def test_the_position_store_is_a_store_and_a_store_needs_every_operation() -> None:
    """The protocol names write, read, evict, nbytes and history_nbytes: the position store has
    them all, a class lacking ``history_nbytes`` is no store."""

    class NoHistory:
        def write(self, layer, rows, k, v) -> None: ...
        def read(self, layer): ...
        def evict(self, layer, rows) -> None: ...
        def nbytes(self) -> int: ...

    assert isinstance(_store(), Store)
    assert not isinstance(NoHistory(), Store)


def test_nbytes_is_the_whole_store_and_history_the_rows_written_and_not_evicted() -> None:
    """fp16 K and V, 3 KV heads of 5 dims: a (batch row, position) of one layer holds
    3 * 5 * (2 + 2) = 60 bytes of K and V. The preallocated store is 2 layers x 2 batch rows
    x 4 positions of those, 960 bytes, whatever was written; history counts the positions
    written and not evicted since."""
    store = _store()
    per_row = HEADS * HEAD_DIM * (2 + 2)
    assert store.nbytes() == LAYERS * BATCH * LENGTH * per_row == 960
    assert store.history_nbytes() == 0
    k = torch.arange(BATCH * HEADS * LENGTH * HEAD_DIM, dtype=torch.float16)
    k = k.view(BATCH, HEADS, LENGTH, HEAD_DIM)
    store.write(1, None, k, -k)  # every position of layer 1
    assert store.history_nbytes() == BATCH * LENGTH * per_row
    rows = torch.tensor([[3, 0], [1, 1]])  # batch row 1 repeats its one position (padding)
    fresh = torch.ones(BATCH, HEADS, 2, HEAD_DIM, dtype=torch.float16)
    store.write(0, rows, fresh, fresh)  # 2 + 1 distinct positions of layer 0
    assert store.history_nbytes() == (BATCH * LENGTH + 3) * per_row
    store.evict(1, torch.tensor([[2], [0]]))
    assert store.history_nbytes() == (BATCH * LENGTH + 3 - 2) * per_row
    assert store.nbytes() == 960  # preallocated: eviction frees no tensor


def test_read_gives_the_rows_written_and_zeros_where_evicted() -> None:
    store = _store(torch.float32)
    k = torch.randn(BATCH, HEADS, LENGTH, HEAD_DIM)
    v = torch.randn(BATCH, HEADS, LENGTH, HEAD_DIM)
    store.write(0, None, k, v)
    store.evict(0, torch.tensor([[1], [3]]))
    keys, values = store.read(0)
    keep = torch.ones(BATCH, LENGTH, dtype=torch.bool)
    keep[0, 1] = keep[1, 3] = False
    mask = keep[:, None, :, None]
    assert torch.equal(keys, torch.where(mask, k, 0.0))
    assert torch.equal(values, torch.where(mask, v, 0.0))
    assert not store.read(1)[0].any()  # the other layer was never written


def test_evicting_several_positions_of_a_row_zeroes_each_of_them() -> None:
    """An eviction of n > 1 positions per batch row zeroes exactly those (K and V, every head
    and dimension) and leaves every other position as written; history drops by their count."""
    store = _store(torch.float32)
    k = torch.randn(BATCH, HEADS, LENGTH, HEAD_DIM)
    v = torch.randn(BATCH, HEADS, LENGTH, HEAD_DIM)
    store.write(1, None, k, v)
    evicted = [[0, 2], [3, 1]]
    store.evict(1, torch.tensor(evicted))
    keys, values = store.read(1)
    for b in range(BATCH):
        for p in range(LENGTH):
            gone = p in evicted[b]
            assert torch.equal(keys[b, :, p], torch.zeros(HEADS, HEAD_DIM) if gone else k[b, :, p])
            assert torch.equal(
                values[b, :, p], torch.zeros(HEADS, HEAD_DIM) if gone else v[b, :, p]
            )
    per_row = HEADS * HEAD_DIM * (4 + 4)
    assert store.history_nbytes() == (BATCH * LENGTH - 4) * per_row


class SeamPipe:
    """A pipeline whose policy hook has a name of its own, declared by its adapter's KV seam."""

    def __init__(self) -> None:
        self.model = torch.nn.Linear(1, 1)

    def next_policy(self) -> Policy:
        return Policy()

    def end_run(self) -> None:
        """The generation is over."""


class MethodPolicy(Policy):
    name = "method"


def _session(kv: KVSeam | None) -> Session:
    adapter = Adapter(
        name="seam-test",
        pipelines=("SeamPipe",),
        denoisers=(),
        experts=("model",),
        driver="pipeline",
        cfg="none",
        media="text",
        provides=Capabilities(kv_store="position" if kv else ""),
        kv=kv,
    )
    return Session(Target.resolve(adapter, SeamPipe()), None, RunState("toy", kernels="torch"))


def test_a_kv_method_installs_its_policy_where_the_adapter_seam_says() -> None:
    """The policy hook is found through ``Adapter.kv``, not a pipeline attribute name known to
    the method: the seam's method returns the method's policy until the session closes."""
    session = _session(KVSeam(policy="next_policy"))
    pipe = session.target.pipe
    attach_policy(session, "toy", MethodPolicy)
    policy = pipe.next_policy()
    assert type(policy) is MethodPolicy and policy.kernels == "torch"
    session.close()
    assert type(pipe.next_policy()) is Policy


def test_a_kv_method_is_refused_on_a_model_that_declares_no_kv_seam() -> None:
    session = _session(None)
    with pytest.raises(UnsupportedModelError) as error:
        attach_policy(session, "toy", MethodPolicy)
    assert str(error.value) == (
        "toy needs a model with a KV store; seam-test declares none (Adapter.kv)"
    )
    assert session.attachments == []  # nothing half-attached


def test_the_text_lms_declare_the_position_store_seam_of_their_pipeline() -> None:
    """LLaDA and Dream: a position store, the policy hook their decoding loop calls, and what
    their samplers offer policies (LLaDA's: semi-autoregressive blocks, random remasking)."""
    from diffcache.pipelines.dream import ADAPTER as DREAM
    from diffcache.pipelines.llada import ADAPTER as LLADA

    assert DREAM.kv == KVSeam(policy="cache_policy") and DREAM.provides.kv_store == "position"
    sampler = {"semi_autoregressive": True, "random_remasking": True}
    assert LLADA.kv == KVSeam(policy="cache_policy", **sampler)
    assert LLADA.provides.kv_store == "position"
