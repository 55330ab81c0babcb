"""Strict plan-file reading: one document, no duplicate keys, no aliases, YAML 1.2 floats."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import yaml

from diffcache.errors import PlanError
from diffcache.yamlio import MAX_PLAN_BYTES, dump_yaml, loads_yaml, read_yaml


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1e3", 1000.0),
        ("5e-2", 0.05),
        ("1E-3", 0.001),
        ("-2.5e+3", -2500.0),
        ("+1.5e2", 150.0),
        (".5e1", 5.0),
        ("1_000e-3", 1.0),
        ("1.5", 1.5),
        ("10", 10),
        ("-3", -3),
        ("'5e-2'", "5e-2"),
        ('"1e3"', "1e3"),
        ("e3", "e3"),
        ("1e", "1e"),
        ("true", True),
        ("null", None),
    ],
    ids=lambda v: repr(v),
)
def test_scalars_resolve_as_yaml_1_2(text: str, expected: object) -> None:
    value = loads_yaml(f"x: {text}")["x"]
    assert value == expected and type(value) is type(expected)


def test_inf_and_nan_keep_pyyaml_handling() -> None:
    data = loads_yaml("a: .inf\nb: -.Inf\nc: .nan\n")
    assert data["a"] == math.inf and data["b"] == -math.inf and math.isnan(data["c"])


def test_global_safe_loader_is_untouched() -> None:
    assert yaml.safe_load("x: 5e-2") == {"x": "5e-2"}
    assert yaml.safe_dump("1e3") == "1e3\n...\n"  # SafeDumper still writes it plain


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "---\n", "---\n...\n"], ids=repr)
def test_empty_document_is_none(text: str) -> None:
    assert loads_yaml(text) is None


def test_reads_a_plan_file(tmp_path: Path) -> None:
    path = tmp_path / "plan.yaml"
    path.write_text("model: wan\noptions:\n  threshold: 5e-2\n  steps: [1, 2]\n", "utf-8")
    assert read_yaml(path) == {"model": "wan", "options": {"threshold": 0.05, "steps": [1, 2]}}
    assert read_yaml(str(path)) == read_yaml(path)


def test_utf8_with_bom_and_unicode(tmp_path: Path) -> None:
    path = tmp_path / "plan.yaml"
    path.write_bytes("\ufeffname: café\n".encode())
    assert read_yaml(path) == {"name": "café"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: 1\n---\nb: 2\n", "plan.yaml: line 2: a plan file holds one YAML document"),
        ("a: 1\n---\n", "a plan file holds one YAML document"),
        ("a: [1, 2\n", r"plan.yaml: not valid YAML: expected ',' or ']'.* \(line 2, column 1\)"),
        ("a: b: c\n", r"not valid YAML: mapping values are not allowed here \(line 1, column 5\)"),
        ("a:\n\tb: 1\n", r"not valid YAML: .*\(line 2, column 1\)"),
        ("x: \x00\n", r"not valid YAML: unacceptable character #x0000"),
        ("x: !!python/object:os.system ls\n", r"not valid YAML: could not determine a constructor"),
        ("[" * 5000, "not valid YAML: nested too deeply"),
        (
            "model: wan\noptions:\n  other: 1\n  threshold: 0.1\n  x: 2\n  threshold: 0.2\n",
            r"plan.yaml: options.threshold: duplicate key \(lines 4 and 6\)",
        ),
        ("a: 1\na: 2\n", r"plan.yaml: a: duplicate key \(lines 1 and 2\)"),
        ("l:\n  - {k: 1}\n  - {k: 1, k: 2}\n", r"l\[1\].k: duplicate key \(twice on line 3\)"),
        ("a:\n  b:\n    c: 1\n    'c': 2\n", r"a.b.c: duplicate key \(lines 3 and 4\)"),
        ("a: &x 1\nb: *x\n", "plan.yaml: line 1: YAML anchors and aliases are not allowed"),
        ("a: 1\nb: &x [1]\n", "line 2: YAML anchors and aliases are not allowed"),
        ("a: 1\nb: *x\n", "line 2: YAML anchors and aliases are not allowed"),
        ("base: &b {x: 1}\nc:\n  <<: *b\n", "line 1: YAML anchors and aliases are not allowed"),
    ],
    ids=[
        "two-documents",
        "empty-second-document",
        "unclosed-list",
        "mapping-in-scalar",
        "tab-indent",
        "control-character",
        "python-tag",
        "nested-too-deep",
        "duplicate-nested",
        "duplicate-top",
        "duplicate-in-list-flow",
        "duplicate-quoted",
        "alias",
        "anchor-only",
        "undefined-alias",
        "merge-key",
    ],
)
def test_bad_text_is_a_plan_error(text: str, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        loads_yaml(text, source="plan.yaml")


def test_same_key_under_different_parents_is_fine() -> None:
    assert loads_yaml("a: {x: 1}\nb: {x: 2}\n") == {"a": {"x": 1}, "b": {"x": 2}}
    assert loads_yaml("a: 1\n'1': 2\n1: 3\n") == {"a": 1, "1": 2, 1: 3}  # str '1' is not int 1


def test_billion_laughs_fails_fast() -> None:
    names = "abcdefghi"
    lines = [f'a: &a ["{"lol"}"' + ', "lol"' * 8 + "]"]
    for prev, name in zip(names, names[1:], strict=False):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    bomb = "\n".join(lines) + "\n"
    start = time.perf_counter()
    with pytest.raises(PlanError, match="line 1: YAML anchors and aliases are not allowed"):
        loads_yaml(bomb, source="bomb.yaml")
    assert time.perf_counter() - start < 1.0


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match=r"is a directory, not a plan file") as e:
        read_yaml(tmp_path)
    assert str(e.value).startswith(f"{tmp_path}: ")


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match=r"missing.yaml: no such plan file"):
        read_yaml(tmp_path / "missing.yaml")


def test_oversized_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("x: " + "1" * 200 + "\n")
    with pytest.raises(PlanError, match=r"big.yaml: is 204 bytes, over the 100-byte cap"):
        read_yaml(path, max_bytes=100)
    assert read_yaml(path, max_bytes=204) == {"x": int("1" * 200)}


def test_size_is_checked_before_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "huge.yaml"
    with path.open("wb") as f:
        f.truncate(MAX_PLAN_BYTES + 1)  # sparse: nothing to read if the check comes first

    def no_reading(*args: object, **kwargs: object) -> None:
        raise AssertionError("the file was opened")

    monkeypatch.setattr(Path, "open", no_reading)
    with pytest.raises(
        PlanError, match=rf"is {MAX_PLAN_BYTES + 1} bytes, over the {MAX_PLAN_BYTES}"
    ):
        read_yaml(path)


def test_latin1_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: café\n".encode("latin-1"))
    with pytest.raises(
        PlanError, match=r"latin1.yaml: not UTF-8 text \(byte offset 9\); save"
    ) as e:
        read_yaml(path)
    assert e.value.__cause__ is None and e.value.__suppress_context__


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("a: 1\na: 2\n")
    with pytest.raises(PlanError, match=rf"^{path}: a: duplicate key"):
        read_yaml(path)


def test_dump_is_deterministic_block_style() -> None:
    data = {"model": "wan", "options": {"threshold": 0.05, "steps": (1, 2)}, "name": "ü"}
    assert dump_yaml(data) == (
        "model: wan\noptions:\n  threshold: 0.05\n  steps:\n  - 1\n  - 2\nname: ü\n"
    )


def test_dump_reads_back_equal() -> None:
    shared = [1, 2]
    data = {
        "z_first": {"b": 1, "a": 2},
        "strings": ["1e3", "5e-2", "10", "true", "null", "", "a: b"],
        "floats": [1e-6, 1e20, 0.1, -2.5],
        "a": shared,
        "b": shared,  # written out twice, never as an alias
        "long": "word " * 40,
    }
    text = dump_yaml(data)
    assert "&" not in text and "*" not in text
    assert max(len(line) for line in text.splitlines()) < 110  # width=100 folds at a space
    assert loads_yaml(text) == data
    assert list(loads_yaml(text)) == list(data)
