"""Instance-level hooks: attach/detach in any order, signature kept, classes untouched."""

from __future__ import annotations

import inspect

import pytest
import torch

from diffcache import hooks


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
    hooks.attach(net, "forward", "diffcache.a", _add(1))
    hooks.attach(net, "forward", "diffcache.b", lambda call, *a, **k: call(*a, **k) * 10)
    assert net(x).tolist() == [20.0, 20.0]  # b outermost: (x + 1) * 10
    assert other(x).tolist() == [1.0, 1.0], "another instance of the class must be untouched"
    assert "forward" not in Net.__dict__ or Net.__dict__["forward"] is Net.forward
    hooks.detach(net, "forward", "diffcache.a")
    assert net(x).tolist() == [10.0, 10.0]
    hooks.detach(net, "forward", "diffcache.b")
    assert "forward" not in net.__dict__ and hooks.HOOKS_ATTR not in net.__dict__
    assert net(x).tolist() == [1.0, 1.0]


def test_signature_is_preserved() -> None:
    net = Net()
    hooks.attach(net, "forward", "diffcache.a", _add(0))
    assert list(inspect.signature(net.forward).parameters) == ["x", "scale"]


def test_double_attach_raises_and_missing_detach_raises() -> None:
    net = Net()
    hooks.attach(net, "forward", "diffcache.a", _add(1))
    with pytest.raises(ValueError, match="already attached"):
        hooks.attach(net, "forward", "diffcache.a", _add(1))
    with pytest.raises(ValueError, match="no hook"):
        hooks.detach(net, "forward", "diffcache.zzz")


def test_existing_instance_attribute_is_restored() -> None:
    """An instance-level forward set by someone else (e.g. accelerate's offload hooks) survives."""
    net = Net()
    own = net.forward
    net.forward = lambda x, scale=1.0: x * 3
    theirs = net.__dict__["forward"]
    hooks.attach(net, "forward", "diffcache.a", _add(1))
    assert net(torch.ones(1)).tolist() == [4.0]
    hooks.detach_all(net)
    assert net.__dict__["forward"] is theirs and own.__func__ is Net.forward


def test_plain_objects_are_hooked_too() -> None:
    class Sched:
        def step(self, v):
            return v - 1

    s = Sched()
    seen = []
    hooks.attach(s, "step", "diffcache.run", lambda call, *a, **k: seen.append(a) or call(*a, **k))
    assert s.step(5) == 4 and seen == [(5,)]
    hooks.detach_all(s)
    assert "step" not in s.__dict__
