"""Instance-level hooks: attach/detach in any order, signature kept, classes untouched, and
composition with accelerate's and diffusers' own forward wrappers in either order."""

from __future__ import annotations

import copy
import inspect
import pickle

import pytest
import torch

from diffcache import hooks
from diffcache.errors import DiffCacheError


class Net(torch.nn.Module):
    def forward(self, x, scale: float = 1.0):
        return x * scale


def _add(n):
    def hook(call, *args, **kwargs):
        return call(*args, **kwargs) + n

    return hook


def test_attach_detach_any_order_restores_instance() -> None:
    net, other = Net(), Net()
    x = torch.ones(2)
    a = hooks.attach(net, "forward", "diffcache.a", _add(1))
    b = hooks.attach(net, "forward", "diffcache.b", lambda call, *a, **k: call(*a, **k) * 10)
    assert net(x).tolist() == [20.0, 20.0]  # b outermost: (x + 1) * 10
    assert other(x).tolist() == [1.0, 1.0], "another instance of the class must be untouched"
    assert "forward" not in Net.__dict__ or Net.__dict__["forward"] is Net.forward
    a.detach()
    assert net(x).tolist() == [10.0, 10.0]
    assert [layer.name for layer in hooks.layers(net)] == ["diffcache.b"]
    b.detach()
    b.detach()  # idempotent
    assert "forward" not in net.__dict__ and not hooks.layers(net)
    assert net(x).tolist() == [1.0, 1.0]


def test_signature_is_preserved() -> None:
    net = Net()
    hooks.attach(net, "forward", "diffcache.a", _add(0))
    assert list(inspect.signature(net.forward).parameters) == ["x", "scale"]


def test_double_attach_raises() -> None:
    net = Net()
    hooks.attach(net, "forward", "diffcache.a", _add(1))
    with pytest.raises(ValueError, match="already attached"):
        hooks.attach(net, "forward", "diffcache.a", _add(1))


def test_existing_instance_attribute_is_restored() -> None:
    net = Net()
    net.forward = lambda x, scale=1.0: x * 3
    theirs = net.__dict__["forward"]
    h = hooks.attach(net, "forward", "diffcache.a", _add(1))
    assert net(torch.ones(1)).tolist() == [4.0]
    h.detach()
    assert net.__dict__["forward"] is theirs


def test_a_wrapper_installed_after_us_keeps_working_after_detach() -> None:
    """Someone wraps forward over our layer (saving the previous callable, as accelerate does);
    our detach unlinks us from under them and their wrapper stays."""
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    seen = []

    class Spy(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            seen.append("spy")
            return args, kwargs

    net = Net()
    ours = hooks.attach(net, "forward", "diffcache.a", _add(1))
    add_hook_to_module(net, Spy())
    assert net(torch.ones(1)).tolist() == [2.0] and seen == ["spy"]
    ours.detach()
    assert net(torch.ones(1)).tolist() == [1.0] and seen == ["spy", "spy"]
    remove_hook_from_module(net)
    assert net(torch.ones(1)).tolist() == [1.0] and not hooks.layers(net)


def test_layers_go_under_accelerate_hooks_and_survive_their_reinstall() -> None:
    """diffusers removes and re-adds accelerate's offload hook after every call: a layer added
    after the hook must survive that, and detach must leave the hook working."""
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    class Spy(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Spy.calls += 1
            return args, kwargs

    net = Net()
    add_hook_to_module(net, Spy())
    ours = hooks.attach(net, "forward", "diffcache.a", _add(1))
    for _ in range(2):  # what maybe_free_model_hooks does at the end of each pipeline call
        remove_hook_from_module(net)
        add_hook_to_module(net, Spy())
        assert net(torch.ones(1)).tolist() == [2.0]
    assert Spy.calls == 2
    ours.detach()
    assert net(torch.ones(1)).tolist() == [1.0] and Spy.calls == 3
    remove_hook_from_module(net)
    assert "forward" not in net.__dict__ or not isinstance(net.__dict__["forward"], hooks.Layer)


def test_diffusers_hook_registry_composes_in_either_order() -> None:
    from diffusers.hooks import HookRegistry, ModelHook

    class Twice(ModelHook):
        def post_forward(self, module, output):
            return output * 2

    for ours_first in (True, False):
        net = Net()
        registry = HookRegistry.check_if_exists_or_initialize(net)
        if ours_first:
            ours = hooks.attach(net, "forward", "diffcache.a", _add(1))
            registry.register_hook(Twice(), "twice")
        else:
            registry.register_hook(Twice(), "twice")
            ours = hooks.attach(net, "forward", "diffcache.a", _add(1))
        expect = 4.0 if ours_first else 3.0
        assert net(torch.ones(1)).tolist() == [expect]
        ours.detach()
        assert net(torch.ones(1)).tolist() == [2.0], f"ours_first={ours_first}"
        registry.remove_hook("twice")
        assert net(torch.ones(1)).tolist() == [1.0]


def test_deepcopy_runs_its_own_weights_and_pickle_refuses() -> None:
    net = torch.nn.Linear(2, 2)
    hooks.attach(net, "forward", "diffcache.a", _add(100))
    twin = copy.deepcopy(net)
    with torch.no_grad():
        twin.weight.zero_()
        twin.bias.zero_()
    x = torch.ones(1, 2)
    assert twin(x).tolist() == [[0.0, 0.0]], "the copy must run its own (zeroed) weights, plain"
    assert not hooks.layers(twin)
    assert (net(x) > 50).all(), "the original keeps its layer"
    with pytest.raises(DiffCacheError, match="remove"):
        pickle.dumps(net)


def test_plain_objects_are_hooked_too() -> None:
    class Sched:
        def step(self, v):
            return v - 1

    s = Sched()
    seen = []
    h = hooks.attach(s, "step", "diffcache.run", lambda call, *a, **k: seen.append(a) or call(*a))
    assert s.step(5) == 4 and seen == [(5,)]
    h.detach()
    assert "step" not in s.__dict__
