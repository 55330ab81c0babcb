"""Typed option fields: strict coercion of plan data, every problem named by its key path."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal, Optional

import pytest

from diffcache.errors import PlanError
from diffcache.options import coerce, option, to_plain
from diffcache.yamlio import dump_yaml, loads_yaml


@dataclasses.dataclass(frozen=True)
class Quantiles:
    attn: float = option(0.5, "attention quantile", min=0, max=1)
    mlp: float = option(0.5, "MLP quantile", min=0, max=1)


@dataclasses.dataclass(frozen=True)
class Config:
    steps: tuple[int, ...] = option(doc="steps to compute", min=0)
    order: Literal["linear", "cubic"] = option("linear", "interpolation order")
    span: tuple[float, float] = option((0.0, 1.0), "start and end, as fractions of the run")
    names: list[str] = option(default_factory=list, doc="block names")
    weights: dict[str, float] = option(default_factory=dict, doc="weight per kind", min=0)
    scales: Mapping[str, float] = option(default_factory=dict, doc="scale per kind")
    quantiles: Quantiles = option(default_factory=Quantiles, doc="calibrated quantiles")
    limit: Optional[int] = option(None, "at most this many reuses", min=1)  # noqa: UP045
    tau: float | None = option(None, "threshold", max=10)
    enabled: bool = option(True, "switch")


@dataclasses.dataclass(frozen=True)
class Checked:
    lo: float = option(0.0, "low end")
    hi: float = option(1.0, "high end")

    def __post_init__(self) -> None:
        if self.lo > self.hi:
            raise ValueError(f"lo ({self.lo}) must not exceed hi ({self.hi})")


def test_option_keeps_doc_and_bounds() -> None:
    fields = {f.name: f for f in dataclasses.fields(Config)}
    assert fields["weights"].metadata["doc"] == "weight per kind"
    assert (fields["weights"].metadata["min"], fields["weights"].metadata["max"]) == (0, None)
    assert fields["quantiles"].default_factory is Quantiles
    assert fields["steps"].default is dataclasses.MISSING  # required
    assert Config(steps=(1,)).names == []


def test_option_refuses_default_and_factory() -> None:
    with pytest.raises(ValueError, match="cannot specify both default and default_factory"):
        option(1, "x", default_factory=list)


@pytest.mark.parametrize(
    ("value", "hint", "expected"),
    [
        (True, bool, True),
        (3, int, 3),
        (3, float, 3.0),
        (0.25, float, 0.25),
        ("x", str, "x"),
        (None, int | None, None),
        (2, Optional[int], 2),  # noqa: UP045
        ("cubic", Literal["linear", "cubic"], "cubic"),
        ([1, 2, 3], tuple[int, ...], (1, 2, 3)),
        ([], tuple[int, ...], ()),
        ([1, 2.5], tuple[float, float], (1.0, 2.5)),
        (["a"], list[str], ["a"]),
        ({"a": 1}, dict[str, float], {"a": 1.0}),
        ({"a": 1}, Mapping[str, float], {"a": 1.0}),
        ({"attn": 0.1}, Quantiles, Quantiles(attn=0.1)),
        ([[1], [2, 3]], list[tuple[int, ...]], [(1,), (2, 3)]),
        ("x", int | str, "x"),
        (1, Literal["a", 1], 1),
        ({"anything": [1]}, Any, {"anything": [1]}),
    ],
    ids=lambda v: repr(v),
)
def test_coerce_accepts(value: Any, hint: Any, expected: Any) -> None:
    out = coerce(value, hint, "options.x")
    assert out == expected and type(out) is type(expected)


@pytest.mark.parametrize(
    ("value", "hint", "meta", "message"),
    [
        (1, bool, {}, "options.x: expected bool, got int 1"),
        (True, int, {}, "options.x: expected int, got bool True"),
        (3.0, int, {}, "options.x: expected int, got float 3.0"),
        ("x", int, {}, "options.x: expected int, got str 'x'"),
        ("5e-2", float, {}, "expected float, got str '5e-2'; write the number without quotes"),
        (math.nan, float, {}, "options.x: must be a finite number, got nan"),
        (-math.inf, float, {}, "options.x: must be a finite number, got -inf"),
        (10**400, float, {}, "options.x: must be a finite number, got 1000"),
        (None, float, {}, "options.x: expected float, got null"),
        (1, str, {}, "options.x: expected str, got int 1"),
        (1.5, float, {"max": 1}, "options.x: must be <= 1, got 1.5"),
        (-1, int, {"min": 0}, "options.x: must be >= 0, got -1"),
        (-1, float, {"min": 0.0}, "options.x: must be >= 0.0, got -1.0"),
        (3.5, int | str, {}, "options.x: expected int or str, got float 3.5"),
        (
            "cubc",
            Literal["linear", "cubic"],
            {},
            "options.x: expected one of 'linear', 'cubic', got 'cubc' (did you mean 'cubic'?)",
        ),
        (True, Literal[1, 2], {}, "options.x: expected one of 1, 2, got True"),
        ("x", tuple[int, ...], {}, "options.x: expected a list of int, got str 'x'"),
        ([1, "x"], tuple[int, ...], {}, "options.x[1]: expected int, got str 'x'"),
        ([1, -2], tuple[int, ...], {"min": 0}, "options.x[1]: must be >= 0, got -2"),
        (
            [1, 2, 3],
            tuple[float, float],
            {},
            "options.x: expected a list of 2 items (float, float), got a list of 3 items",
        ),
        ({"a": 1}, list[str], {}, "options.x: expected a list of str, got a mapping"),
        ([1], dict[str, float], {}, "options.x: expected a mapping of str to float, got a list"),
        ({1: 1.0}, dict[str, float], {}, "options.x (key 1): expected str, got int 1"),
        ({"a": 2.0}, Mapping[str, float], {"max": 1}, "options.x.a: must be <= 1, got 2.0"),
        ({"attn": 2}, Quantiles, {}, "options.x.attn: must be <= 1, got 2.0"),
        (5, Quantiles, {}, "options.x: expected a mapping (Quantiles), got int 5"),
    ],
    ids=lambda v: repr(v)[:40],
)
def test_coerce_refuses(value: Any, hint: Any, meta: dict[str, Any], message: str) -> None:
    with pytest.raises(PlanError) as e:
        coerce(value, hint, "options.x", meta)
    assert message in str(e.value)


def test_coerce_reports_every_item() -> None:
    with pytest.raises(PlanError) as e:
        coerce([1, "a", 2.5, -1], tuple[int, ...], "options.steps", {"min": 0})
    assert str(e.value).splitlines() == [
        "options.steps[1]: expected int, got str 'a'",
        "options.steps[2]: expected int, got float 2.5",
        "options.steps[3]: must be >= 0, got -1",
    ]


def test_unsupported_hint_is_a_programming_error() -> None:
    with pytest.raises(TypeError, match="not supported"):
        coerce([1], set[int], "options.x")


def test_coerce_dataclass_builds_the_dataclass() -> None:
    data = loads_yaml(
        "steps: [0, 5]\norder: cubic\nspan: [0, 0.5]\nweights: {attn: 1}\n"
        "quantiles: {mlp: 9e-1}\nlimit: 3\ntau: 5e-2\n"
    )
    config = coerce(data, Config, "options")
    assert config == Config(
        steps=(0, 5),
        order="cubic",
        span=(0.0, 0.5),
        weights={"attn": 1.0},
        quantiles=Quantiles(mlp=0.9),
        limit=3,
        tau=0.05,
    )


def test_coerce_dataclass_lists_every_problem() -> None:
    data = {
        "stpes": [1],
        "order": "cubc",
        "span": [0, 1, 2],
        "names": ["a", 3],
        "weights": {"attn": -1},
        "quantiles": {"attn": 1.5, "mpl": 0.1},
        "limit": 0,
        "tau": True,
        "enabled": "yes",
    }
    with pytest.raises(PlanError) as e:
        coerce(data, Config, "plan.yaml: options")
    assert str(e.value).splitlines() == [
        "plan.yaml: options.stpes: unknown key (did you mean 'steps'?); known: steps, order, "
        "span, names, weights, scales, quantiles, limit, tau, enabled",
        "plan.yaml: options.order: expected one of 'linear', 'cubic', got 'cubc' "
        "(did you mean 'cubic'?)",
        "plan.yaml: options.span: expected a list of 2 items (float, float), got a list of 3 items",
        "plan.yaml: options.names[1]: expected str, got int 3",
        "plan.yaml: options.weights.attn: must be >= 0, got -1.0",
        "plan.yaml: options.quantiles.attn: must be <= 1, got 1.5",
        "plan.yaml: options.quantiles.mpl: unknown key (did you mean 'mlp'?); known: attn, mlp",
        "plan.yaml: options.limit: must be >= 1, got 0",
        "plan.yaml: options.tau: expected float, got bool True",
        "plan.yaml: options.enabled: expected bool, got str 'yes'",
        "plan.yaml: options.steps: required key is missing",
    ]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([1], "options: expected a mapping (Config), got a list of 1 item"),
        (None, "options: expected a mapping (Config), got null"),
        ({}, "options.steps: required key is missing"),
        ({"steps": [], 3: 1}, "options.3: unknown key; known: steps,"),
    ],
    ids=["list", "null", "missing-required", "non-string-key"],
)
def test_coerce_dataclass_refuses(data: Any, message: str) -> None:
    with pytest.raises(PlanError) as e:
        coerce(data, Config, "options")
    assert str(e.value).startswith(message)


def test_coerce_dataclass_reports_post_init_checks() -> None:
    assert coerce({"lo": 0.5}, Checked, "calibration") == Checked(lo=0.5)
    with pytest.raises(PlanError, match=r"^calibration: lo \(2.0\) must not exceed hi \(1.0\)$"):
        coerce({"lo": 2}, Checked, "calibration")


def test_to_plain_round_trips_through_yaml() -> None:
    config = Config(
        steps=(1, 2),
        span=(0.1, 0.9),
        names=["a"],
        weights={"attn": 0.5},
        quantiles=Quantiles(attn=0.2),
        tau=1e-6,
    )
    plain = to_plain(config)
    assert plain == {
        "steps": [1, 2],
        "order": "linear",
        "span": [0.1, 0.9],
        "names": ["a"],
        "weights": {"attn": 0.5},
        "scales": {},
        "quantiles": {"attn": 0.2, "mlp": 0.5},
        "limit": None,
        "tau": 1e-6,
        "enabled": True,
    }
    assert list(plain) == [f.name for f in dataclasses.fields(Config)]
    assert coerce(loads_yaml(dump_yaml(plain)), Config, "options") == config


def test_to_plain_leaves_scalars_and_converts_containers() -> None:
    assert to_plain({"a": (1, [Quantiles()]), "b": "x"}) == {
        "a": [1, [{"attn": 0.5, "mlp": 0.5}]],
        "b": "x",
    }
    assert to_plain(3) == 3 and to_plain(None) is None and to_plain(Quantiles) is Quantiles
